"""SDXL-shaped UNet: kohya LDM-style names that ComfyUI's own LoRA key map accepts, and training through y."""
import pytest
import torch
from comfy_tiny import TINY_SDXL, tiny_unet_patcher

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def tiny_sdxl(comfy):
    import comfy.supported_models

    return tiny_unet_patcher(comfy.supported_models.SDXL, TINY_SDXL, seed=4)


def test_sdxl_lora_names_are_ldm_style_and_loadable(tiny_sdxl):
    import comfy.lora

    from comfyui_personalize.nodes.comfy_adapter import ComfyHost

    host = ComfyHost(tiny_sdxl, None, None)
    assert host.family == "sdxl" and host.prediction == "eps"
    names = host.unet_lora_targets("attention")
    key_map = comfy.lora.model_lora_keys_unet(tiny_sdxl.model, {})
    assert names and all(n in key_map for n in names)
    assert all(n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
               for n in names)


def test_sdxl_trains_through_the_adm_vector(tiny_sdxl):
    from comfyui_personalize.nodes.comfy_adapter import ComfyHost
    from comfyui_personalize.training.batches import TrainingData
    from comfyui_personalize.training.lora import LoRANetwork
    from comfyui_personalize.training.task import Conditioning
    from comfyui_personalize.training.trainer import TrainConfig, train

    host = ComfyHost(tiny_sdxl, None, None)
    pooled = torch.randn(2, 1280)
    y = torch.cat([host.model.model.encode_adm(pooled_output=p[None], width=64, height=64) for p in pooled])
    assert y.shape == (2, 2816)
    with torch.inference_mode(False), torch.enable_grad():
        host.load_for_training(False)
        net = LoRANetwork(host.unet_lora_targets("attention"), 4, 4).to(host.model.load_device)
        cond = Conditioning(torch.randn(2, 77, 2048), y)
        with net.attached():
            losses = train(host.task(), TrainingData.encoded(torch.randn(2, 4, 8, 8), cond), list(net.parameters()),
                           TrainConfig(steps=3, learning_rate=1e-3, batch_size=2))
        dev = host.model.load_device
        x, t = torch.randn(2, 4, 8, 8, device=dev), torch.tensor([100, 700], device=dev)
        on_dev = cond.to(dev)
        with_y = host.predict(x, t, on_dev)
        zero_y = host.predict(x, t, Conditioning(on_dev.context, torch.zeros_like(on_dev.y)))
    assert len(losses) == 3 and any(a.up.abs().sum() > 0 for a in net.adapters.values())
    assert (with_y - zero_y).abs().max() > 1e-4  # the size/pooled vector reaches the model


@pytest.fixture(scope="module")
def tiny_sdxl_clip(comfy):
    """An SDXL CLIP (CLIP-L + CLIP-G, ComfyUI's own classes and tokenizers) at toy size."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    from comfy.supported_models_base import ClipTarget
    from comfy_tiny import TINY_CLIP, randomise

    tiny_g = dict(TINY_CLIP, hidden_size=1280, projection_dim=1280, eos_token_id=49407, pad_token_id=0,
                  num_hidden_layers=3)

    class TinySDXLClip(comfy.sdxl_clip.SDXLClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            torch.nn.Module.__init__(self)
            self.clip_l = comfy.sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                                     layer_norm_hidden_state=False, model_options=model_options,
                                                     textmodel_json_config=dict(TINY_CLIP, num_hidden_layers=3))
            self.clip_g = comfy.sd1_clip.SDClipModel(
                layer="hidden", layer_idx=-2, device=device, dtype=dtype, textmodel_json_config=tiny_g,
                special_tokens={"start": 49406, "end": 49407, "pad": 0}, layer_norm_hidden_state=False,
                return_projected_pooled=True, model_options={**model_options, "model_name": "clip_g"})
            self.dtypes = {dtype}

    with torch.inference_mode():
        clip = comfy.sd.CLIP(target=ClipTarget(comfy.sdxl_clip.SDXLTokenizer, TinySDXLClip))
    randomise(clip.cond_stage_model, 5)
    return clip


def test_sdxl_textual_inversion_learns_clip_l_and_clip_g(comfy, tiny_sdxl, tiny_sdxl_clip, tiny_sd15):
    import copy

    from test_train_lora import dataset, run_node

    from comfyui_personalize.nodes.save_embedding import PersonalizeSaveEmbedding
    from comfyui_personalize.nodes.train_embedding import PersonalizeTrainTextualInversion
    vae = tiny_sd15[2]
    out_clip, embedding, loss = run_node(
        PersonalizeTrainTextualInversion, model=tiny_sdxl, clip=tiny_sdxl_clip, vae=vae, dataset=dataset(),
        steps=2, learning_rate=1e-2, batch_size=1, seed=0, dtype="auto", gradient_checkpointing=False, token="zwx",
        init_word="dog, cat", num_vectors=3).result  # candidates: ranked through the ADM vector's micro tail
    assert {k: tuple(v.shape) for k, v in embedding.items()} == {"clip_l": (3, 768), "clip_g": (3, 1280)}
    assert embedding.metadata["personalize.init_word"] in ("dog", "cat")
    run_node(PersonalizeSaveEmbedding, embedding=embedding, name="zwx_xl", subfolder="", if_exists="overwrite")
    stock = tiny_sdxl_clip.clone()
    stock.tokenizer = copy.copy(tiny_sdxl_clip.tokenizer)
    for attr in ("clip_l", "clip_g"):
        tok = copy.copy(getattr(tiny_sdxl_clip.tokenizer, attr))
        tok.embedding_directory = comfy.folder_paths.get_folder_paths("embeddings")
        setattr(stock.tokenizer, attr, tok)

    def encode(clip, text):
        cond, extra = comfy.nodes.CLIPTextEncode().encode(clip, text)[0][0]
        return cond, extra["pooled_output"]

    ours, stock_out = encode(out_clip, "a photo of embedding:zwx dog"), encode(stock, "a photo of embedding:zwx_xl dog")
    for a, b in zip(ours, stock_out):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sdxl_hard_prompt_replaces_each_encoders_vector_with_its_own_nearest_word(comfy, tiny_sdxl_clip):
    from comfyui_personalize.nodes.embeddings import (
        clip_with_embeddings,
        hard_tokens,
        init_ids,
        text_encoders,
        token_table,
    )
    encoders = text_encoders(tiny_sdxl_clip)
    words = {"clip_l": "dog", "clip_g": "cat"}  # different words per encoder: each table answers for itself
    vectors = {key: token_table(enc)[init_ids(tok, words[key])].detach().clone() * 2.0
               for key, (_, tok, enc) in encoders.items()}
    soft = clip_with_embeddings(tiny_sdxl_clip, {"zwx": vectors})
    tokens, chosen = hard_tokens(soft, "a photo of embedding:zwx")
    assert sorted(chosen) == ["g: cat", "l: dog"]
    for name, word in (("l", "dog"), ("g", "cat")):
        expected = tiny_sdxl_clip.tokenize(f"a photo of {word}")[name]
        assert [[t[0] for t in b] for b in tokens[name]] == [[t[0] for t in b] for b in expected]


def test_sdxl_device_prompt_encoding_equals_comfyui_with_gradients(comfy, tiny_sdxl, tiny_sdxl_clip):
    """CLIP-L and CLIP-G concatenated, the pooled CLIP-G output in y beside the size embedding."""
    from test_prompt_encoder import check_against_comfyui, host_with_token
    host, vectors = host_with_token(tiny_sdxl, tiny_sdxl_clip, None)
    ours = check_against_comfyui(host, vectors, size=(64, 96))
    assert set(vectors) == {"clip_l", "clip_g"} and ours.y is not None


def test_sdxl_dreambooth_diff_names_are_kohyas_and_resolve_in_comfyui(comfy, tiny_sdxl, tiny_sdxl_clip):
    """DreamBooth's diff file is named as kohya names SDXL modules (A1111/Forge read lora_unet_*, lora_te1_*,
    lora_te2_*); every such name must resolve in ComfyUI's key map to the module it came from."""
    import comfy.lora

    from comfyui_personalize.nodes.comfy_adapter import ComfyHost

    names = ComfyHost(tiny_sdxl, tiny_sdxl_clip, None).kohya_module_names(True)
    unet_keys = comfy.lora.model_lora_keys_unet(tiny_sdxl.model, {})
    clip_keys = comfy.lora.model_lora_keys_clip(tiny_sdxl_clip.cond_stage_model, {})
    unet = {g: k for g, k in names.items() if g.startswith("diffusion_model.")}
    assert len(unet) == sum(1 for k in tiny_sdxl.model.state_dict() if k.startswith("diffusion_model.")
                            and k.endswith(".weight"))
    assert all(unet_keys[k] == g + ".weight" for g, k in unet.items())
    te = {g: k for g, k in names.items() if g.startswith("text_encoders.")}
    assert {"_".join(k.split("_")[:2]) for k in te.values()} == {"lora_te1", "lora_te2"}
    assert all(clip_keys[k] == g[len("text_encoders."):] + ".weight" for g, k in te.items())
    assert any(".clip_g." in g and k.startswith("lora_te2_") for g, k in te.items())


def test_sdxl_training_rows_get_their_images_size_and_crop(comfy, tiny_sdxl, tiny_sdxl_clip, tiny_sd15, monkeypatch):
    """Every SDXL row used to say "uncropped, already bucket-sized"; a wide photo centre-cropped to the square (and
    a small one upscaled) now reports its own size and crop, as diffusers/SGM condition SDXL training."""
    from test_train_lora import run_node

    import comfyui_personalize.nodes.session as session
    from comfyui_personalize.nodes.comfy_adapter import ComfyHost
    from comfyui_personalize.nodes.train_embedding import PersonalizeTrainTextualInversion
    from comfyui_personalize.training.datasets import InstanceDataset

    host = ComfyHost(tiny_sdxl, None, None)
    adm = host.model.model.encode_adm
    tails = host.micro_conditioning([(64, 96, 0, 16), (64, 64, 0, 0)], (64, 64))
    pooled = torch.zeros(1, 1280)
    torch.testing.assert_close(tails[0], adm(pooled_output=pooled, width=96, height=64, crop_w=16, crop_h=0,
                                             target_width=64, target_height=64)[0, 1280:])
    torch.testing.assert_close(tails[1], adm(pooled_output=pooled, width=64, height=64)[0, 1280:])  # as inference

    built = []
    real = session.build_training_data
    monkeypatch.setattr(session, "build_training_data", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    images = (torch.rand(64, 96, 3), torch.rand(40, 40, 3))
    data = InstanceDataset(images, ("a photo of zwx dog",) * 2, resolution=64, bucketing=False, flip=True)
    run_node(PersonalizeTrainTextualInversion, model=tiny_sdxl, clip=tiny_sdxl_clip, vae=tiny_sd15[2], dataset=data,
             steps=1, learning_rate=1e-2, batch_size=1, seed=0, dtype="auto", gradient_checkpointing=False,
             token="zwx", init_word="dog", num_vectors=1)
    (bucket,) = built[0].buckets
    torch.testing.assert_close(bucket.micro, host.micro_conditioning([(64, 96, 0, 16), (40, 40, 0, 0)], (64, 64)))
    torch.testing.assert_close(bucket.flipped_micro, host.micro_conditioning([(64, 96, 0, 16), (40, 40, 0, 0)],
                                                                             (64, 64)))  # even margins: same crop
