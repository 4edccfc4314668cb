"""The LoRA factors the Dual-Path blend adds in each attention layer, read from any LoRA file ComfyUI's LoraLoader
reads (kohya with diffusers or ldm block names, diffusers/peft lora_A/lora_B, ComfyUI's own trainer's keys):
through ComfyUI's own key map and loader, so a file that LoraLoader applies is never refused for its naming. What
the blend cannot add beside the weights (DoRA, LoHa, LoKr, full diffs) is refused by name; what lies outside the
attention projections is reported, since a = 1 is then not the LoRA's model."""
from __future__ import annotations

from dataclasses import dataclass, field

import comfy.lora
import torch
from comfy.weight_adapter import LoRAAdapter

from ..attention.dual_path import AttentionDeltas, LowRankDelta
from ..training.errors import InputError
from ..training.files import BUNDLED_EMBEDDING
from .attention_hooks import Block

_PROJ = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "out"}
ATTENTIONS = ("attn1", "attn2")


@dataclass
class LoraParts:
    """``deltas[attn][block key]``: the factors on that block's attention ("attn1"/"attn2"); ``left_out``: the UNet
    weights the LoRA also changes (feed-forward, projections around the blocks); ``not_unet``: how many of its keys
    are for no weight of this UNet (a text encoder, another model)."""

    deltas: dict[str, dict[tuple, AttentionDeltas]] = field(default_factory=lambda: {a: {} for a in ATTENTIONS})
    left_out: list[str] = field(default_factory=list)
    not_unet: int = 0

    def count(self, attn: str) -> int:
        return len(self.deltas[attn])


def _low_rank(patch, key: str) -> LowRankDelta:
    if not isinstance(patch, LoRAAdapter):
        kind = getattr(patch, "name", None) or (patch[0] if isinstance(patch, tuple) else type(patch).__name__)
        raise InputError("lora_name", f"the LoRA changes {key} as a {kind} patch, which is not a pair of low-rank "
                                      "factors; the Dual-Path blend adds up/down factors beside the base weights: "
                                      "use a plain LoRA, or merge this one with LoraLoader")
    up, down, alpha, mid, dora_scale, _reshape = patch.weights
    if dora_scale is not None:
        raise InputError("lora_name", f"the LoRA is a DoRA ({key} has a dora_scale): it renormalises the whole "
                                      "weight, which cannot be split into a base path and a LoRA path; use a plain "
                                      "LoRA, or merge this one with LoraLoader")
    if mid is not None:
        raise InputError("lora_name", f"the LoRA has a mid factor on {key} (LoCon); the blend needs up/down pairs")
    return LowRankDelta.from_weights(down.float().flatten(1), up.float().flatten(1),
                                     None if alpha is None else float(alpha))


def lora_parts(model, lora: dict, blocks: list[Block]) -> LoraParts:
    """Split ``lora`` (a state dict) into per-block attention deltas and what the blend leaves out."""
    patches = comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_unet(model.model, {}), log_missing=False)
    loaded = set().union(*(getattr(p, "loaded_keys", ()) for p in patches.values()))
    # a bundled word is not a weight the blend leaves out: the soft prompt carries it
    parts = LoraParts(not_unet=sum(k not in loaded and not k.startswith(BUNDLED_EMBEDDING) for k in lora))
    for block in blocks:
        for attn in ATTENTIONS:
            found = {}
            for path, proj in _PROJ.items():
                key = f"{block.path}.{attn}.{path}.weight"
                if key in patches:
                    found[proj] = _low_rank(patches.pop(key), key)
            if found:
                parts.deltas[attn][block.key] = AttentionDeltas(**found)
    parts.left_out = sorted(patches)
    return parts


def left_out_note(parts: LoraParts, paths: str) -> str | None:
    """What a = 1 misses of the LoRA's model, in words, or None when the blend covers all of it."""
    notes = []
    if paths == "cross" and parts.count("attn1"):
        notes.append("its self-attention (attn1) factors, which paths='cross' leaves out (use paths='self+cross')")
    if parts.left_out:
        shown = ", ".join(k.removeprefix("diffusion_model.").removesuffix(".weight") for k in parts.left_out[:3])
        notes.append(f"{len(parts.left_out)} UNet weights outside attention q/k/v/out (e.g. {shown})")
    if parts.not_unet:
        notes.append(f"{parts.not_unet} keys for no weight of this UNet (text encoder: load the LoRA on the CLIP "
                     "that encodes the soft prompt)")
    if not notes:
        return None
    return "the blend leaves out " + "; ".join(notes) + ", so even a_blend 1 is not the LoRA's model"


def already_applied(model, lora: dict) -> int:
    """How many of the LoRA's attention factors the MODEL already carries as weight patches (a LoraLoader, or a
    trainer's MODEL output, before the blend): both paths would then carry them and a = 1 count them twice."""
    patches = comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_unet(model.model, {}), log_missing=False)
    same = 0
    for key, patch in patches.items():
        if not isinstance(patch, LoRAAdapter) or not any(f".{attn}." in key for attn in ATTENTIONS):
            continue
        up, down = patch.weights[:2]
        # strength 0: LoraLoader's way of loading a LoRA on the CLIP alone; the weights carry nothing of it
        same += any(p[0] != 0 and isinstance(p[1], LoRAAdapter) and _same(p[1].weights[0], up)
                    and _same(p[1].weights[1], down) for p in model.patches.get(key, ()))
    return same


def _same(a, b) -> bool:
    """Equal factors, compared in the coarser of the two dtypes (a LoRA saved in fp16 and its fp32 original)."""
    if a.shape != b.shape:
        return False
    coarse = max(a.dtype, b.dtype, key=lambda dtype: torch.finfo(dtype).eps)
    return torch.equal(a.to(b.device, coarse), b.to(coarse))


def tuned_blend_note(metadata: dict, a_blend: float) -> str | None:
    """A LoRA tuned through the blend (Fast Tune's a_blend, in its metadata) learned the subject at that a: sampled at
    another, its likeness is not what the tuning reached."""
    tuned = metadata.get("personalize.fast_tune_a_blend")
    try:
        tuned = float(tuned)
    except (TypeError, ValueError):
        return None
    if tuned >= 1.0 or abs(tuned - a_blend) < 0.005:
        return None
    more = "more" if a_blend > tuned else "less"
    return (f"the LoRA was tuned through the blend at a = {tuned:.2f} (Fast Tune's a_blend); at a_blend {a_blend:.2f} "
            f"the image shows {more} of the subject than the tuning reached: set a_blend to {tuned:.2f} to sample what "
            "was tuned")

