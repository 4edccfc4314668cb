"""ComfyUI MODEL / CLIP / VAE as CheckpointLoader makes them, full size or toy size, with random weights drawn on the
weights' own device (speed and memory do not depend on the weights). Shared by the benchmarks; import after
ComfyUI is on sys.path and its args are parsed."""
from __future__ import annotations

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import torch

# comfy/sd1_clip_config.json (CLIP-L) keys changed for toy-size runs
TINY_CLIP = dict(num_hidden_layers=3, intermediate_size=128, num_attention_heads=4)
# SD's and SDXL's VAE (AutoencoderKL, 4 latent channels); the toy one is narrower
VAE_CONFIG = {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                                           "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                                           "attn_resolutions": [], "dropout": 0.0}}
TINY_VAE = {"embed_dim": 4, "ddconfig": dict(VAE_CONFIG["ddconfig"], ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1)}


@torch.no_grad()
def randomise_(module: torch.nn.Module, std: float = 0.02) -> None:
    """headless.tiny.randomise_weights drawn on the weights' own device (the SDXL UNet's 2.6 B values take tens
    of seconds on a CPU): matrices and kernels ~ N(0, std), 1-D weights 1, biases 0."""
    torch.manual_seed(0)
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, std)
        elif name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.zero_()


def comfy_model(config_class, unet_config: dict, dev: str):
    """A ModelPatcher as CheckpointLoader makes one on a GPU: built on the device, fp16 weights."""
    mc = config_class(dict(unet_config))
    mc.unet_config.update(unet_config)
    if dev == "cuda":
        mc.set_inference_dtype(torch.float16, None)
    model = mc.get_model({}, "model.diffusion_model.", device=mm.get_torch_device())
    randomise_(model)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def comfy_clip(config_class, unet_config: dict, tiny: bool):
    """The family's CLIP as CheckpointLoader makes it (SD1: CLIP-L; SDXL: CLIP-L + CLIP-G), with its tokenizers."""
    target = config_class(dict(unet_config)).clip_target()
    options = {f"{k}_model_config": dict(TINY_CLIP) for k in ("clip_l", "clip_g")} if tiny else {}
    clip = comfy.sd.CLIP(target=target, model_options=options)
    randomise_(clip.cond_stage_model)
    return clip


def comfy_vae(tiny: bool):
    vae = comfy.sd.VAE(sd={}, config={"params": TINY_VAE if tiny else VAE_CONFIG})
    randomise_(vae.first_stage_model)
    return vae
