"""Reading ImageReward checkpoints without running pickled code, the official -> port key map, and the
one-time conversion to safetensors."""
from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..training.errors import InputError
from ..training.files import save_safetensors_atomic
from .model import REWARD_MEAN, REWARD_STD, build_model

log = logging.getLogger(__name__)

# Keys of the official file that the reward does not use: a buffer BLIP saves, and BLIP's contrastive
# projections (ImageReward never calls them).
DROPPED_OFFICIAL = re.compile(r"^(blip\.text_encoder\.embeddings\.position_ids"
                              r"|blip\.(vision|text)_proj\.(weight|bias))$")
DROPPED_PORT = {"text.embeddings.position_ids"}
_VISION_BLOCK = {"norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
                 "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_VISION_TOP = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
               "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
               "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
               "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)$")
_PORT_PREFIXES = ("vision.", "text.", "mlp.layers.")
_OFFICIAL_PREFIXES = ("blip.visual_encoder.", "blip.text_encoder.", "mlp.layers.")
_OTHER_MODELS = (("model.diffusion_model.", "a Stable Diffusion checkpoint"),
                 ("lora_unet_", "a LoRA"), ("lora_te", "a LoRA"), ("text_model.", "a CLIP text encoder"),
                 ("visual.", "a CLIP/OpenCLIP model"), ("vision_model.", "a CLIP/SigLIP vision model"))


def _describe_other(keys: list[str]) -> str:
    for prefix, what in _OTHER_MODELS:
        if any(k.startswith(prefix) or f".{prefix}" in k for k in keys[:2000]):
            return f"it looks like {what}; "
    return ""


def _not_image_reward(name: str, keys: list[str]) -> InputError:
    sample = ", ".join(keys[:3]) or "no tensors"
    return InputError("checkpoint", f"{name} is not an ImageReward checkpoint ({_describe_other(keys)}its keys "
                      f"start {sample}; ImageReward has blip.visual_encoder.*, blip.text_encoder.* and "
                      "mlp.layers.*). Use ImageReward.pt from THUDM/ImageReward or its safetensors conversion")


def _vision_key(rest: str) -> str | None:
    if rest in _VISION_TOP:
        return "vision." + _VISION_TOP[rest]
    m = _BLOCK_KEY.match(rest)
    if m:
        return f"vision.encoder.layers.{m.group(1)}.{_VISION_BLOCK[m.group(2)]}.{m.group(3)}"
    return None


def without_ddp_prefix(state: dict) -> dict:
    """ImageReward's own training saves its DistributedDataParallel wrapper's state dict: every key ``module.*``."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def official_to_port(state: dict) -> dict:
    """Official keys -> the port's (``vision.*`` BlipVisionModel, ``text.*`` BlipTextModel, ``mlp.*``),
    dropping position_ids / vision_proj / text_proj. A state already in port keys passes through (its
    position_ids dropped). Keys that belong to neither layout -> InputError listing them."""
    keys = list(state)
    state = without_ddp_prefix(state)
    port, unknown = {}, []
    for key, value in state.items():
        if DROPPED_OFFICIAL.match(key) or key in DROPPED_PORT:
            continue
        if key.startswith("blip.visual_encoder."):
            new = _vision_key(key[len("blip.visual_encoder."):])
        elif key.startswith("blip.text_encoder."):
            new = "text." + key[len("blip.text_encoder."):]
        elif key.startswith(_PORT_PREFIXES):
            new = key
        else:
            new = None
        if new is None:
            unknown.append(key)
        else:
            port[new] = value
    if not port:
        raise _not_image_reward("the checkpoint", keys)
    if unknown:
        raise InputError("checkpoint", f"has {len(unknown)} keys that ImageReward does not have "
                         f"(e.g. {', '.join(unknown[:8])}): a different or modified model")
    return port


def _unwrap(obj, name: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict):
        raise InputError("checkpoint", f"{name} holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format


def read_checkpoint(path) -> dict[str, torch.Tensor]:
    """The tensors of an ImageReward checkpoint, on the CPU (memory-mapped where the format allows).

    ``.safetensors`` via safetensors; anything else via ``torch.load(weights_only=True)``, which refuses
    pickled code (the file is then rejected, nothing in it runs). ``{"state_dict": ...}`` and
    ``{"model": ...}`` wrappers are unwrapped. A file of another model -> InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError("checkpoint", f"{path} does not exist")
    try:
        if path.suffix.lower() == ".safetensors":
            state = load_file(str(path), device="cpu")
        else:
            state = _unwrap(_torch_load(path), path.name)
        state = without_ddp_prefix(state)
    except pickle.UnpicklingError as e:
        raise InputError("checkpoint", f"{path.name} contains code (pickled Python objects), not only tensors, "
                         "and will not be loaded: loading it could run that code. Use a trusted copy converted to "
                         "safetensors (e.g. load the official ImageReward.pt with torch where you can risk "
                         "it and save its state dict with safetensors.torch.save_file). "
                         f"Refused: {str(e).splitlines()[0][:300]}") from e
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise InputError("checkpoint", f"cannot read {path.name}: {e} (truncated download or not a "
                         "checkpoint?)") from e
    keys = list(state)
    if not any(k.startswith(_OFFICIAL_PREFIXES[:2]) or k.startswith(_PORT_PREFIXES[:2]) for k in keys) \
            or not any(k.endswith("mlp.layers.0.weight") for k in keys):
        raise _not_image_reward(path.name, keys)
    log.info("read ImageReward checkpoint %s: %d tensors", path, len(state))
    return state


def convert_to_safetensors(src, dst) -> Path:
    """``src`` (official .pt or any accepted checkpoint) -> ``dst`` in PORT keys (``vision.*`` =
    transformers BlipVisionModel, ``text.*`` = BlipTextModel, ``mlp.layers.*``), without the unused
    vision_proj/text_proj/position_ids. Checked against the architecture first, written atomically."""
    src, dst = Path(src), Path(dst)
    state = official_to_port(read_checkpoint(src))
    build_model({k: torch.empty_like(v, device="meta") for k, v in state.items()}, device="meta")  # strict check
    metadata = {"format": "pt", "personalize.model": "ImageReward", "personalize.keys": "port",
                "personalize.key_layout": "vision.*: transformers BlipVisionModel; text.*: BlipTextModel with "
                                          "cross-attention; mlp.layers.*: reward head",
                "personalize.source": src.name, "personalize.reward_mean": repr(REWARD_MEAN),
                "personalize.reward_std": repr(REWARD_STD)}
    out = save_safetensors_atomic({k: v.contiguous() for k, v in state.items()}, dst, metadata)
    log.info("converted %s -> %s (%d tensors, port keys)", src, out, len(state))
    return out
