"""Tiny ComfyUI-native model configs and helpers for the host tier."""
import hashlib

import torch

from comfyui_personalize.headless.tiny import randomise_weights

TINY_UNET = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    adm_in_channels=None, in_channels=4, model_channels=32, num_res_blocks=[1, 1], transformer_depth=[1, 1],
    channel_mult=[1, 2], transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=768,
    num_heads=2, num_head_channels=-1, transformer_depth_output=[1, 1, 1, 1], use_temporal_resblock=False,
    use_temporal_attention=False,
)
TINY_CLIP = {"architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu", "hidden_size": 768,
             "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2, "layer_norm_eps": 1e-5,
             "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 768,
             "bos_token_id": 0, "eos_token_id": 49407, "pad_token_id": 1, "model_type": "clip_text_model"}
TINY_VAE = {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3,
            "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [],
            "dropout": 0.0}}


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Random weights made inside inference mode, as ComfyUI loads weights inside a node."""
    with torch.inference_mode():
        randomise_weights(module, seed, std=0.05)


@torch.inference_mode()  # reads weights ComfyUI moved (no version counter) without autograd bookkeeping
def weights_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().to("cpu", copy=True).reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()



TINY_SDXL = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=32, num_res_blocks=[1, 1],
    transformer_depth=[0, 1], channel_mult=[1, 2], transformer_depth_middle=1, use_linear_in_transformer=True,
    context_dim=2048, num_head_channels=16, transformer_depth_output=[0, 0, 1, 1], use_temporal_resblock=False,
    use_temporal_attention=False,
)


def tiny_unet_patcher(config_class, unet_config: dict, seed: int):
    """A ModelPatcher around a toy UNet built the way ComfyUI builds one, weights made in inference mode."""
    import comfy.model_management as mm
    import comfy.model_patcher

    cfg = config_class(dict(unet_config))
    cfg.unet_config.update(unet_config)
    with torch.inference_mode():
        base = cfg.get_model({}, "model.diffusion_model.")
    randomise(base, seed)
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def assert_sampled_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> None:
    """Two samplings that should give the same image, computed in another order. CPU: element by element at
    (atol, rtol). GPU: kernels round differently per shape and order, and a toy model with random weights amplifies
    that over the steps to a few 1e-3 at single elements; the image as a whole must stay within 1e-3 of its norm."""
    import comfy.model_management as mm

    if mm.get_torch_device().type == "cpu":
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
    else:
        error = ((actual.float() - expected.float()).norm() / expected.float().norm()).item()
        assert error < 1e-3, f"relative error {error:.2e} of the sampled images"
