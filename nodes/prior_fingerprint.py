"""What makes a cached class-image set belong to this MODEL/CLIP/VAE: base weights, weight patches, object patches
and model options (sampling patches, wrappers), walked into one key."""
from __future__ import annotations

import functools
import inspect
import types
import uuid

import torch
from torch import nn

from ..training.prior_cache import cache_key, tensor_fingerprint


class _Walk:
    """Walk patch values (tuples, dicts, weight-adapter objects, modules, functions) into named tensors and a
    text description. Depth- and size-limited: a patch object may point back at its model."""

    MAX_DEPTH, MAX_ITEMS = 10, 50_000  # FreeU's settings sit 9 deep (model_options > ... > closure > dict)

    def __init__(self):
        self.tensors: list[tuple[str, torch.Tensor]] = []
        self.text: list[str] = []
        self.items = 0

    def __call__(self, value, prefix: str = "", depth: int = 0) -> None:
        self.items += 1
        if isinstance(value, torch.Tensor):
            self.tensors.append((prefix, value))
        elif value is None or isinstance(value, (bool, int, float, str)):
            self.text.append(f"{prefix}={value!r}")
        elif depth >= self.MAX_DEPTH or self.items > self.MAX_ITEMS or isinstance(value, uuid.UUID):
            # (a UUID names an object, a ModelPatcher's patches_uuid say: new for every clone, no setting)
            self.text.append(f"{prefix}:{type(value).__qualname__}")
        elif isinstance(value, nn.Module):
            self.text.append(f"{prefix}:{type(value).__qualname__}")
            self.tensors.extend((f"{prefix}.{k}", v) for k, v in value.state_dict(keep_vars=True).items())
        elif isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                self(item, f"{prefix}[{i}]", depth + 1)
        elif isinstance(value, dict):
            for k in sorted(value, key=str):
                self(value[k], f"{prefix}[{k}]", depth + 1)
        elif isinstance(value, functools.partial):
            self.text.append(f"{prefix}:partial")
            self((value.func, value.args, value.keywords), f"{prefix}.partial", depth + 1)
        elif inspect.isroutine(value):  # functions by name: their repr holds a memory address
            self.text.append(f"{prefix}:{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', '')}")
            # and by the settings a patch keeps in its closure, defaults or bound object (RescaleCFG's multiplier,
            # FreeU's b1/b2/s1/s2): the same function with other settings makes other images
            self((_closure_values(value), getattr(value, "__defaults__", None),
                  getattr(value, "__kwdefaults__", None), _bound_object(value)), f"{prefix}.settings", depth + 1)
        else:
            self.text.append(f"{prefix}:{type(value).__module__}.{type(value).__qualname__}")
            for k, v in sorted(getattr(value, "__dict__", {}).items()):
                self(v, f"{prefix}.{k}", depth + 1)


def _closure_values(function) -> list:
    values = []
    for cell in getattr(function, "__closure__", None) or ():
        try:
            values.append(cell.cell_contents)
        except ValueError:  # a cell not yet filled
            values.append(None)
    return values


def _bound_object(function):
    """The object a method is bound to; not a module or class (a builtin's __self__), whose contents are code."""
    owner = getattr(function, "__self__", None)
    return None if isinstance(owner, (types.ModuleType, type)) else owner


def _unpatched_weights(module: nn.Module, patcher, prefix: str):
    """The module's weights as they are without the patcher's patches: while a patched clone is loaded,
    ComfyUI keeps the patched values in the shared module and the originals in ``patcher.backup``."""
    backup = getattr(patcher, "backup", None) or {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        saved = backup.get(prefix + name)
        yield name, saved.weight if saved is not None else tensor


def patcher_fingerprint(module: nn.Module, patcher, prefix: str, extra: dict | None = None) -> str:
    """Base weights + the patcher's weight patches (keys, strengths, patch tensors), object patches and
    model options (sampling patches, wrappers) + ``extra``."""
    walk = _Walk()
    parts = {"patches": getattr(patcher, "patches", {}), "object_patches": getattr(patcher, "object_patches", {}),
             "model_options": getattr(patcher, "model_options", {}),
             "weight_wrapper_patches": getattr(patcher, "weight_wrapper_patches", {}), "extra": extra or {}}
    walk(parts)
    with torch.inference_mode():
        base = tensor_fingerprint(_unpatched_weights(module, patcher, prefix))
        return cache_key({"base": base, "patches": tensor_fingerprint(walk.tensors), "text": walk.text})


def model_fingerprints(model, clip, vae) -> dict[str, str]:
    return {
        "model": patcher_fingerprint(model.model.diffusion_model, model, "diffusion_model."),
        "clip": patcher_fingerprint(clip.cond_stage_model, clip.patcher, "", {"layer_idx": clip.layer_idx}),
        "vae": patcher_fingerprint(vae.first_stage_model, getattr(vae, "patcher", None), ""),
    }
