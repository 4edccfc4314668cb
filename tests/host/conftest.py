"""Host tier: real ComfyUI modules in this process (CPU), with tiny ComfyUI-native models built in code."""
import functools
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from comfy_tiny import TINY_CLIP, TINY_UNET, TINY_VAE, randomise

COMFYUI_PATH = Path(os.environ.get("COMFYUI_PATH", "/opt/comfyui-host"))


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """Import ComfyUI (CPU mode) once, with models/ folders under a temp dir."""
    if str(COMFYUI_PATH) not in sys.path:
        sys.path.insert(0, str(COMFYUI_PATH))
    # PERSONALIZE_HOST_DEVICE=cuda runs this tier on a GPU (the CUDA-graph, channels-last training path).
    on_cpu = os.environ.get("PERSONALIZE_HOST_DEVICE", "cpu") == "cpu"
    argv, sys.argv = sys.argv, [sys.argv[0]] + (["--cpu"] if on_cpu else [])
    try:
        import comfy.options
        comfy.options.enable_args_parsing()
        import comfy.model_management  # noqa: F401  (parses --cpu)
    finally:
        sys.argv = argv
    import folder_paths
    models = tmp_path_factory.mktemp("models")
    for kind in ("loras", "embeddings", "checkpoints"):
        (models / kind).mkdir()
        folder_paths.folder_names_and_paths[kind] = ([str(models / kind)], folder_paths.supported_pt_extensions)
    import nodes
    return types.SimpleNamespace(nodes=nodes, folder_paths=folder_paths, models=models)


@pytest.fixture(scope="session")
def tiny_sd15(comfy):
    """(MODEL, CLIP, VAE) built the way ComfyUI builds SD1.5, at toy size, weights made in inference mode."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models
    from comfy.supported_models_base import ClipTarget

    cfg = comfy.supported_models.SD15(dict(TINY_UNET))
    cfg.unet_config.update(TINY_UNET)
    with torch.inference_mode():
        base = cfg.get_model({}, "model.diffusion_model.")
    randomise(base, 1)
    model = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                             offload_device=mm.unet_offload_device())
    clip_model = functools.partial(comfy.sd1_clip.SDClipModel, textmodel_json_config=TINY_CLIP)
    target = ClipTarget(comfy.sd1_clip.SD1Tokenizer,
                        functools.partial(comfy.sd1_clip.SD1ClipModel, clip_model=clip_model))
    with torch.inference_mode():
        clip = comfy.sd.CLIP(target=target)
        vae = comfy.sd.VAE(sd={}, config={"params": TINY_VAE})
    randomise(clip.cond_stage_model, 2)
    randomise(vae.first_stage_model, 3)
    return model, clip, vae
