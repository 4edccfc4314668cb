"""The device-only prompt encoder (CUDA-graph-friendly text training) against ComfyUI's own encode path: same
conditioning, same gradients to the learned vectors, and ComfyUI's path kept where it is not mirrored."""
import pytest
import torch

pytestmark = pytest.mark.host
PROMPTS = ["a photo of embedding:zwx dog", "", "a photo of a dog"]
SIZE = (64, 64)


def host_with_token(model, clip, vae, seed=0):
    """A ComfyHost whose CLIP resolves embedding:zwx to two trainable vectors per text encoder."""
    from comfyui_personalize.nodes.comfy_adapter import ComfyHost
    from comfyui_personalize.nodes.embeddings import clip_with_embeddings, text_encoders, token_table
    g = torch.Generator().manual_seed(seed)
    vectors = {key: torch.nn.Parameter(torch.randn(2, token_table(enc).shape[1], generator=g) * 0.05)
               for key, (_, _, enc) in text_encoders(clip).items()}
    host = ComfyHost(model, clip_with_embeddings(clip, {"zwx": vectors}), vae)
    host.cache_tokens = False  # as the embedding trainers set it: tokens hold views of the vectors
    with torch.inference_mode(False):
        host.load_for_training(True)
    return host, vectors


def check_against_comfyui(host, vectors, prompts=PROMPTS, size=SIZE):
    with torch.inference_mode(False):
        encoder = host.device_prompt_encoder(prompts, size)
        assert encoder is not None and encoder.prompts == prompts
        grads = []
        with torch.enable_grad(), host.text_encoder_autograd():
            for encode in (lambda: encoder(size), lambda: host.encode_text(prompts, size)):
                out = encode()
                weight = torch.linspace(-1, 1, out.context.numel()).view_as(out.context)
                loss = (out.context.float().cpu() * weight).sum()
                if out.y is not None:
                    loss = loss + out.y.float().cpu().sum()
                loss.backward()
                grads.append({k: v.grad.clone() for k, v in vectors.items()})
                outs = grads[-1]
                for v in vectors.values():
                    v.grad = None
                if len(grads) == 1:
                    ours = out
        theirs = host.encode_text(prompts, size)
    # one batch of prompts rounds differently from ComfyUI's one-by-one encoding (up to 5e-5 on some CPUs)
    torch.testing.assert_close(ours.context.detach().cpu(), theirs.context.cpu(), atol=1e-4, rtol=1e-4)
    if theirs.y is not None:
        torch.testing.assert_close(ours.y.detach().cpu(), theirs.y.cpu().float(), atol=1e-4, rtol=1e-4)
    for key in vectors:
        assert outs[key].abs().sum() > 0
        # gradients are sums over every output element (up to ~4e3 here): tolerance relative to their scale
        scale = float(grads[1][key].abs().max())
        torch.testing.assert_close(grads[0][key], grads[1][key], atol=1e-5 * scale, rtol=1e-4)
    return ours


def test_sd15_device_encoding_equals_comfyui_with_gradients(comfy, tiny_sd15):
    model, clip, vae = tiny_sd15
    host, vectors = host_with_token(model, clip, vae)
    ours = check_against_comfyui(host, vectors)
    assert ours.context.shape[0] == len(PROMPTS) and ours.y is None


def test_clip_skip_is_followed(comfy, tiny_sd15):
    model, clip, vae = tiny_sd15
    skipped = clip.clone()
    skipped.clip_layer(-2)
    host, vectors = host_with_token(model, skipped, vae)
    check_against_comfyui(host, vectors)


def test_prompts_it_does_not_mirror_use_comfyuis_path(comfy, tiny_sd15):
    model, clip, vae = tiny_sd15
    host, _ = host_with_token(model, clip, vae)
    with torch.inference_mode(False):
        assert host.device_prompt_encoder(["a (photo:1.3) of embedding:zwx"], SIZE) is None  # weights
        assert host.device_prompt_encoder([" ".join(["dog"] * 90)], SIZE) is None  # two 77-token chunks
