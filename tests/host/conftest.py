"""Host tier: real ComfyUI modules in this process (CPU), with tiny ComfyUI-native models built in code."""
import functools
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from comfy_tiny import TINY_CLIP, TINY_UNET, TINY_VAE, randomise, tiny_unet_patcher

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
    if not on_cpu:
        # cuDNN's TF32 convolutions (torch's default) round to 1e-3 and differently per batch size; the checks
        # below compare batches of different sizes at fp32 tolerances
        torch.backends.cudnn.allow_tf32 = False
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
    import comfy.model_patcher
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models
    from comfy.supported_models_base import ClipTarget

    model = tiny_unet_patcher(comfy.supported_models.SD15, TINY_UNET, seed=1)
    clip_model = functools.partial(comfy.sd1_clip.SDClipModel, textmodel_json_config=TINY_CLIP)
    target = ClipTarget(comfy.sd1_clip.SD1Tokenizer,
                        functools.partial(comfy.sd1_clip.SD1ClipModel, clip_model=clip_model))
    with torch.inference_mode():
        clip = comfy.sd.CLIP(target=target)
        vae = comfy.sd.VAE(sd={}, config={"params": TINY_VAE})
    randomise(clip.cond_stage_model, 2)
    randomise(vae.first_stage_model, 3)
    return model, clip, vae
