"""ComfyUI side of the attention edits: block keys, batch chunks, timing by sigma and chained patches.

Every edit goes through ModelPatcher hooks on a clone (``set_model_attn1/attn2_patch``, ``_replace``,
``_output_patch``); the math lives in ``attention/``. A replace patch calls whatever replace was already on that
key (IPAdapter and others) or ComfyUI's fused ``optimized_attention``, so patches chain and the fused kernel
stays in use.
"""
from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator

import comfy.ldm.modules.attention as comfy_attention
import torch
from comfy.ldm.modules.attention import BasicTransformerBlock, SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy.patcher_extension import CallbacksMP, WrappersMP

from ..training.errors import InputError

log = logging.getLogger(__name__)
COND, UNCOND = 0, 1
APPLY_TO = {"cond": (COND,), "uncond": (UNCOND,), "both": (COND, UNCOND)}


@dataclass(frozen=True)
class Block:
    """One transformer block of the UNet and its ComfyUI patch key ``(name, id, index)``."""

    key: tuple[str, int, int]
    module: BasicTransformerBlock
    path: str = ""  # its attribute path in the ModelPatcher's model ("diffusion_model.input_blocks.4.1...")


def require_unet(model, input_name: str = "model") -> UNetModel:
    unet = getattr(model.model, "diffusion_model", None)
    if not isinstance(unet, UNetModel):
        kind = type(model.model).__name__
        raise InputError(input_name, f"attention control works on SD1.x, SD2.x and SDXL UNets; this model is a "
                                     f"{kind} ({type(unet).__name__}), whose attention has no such hooks")
    return unet


def transformer_blocks(model) -> list[Block]:
    """Every BasicTransformerBlock with the key ComfyUI's UNet gives it, enumerated from the loaded model."""
    unet = require_unet(model)
    groups = [("input", i, b, f"input_blocks.{i}") for i, b in enumerate(unet.input_blocks)]
    groups += [("middle", 0, unet.middle_block, "middle_block")]
    groups += [("output", i, b, f"output_blocks.{i}") for i, b in enumerate(unet.output_blocks)]
    found = []
    for name, number, block, path in groups:
        for at, layer in enumerate(block):
            if isinstance(layer, SpatialTransformer):
                found += [Block((name, number, j), tb, f"diffusion_model.{path}.{at}.transformer_blocks.{j}")
                          for j, tb in enumerate(layer.transformer_blocks)]
    if not found:
        raise InputError("model", "this UNet has no cross-attention transformer blocks to edit")
    return found


# (sigma_high, sigma_low) that no sigma lies in
EMPTY_WINDOW = (-math.inf, math.inf)


def check_fraction(value: float, name: str) -> float:
    """A fraction in [0, 1]. ComfyUI's range check lets NaN through (its comparisons are false for NaN), as it does
    any value that arrives through a link."""
    if not 0.0 <= value <= 1.0:
        raise InputError(name, f"must be between 0 and 1, got {value}")
    return value


def percent_window(model, start: float, end: float, names: tuple[str, str]) -> tuple[float, float]:
    """(sigma_high, sigma_low) for a start/end fraction of sampling, through the model's own schedule. A window
    of no width is off (EMPTY_WINDOW), as the self-attention windows always were: inclusive at both ends, it held
    the one step whose sigma sat exactly on it."""
    if not 0.0 <= start <= end <= 1.0:
        raise InputError(names[0], f"the window must satisfy 0 <= {names[0]} <= {names[1]} <= 1 "
                                   f"(got {start} and {end})")
    if start == end:
        return EMPTY_WINDOW
    sampling = model.get_model_object("model_sampling")
    return float(sampling.percent_to_sigma(start)), float(sampling.percent_to_sigma(end))


_last_sigma: list = [None, 0.0]  # (the sampler's sigmas tensor of this call, its max as a float)


def current_sigma(extra_options: dict) -> float | None:
    """The sigma of this model call. Reading a device tensor synchronises the host with the GPU, so it is read
    once per call of the model (every block of that call shares the same ``sigmas`` tensor), not per layer."""
    sigmas = extra_options.get("sigmas")
    if sigmas is None:
        return None
    if sigmas is not _last_sigma[0]:
        _last_sigma[:] = [sigmas, float(sigmas.max())]
    return _last_sigma[1]


def in_window(extra_options: dict, window: tuple[float, float]) -> bool:
    sigma = current_sigma(extra_options)
    return sigma is None or window[1] <= sigma <= window[0]


_SAMPLED_AS = {COND: "positive", UNCOND: "negative"}  # the CFG guider's conds feeding each chunk kind
# Guiders whose model calls number the positive 0 and the negative 1 (cond_or_uncond, by place in the list they
# pass calc_cond_batch): CFGGuider / KSampler, BasicGuider, PerpNegGuider. DualCFGGuider passes [negative, middle,
# positive], so a patch reading 0 as the positive would edit the negative.
_ORDERED_GUIDER_CONDS = {"positive", "negative", "empty_negative_prompt"}


def check_guider(executor) -> None:
    """In an OUTER_SAMPLE wrapper: refuse a guider that may number its prompts otherwise."""
    other = sorted(set(getattr(executor.class_obj, "conds", None) or {}) - _ORDERED_GUIDER_CONDS)
    if other:
        raise InputError("model", f"the sampler's guider has prompts named {', '.join(other)} besides positive and "
                                  "negative (DualCFGGuider, or another pack's guider), which it orders its own way, "
                                  "so this node's edit would land on another prompt; sample this MODEL with "
                                  "KSampler, CFGGuider or BasicGuider")


def sampled_prompts(executor, kind: int) -> list[torch.Tensor]:
    """In an OUTER_SAMPLE wrapper: the cross-attention prompts the guider (``executor.class_obj``) samples for a
    chunk kind (COND: its positive conditionings, UNCOND: its negative ones)."""
    conds = (getattr(executor.class_obj, "conds", None) or {}).get(_SAMPLED_AS[kind]) or ()
    return [c["cross_attn"] for c in conds if c.get("cross_attn") is not None]


def check_prompt_lengths(model, lengths: dict[int, int], input_name: str, what: str, fix: str) -> None:
    """OUTER_SAMPLE wrapper on ``model`` (a clone): before the run loads or computes anything, every conditioning the
    sampler was given for a chunk kind in ``lengths`` (COND: its positive, UNCOND: its negative) must have that many
    tokens. A patch made for a prompt of another length would be tiled over it (ComfyUI repeats a short prompt to
    the longer one's length when it batches them) or fail inside a layer with no hint. The guider is checked too
    (``check_guider``)."""
    def wrapper(executor, *args, **kwargs):
        check_guider(executor)
        for kind, length in lengths.items():
            for got in sampled_prompts(executor, kind):
                if got.shape[1] != length:
                    raise InputError(input_name, f"{what} has {length} tokens and the {_SAMPLED_AS[kind]} "
                                                 f"conditioning sampled with it {got.shape[1]} ({length // 77} vs "
                                                 f"{got.shape[1] // 77} chunks of 77); {fix}")
        return executor(*args, **kwargs)
    model.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, "personalize_prompt_lengths", wrapper)


def is_prompt(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether a sampled cross-attention prompt is ``expected`` (its rows, repeated over the sampler's batch)."""
    rows = expected.shape[0]
    return (got.shape[1:] == expected.shape[1:] and got.shape[0] % rows == 0
            and torch.equal(got.to(expected.device, expected.dtype), expected.repeat(got.shape[0] // rows, 1, 1)))


def warn_if_prompt_differs(model, own: dict[int, torch.Tensor], node: str, inputs: dict[int, str]) -> None:
    """OUTER_SAMPLE wrapper: a warning when the sampler's positive/negative (per chunk kind in ``own``) is not the
    prompt the node encoded: a patch laid out on that prompt's token positions would act on other words, with no
    error (the usual slip: a prompt from one's own text encoder, only the MODEL wire re-routed)."""
    def wrapper(executor, *args, **kwargs):
        for kind, expected in own.items():
            for got in sampled_prompts(executor, kind):
                if not is_prompt(got, expected):
                    log.warning("%s: the %s conditioning the sampler got is not this node's %s (its words sit at "
                                "other token positions, so the edit acts on other words); connect this node's "
                                "%s output", node, _SAMPLED_AS[kind], inputs[kind], _SAMPLED_AS[kind])
        return executor(*args, **kwargs)
    model.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, f"personalize_prompt_check_{node}", wrapper)


def chunks(extra_options: dict, batch: int) -> Iterator[tuple[int, slice]]:
    """(cond_or_uncond id, rows) of each chunk the sampler batched together: 0 = positive, 1 = negative,
    others = extra conds of custom guiders. Never by position: ComfyUI orders them as it likes."""
    kinds = extra_options.get("cond_or_uncond") or [COND]
    size = batch // len(kinds)
    for i, kind in enumerate(kinds):
        yield kind, slice(i * size, (i + 1) * size)


def row_kinds(extra_options: dict, batch: int) -> list[int]:
    """The cond_or_uncond id of each of the ``batch`` rows (``chunks``, row by row)."""
    return [kind for kind, rows in chunks(extra_options, batch) for _ in range(rows.stop - rows.start)]


def fused_attention(extra_options: dict, previous: Callable | None = None):
    """(q, k, v) -> out on the host's kernel: the replace patch already on this key, else optimized_attention."""
    if previous is not None:
        return lambda q, k, v: previous(q, k, v, extra_options)
    heads = extra_options["n_heads"]
    precision = extra_options.get("attn_precision")
    return lambda q, k, v: comfy_attention.optimized_attention(q, k, v, heads, attn_precision=precision,
                                                               transformer_options=extra_options)


def masked_attention(extra_options: dict):
    """Fused attention with an additive logit bias [B, 1, Nk] (every backend takes float masks)."""
    heads = extra_options["n_heads"]
    precision = extra_options.get("attn_precision")
    return lambda q, k, v, mask: comfy_attention.optimized_attention_masked(
        q, k, v, heads, mask=mask, attn_precision=precision, transformer_options=extra_options)


def existing_replace(model, kind: str, key: tuple[str, int, int]) -> Callable | None:
    """The replace patch ComfyUI would use for this key now (3-part key first, then the 2-part one)."""
    table = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get(kind, {})
    return table.get(key) or table.get(key[:2])


def direct_layer(model, block: Block):
    """The object patch standing in for ``block``'s attn2 on ``model`` when it is one of ours that can go back to
    the replace route (the Dual-Path blend's direct layer, which has ``demote``), else None."""
    layer = model.get_model_object(f"{block.path}.attn2")
    return layer if callable(getattr(layer, "demote", None)) else None


def replaces_cross_attention(model, block: Block) -> bool:
    """True when something on ``model`` already stands in for ``block``'s cross-attention: a replace or our layer."""
    return existing_replace(model, "attn2", block.key) is not None or direct_layer(model, block) is not None


_OUR_REPLACES: weakref.WeakSet = weakref.WeakSet()  # every replace this pack made (functions: clones share them)
_INSTALLED = "personalize_replaces"  # transformer_options: {(kind, block key): node} of the replaces to keep


def set_replace(model, kind: str, block: Block, make: Callable[[Callable | None], Callable],
                node: str | None = None) -> None:
    """Install ``make(previous)`` as the ``kind`` ("attn1"/"attn2") replace of ``block`` on ``model`` (a clone).
    A direct layer of ours on the block goes back to the replace route first, so that ``make`` chains it: ComfyUI
    would skip the layer's own forward under a replace. ``node``: a run whose model has another pack's replace
    over this one (added after it, which drops it) is refused naming that node."""
    layer = direct_layer(model, block) if kind == "attn2" else None
    if layer is not None:
        layer.demote(model)
    previous = existing_replace(model, kind, block.key)
    setter = model.set_model_attn1_replace if kind == "attn1" else model.set_model_attn2_replace
    replace = make(previous)
    setter(replace, *block.key)
    _OUR_REPLACES.add(replace)
    if node is not None:
        model.model_options["transformer_options"].setdefault(_INSTALLED, {})[(kind, block.key)] = node
        if _refuse_dropped_replaces not in model.get_callbacks(CallbacksMP.ON_PRE_RUN, _INSTALLED):
            model.add_callback_with_key(CallbacksMP.ON_PRE_RUN, _INSTALLED, _refuse_dropped_replaces)


def _refuse_dropped_replaces(patcher, *_) -> None:
    """ON_PRE_RUN: each block's replace must still be one of ours (ours chain what was there before them; IPAdapter,
    SAG and others set theirs over what is there, so a node applied after ours drops our edit there, silently)."""
    installed = patcher.model_options.get("transformer_options", {}).get(_INSTALLED, {})
    dropped: dict[str, set] = {}
    for (kind, key), node in installed.items():
        if existing_replace(patcher, kind, key) not in _OUR_REPLACES:
            dropped.setdefault(node, set()).add((kind, key))
    if dropped:
        node, keys = next(iter(dropped.items()))
        kinds = " and ".join(sorted({"self-attention" if k == "attn1" else "cross-attention" for k, _ in keys}))
        raise InputError("model", f"a node applied after {node} replaces {kinds} on {len(keys)} of its layers "
                                  f"(IPAdapter, Self-Attention Guidance or similar), which would drop {node}'s edit "
                                  f"there; apply {node} after that node")


def install_patch_once(model, name: str, patch) -> None:
    """Append ``patch`` to the clone's ``name`` patch list unless it is there (blends share the stash)."""
    patches = model.model_options.setdefault("transformer_options", {}).setdefault("patches", {})
    if patch not in patches.get(name, []):
        patches[name] = patches.get(name, []) + [patch]  # a new list, as ComfyUI's own setters make


def install_patch_first(model, name: str, patch) -> None:
    """``patch`` at the front of the clone's ``name`` patch list: it must see the block's own tensors before another
    pack's patch reshapes them (HyperTile, ToMe) or stashes them (the Dual-Path blend's pre-projection stash)."""
    patches = model.model_options.setdefault("transformer_options", {}).setdefault("patches", {})
    # a new list, as ComfyUI's own setters make (a clone deep-copies model_options: the input keeps its own)
    patches[name] = [patch] + [p for p in patches.get(name, []) if p is not patch]


def downscale(extra_options: dict) -> int:
    """How many times smaller than the latent this block's feature map is (1, 2, 4, 8)."""
    latent = extra_options.get("original_shape")
    here = extra_options.get("activations_shape")
    if not latent or not here:
        return 1
    return max(1, round(latent[-1] / here[-1]))


def paired_rows(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """Source and target rows of a chunk laid out as [src0, tgt0, src1, tgt1, ...] (the paired batch)."""
    idx = torch.arange(rows.start, rows.stop)
    if len(idx) % 2:
        raise InputError("latent", "the paired source/target batch lost its pairing (odd batch); feed the LATENT "
                                   "of the P2P (or p2p_locked Reweight) node straight into the sampler")
    return idx[0::2], idx[1::2]


_pair_index: dict = {}


def paired_index(extra_options: dict, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(source rows, target rows) of every positive chunk as index tensors on ``device``, built once per batch
    layout: a fresh CPU index per layer would be a host-to-device copy, which waits for the GPU."""
    kinds = tuple(extra_options.get("cond_or_uncond") or [COND])
    key = (kinds, batch, device)
    if key not in _pair_index:
        pairs = [paired_rows(rows) for kind, rows in chunks(extra_options, batch) if kind == COND]
        src = torch.cat([s for s, _ in pairs]) if pairs else torch.zeros(0, dtype=torch.long)
        tgt = torch.cat([t for _, t in pairs]) if pairs else torch.zeros(0, dtype=torch.long)
        _pair_index[key] = (src.to(device), tgt.to(device))
    return _pair_index[key]


_LAYOUTS = {  # (batch, source rows, target rows) -> the rows of an attention call, on the host
    "plain": lambda batch, src, tgt: torch.arange(batch),
    # each target row of a positive chunk takes its source row (q/k of the source), every other row itself
    "sources": lambda batch, src, tgt: torch.arange(batch).index_copy(0, tgt, src),
    # every row, then one more row per target: its source's
    "extended": lambda batch, src, tgt: torch.cat([torch.arange(batch), src]),
    # the positive chunks' pairs: their sources, then their targets
    "pairs": lambda batch, src, tgt: torch.cat([src, tgt]),
}


def call_rows(extra_options: dict, batch: int, device, layout: str, then_pairs: bool = False) -> torch.Tensor | None:
    """The row index (on ``device``) that ``x.index_select(0, it)`` gathers for an attention call laid out as
    ``layout`` (``_LAYOUTS``), with ``then_pairs`` followed by the "pairs" rows (local blend's maps, recorded in the
    same call); None for "plain" alone (the rows as they are). Built on the host once per batch layout (a fresh
    index in every layer would be a host-to-device copy, which waits for the GPU)."""
    if layout == "plain" and not then_pairs:
        return None
    kinds = tuple(extra_options.get("cond_or_uncond") or [COND])
    key = (layout, then_pairs, kinds, batch, device)
    if key not in _pair_index:
        src, tgt = paired_index(extra_options, batch, "cpu")
        rows = _LAYOUTS[layout](batch, src, tgt)
        _pair_index[key] = (torch.cat([rows, src, tgt]) if then_pairs else rows).to(device)
    return _pair_index[key]
