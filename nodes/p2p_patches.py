"""Attention patches for reweighting and prompt-to-prompt, built on ``attention/edits.py``.

The paired batch: the P2P node gives the sampler a conditioning of two prompts and a latent batch laid out
[src0, tgt0, src1, tgt1, ...] with shared initial noise, so one sampling run makes the source and the edited
image. In positive chunks each target row takes the source row's maps (V-side, fused attention); source rows and
negative chunks run unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..attention import edits
from ..attention.local_blend import LocalBlend, blend
from .attention_hooks import (
    Block,
    call_rows,
    chunks,
    current_sigma,
    downscale,
    fused_attention,
    in_window,
    install_patch_first,
    masked_attention,
    paired_index,
    set_replace,
)
from .prompt_cache import PromptCache, cache_budget

Window = tuple[float, float]  # (sigma_high, sigma_low)


def _chunk_multiplier(extra_options: dict, batch: int, per_kind: dict[int, Callable], fill: float,
                      length: int) -> torch.Tensor:
    """[batch, length, 1] on the host: ``per_kind[kind](length)`` on the rows of each chunk of that kind (its own
    prompt's weights), ``fill`` elsewhere."""
    out = torch.full((batch, length, 1), fill)
    for kind, rows in chunks(extra_options, batch):
        if kind in per_kind:
            out[rows] = per_kind[kind](length)
    return out


class _LayoutCache(dict):
    """Per-call constants keyed by the batch layout, device and dtype: built on the host once, moved once (a
    host-to-device copy in every layer would wait for the GPU each time)."""

    def get_or_make(self, extra_options: dict, batch: int, length: int, like: torch.Tensor, make, tag=None):
        key = (tuple(extra_options.get("cond_or_uncond") or ()), batch, length, like.device, like.dtype, tag)
        if key not in self:
            self[key] = make().to(like.device, like.dtype)
        return self[key]


def value_reweight_patch(weights: dict[int, torch.Tensor], window: Window):
    """attn2_patch: scale the value rows of the weighted tokens (``weights``: per chunk kind, the weights of that
    prompt's tokens; other chunks unchanged), at zero extra cost."""
    cache = _LayoutCache()
    per_kind = {kind: (lambda n_, w=w: edits.scale_values(torch.ones(1, n_, 1), w)) for kind, w in weights.items()}

    def patch(n, context, value, extra_options):
        if not in_window(extra_options, window):
            return n, context, value
        batch, length = value.shape[:2]
        scale = cache.get_or_make(extra_options, batch, length, value, lambda: _chunk_multiplier(
            extra_options, batch, per_kind, 1.0, length))
        return n, context, value * scale
    return patch


def renormalized_replace(weights: dict[int, torch.Tensor], window: Window):
    """attn2 replace: softmax(q k^T + log w) on the chunks of the kinds in ``weights`` (each its prompt's weights),
    through the fused kernel's float mask."""
    biases = {kind: edits.log_weight_bias(w) for kind, w in weights.items()}
    per_kind = {kind: (lambda n_, b=b: edits.tile_tokens(b, n_).view(1, -1, 1)) for kind, b in biases.items()}
    cache = _LayoutCache()

    def make(previous):
        def replace(q, k, v, extra_options):
            if not in_window(extra_options, window):
                return fused_attention(extra_options, previous)(q, k, v)
            batch, length = k.shape[:2]
            mask = cache.get_or_make(extra_options, batch, length, q, lambda: _chunk_multiplier(
                extra_options, batch, per_kind, 0.0, length).transpose(1, 2).contiguous())
            return masked_attention(extra_options)(q, k, v, mask)
        return replace
    return make


@dataclass
class CrossPlan:
    """What the target takes from the source in cross-attention: mapper [L, L] (source x target), refinement
    alphas and equalizer [L], and the injection window of every target token (default + per-word)."""

    mapper: torch.Tensor
    refine_alphas: torch.Tensor
    equalizer: torch.Tensor
    window: Window
    token_windows: dict[int, Window] = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False)
    _last: tuple = field(default=(None, None), repr=False)  # (sigmas of the last model call, its window state)

    def _state(self, extra_options: dict) -> tuple:
        sigmas = extra_options.get("sigmas")
        if sigmas is not None and sigmas is self._last[0]:  # every layer of a model call shares its sigmas
            return self._last[1]
        state = (in_window(extra_options, self.window),
                 tuple(in_window(extra_options, w) for w in self.token_windows.values()))
        self._last = (sigmas, state)
        return state

    def coefficients(self, state: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_src, c_tgt) on the host for a window state (the default window's, then each word's)."""
        alpha = torch.full(self.mapper.shape[1:], float(state[0]))
        for pos, inside in zip(self.token_windows, state[1]):
            alpha[pos] = float(inside)
        return edits.coefficients(alpha, self.refine_alphas, self.equalizer)

    def operands(self, extra_options: dict, length: int, device, dtype) -> tuple | None:
        """``edits.p2p_operands`` on ``device``, or None when this call edits nothing (the target keeps its own
        maps unchanged); cached per window state, context length, device and dtype."""
        state = self._state(extra_options)
        key = (state, length, device, dtype)
        if key not in self._cache:
            c_src, c_tgt = self.coefficients(state)
            mixed, own = edits.p2p_operands(self.mapper, c_src, c_tgt, length)
            unchanged = mixed is None and bool((own == 1).all())
            self._cache[key] = None if unchanged else tuple(
                None if t is None else t.to(device, dtype) for t in (mixed, own))
        return self._cache[key]


class BlendRecorder:
    """Feeds LocalBlend the positive chunks' maps at one resolution and blends the denoised prediction after
    CFG from ``start`` on: the target where the words are, the source elsewhere (the paper blends x_t; blending
    the prediction gives the same image at the end for first-order samplers and is close for the others)."""

    def __init__(self, local: LocalBlend, downscale: int, start: float):
        self.local, self.downscale, self.start = local, downscale, start
        self._last_sigma = float("inf")

    def wants(self, q: torch.Tensor, extra_options: dict) -> bool:
        """Whether this layer call records maps (its resolution, a positive chunk with pairs); a sigma above the
        last one starts a new run."""
        if extra_options.get("activations_shape") is None or downscale(extra_options) != self.downscale:
            return False
        sigma = current_sigma(extra_options) or 0.0
        if sigma > self._last_sigma:  # sigmas only fall within a run: a higher one starts a new run
            self.local.reset()
        self._last_sigma = sigma
        return bool(len(paired_index(extra_options, q.shape[0], q.device)[1]))

    def operands(self, q: torch.Tensor, k: torch.Tensor, extra_options: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of the recording rows (``call_rows(..., then_pairs=True)``'s tail: the pairs' sources,
        then their targets), over which attention returns the words' maps."""
        rows = call_rows(extra_options, q.shape[0], q.device, "pairs")
        return k.index_select(0, rows), self.local.values(len(rows) // 2, k.shape[1], q.shape[-1], q)

    def take(self, out: torch.Tensor, extra_options: dict) -> None:
        """Add the maps of the recording rows' attention output ``out`` [2 pairs, Nq, C]."""
        self.local.record(out, tuple(extra_options["activations_shape"][-2:]), extra_options["n_heads"])

    def record(self, q, k, extra_options: dict, prompts: PromptCache | None = None) -> None:
        """Record in a call of its own, where the layer's attention cannot take the extra rows (another pack's
        replace runs it)."""
        if not self.wants(q, extra_options):
            return
        rows = call_rows(extra_options, q.shape[0], q.device, "pairs")
        make = lambda: k.index_select(0, rows)  # noqa: E731
        keys = make() if prompts is None else prompts.get_or_make(extra_options, k, make, "blend keys")
        values = self.local.values(len(rows) // 2, k.shape[1], q.shape[-1], q)  # shared by the layers: not kept here
        # the host's own kernel, not a replace chained under ours: these calls only read maps
        self.take(fused_attention(extra_options)(q.index_select(0, rows), keys, values), extra_options)

    def post_cfg(self, args: dict) -> torch.Tensor:
        denoised = args["denoised"]
        if float(args["sigma"].max()) > self.start:
            return denoised
        mask = self.local.mask(tuple(denoised.shape[-2:]))
        if mask is None or denoised.shape[0] != 2 * mask.shape[0]:
            return denoised
        out = denoised.clone()
        out[1::2] = blend(denoised[0::2], denoised[1::2], mask)
        return out


def _row_mixing(extra_options: dict, batch: int, mixed: torch.Tensor) -> torch.Tensor:
    """[batch, L, L]: ``mixed`` (M * c_src) for the target rows of positive chunks, the identity elsewhere."""
    out = torch.eye(mixed.shape[0], dtype=mixed.dtype).repeat(batch, 1, 1)
    out[paired_index(extra_options, batch, "cpu")[1]] = mixed
    return out


def _layer_call(plan: CrossPlan, mixing: _LayoutCache, q, k, v, extra_options: dict, src, tgt) -> tuple:
    """The one attention call of a layer: (row layout of ``call_rows``, ``build() -> (keys, or None for k; values)``,
    the version of what build makes, or None where that is k/v themselves). Under a swap's or a reweight's window
    the targets take their source's q/k and M * c_src V_tgt ("sources"); where a target keeps part of its own map
    (refinement's added words, per-word windows) its values are scaled by c_tgt and, where the source's map is
    injected too, one more row per target attends with its source's q/k over M * c_src V_tgt and is added onto it
    afterwards ("extended")."""
    batch = q.shape[0]
    operands = plan.operands(extra_options, k.shape[1], q.device, q.dtype)
    if operands is None or not len(tgt):  # outside the windows, or no target rows (a negative-only call)
        return "plain", lambda: (k, v), None
    mixed, own = operands
    if own is None:  # one attention call over the whole batch
        rows = call_rows(extra_options, batch, q.device, "sources")
        values = mixing.get_or_make(extra_options, batch, k.shape[1], v,
                                    lambda: _row_mixing(extra_options, batch, mixed.cpu()),
                                    tag=id(mixed))  # plan keeps each window state's operands alive
        return "sources", lambda: (k.index_select(0, rows), torch.bmm(values, v)), ("source maps", id(mixed))

    def scaled():  # the targets' values times c_tgt, every other row as it is
        return v.index_copy(0, tgt, v.index_select(0, tgt) * own.view(1, -1, 1))
    if mixed is None:
        return "plain", lambda: (None, scaled()), ("own maps", id(own))
    return "extended", lambda: (torch.cat([k, k.index_select(0, src)]), torch.cat(
        [scaled(), torch.matmul(mixed, v.index_select(0, tgt))])), ("own and source maps", id(mixed), id(own))


def _through_previous(attend, q, k, v, extra_options: dict, prompts: PromptCache, operands) -> torch.Tensor:
    """Refinement under another pack's replace, which may not take extra rows: every row as it is, then the targets
    recomputed through that replace and written over theirs."""
    src, tgt = paired_index(extra_options, q.shape[0], q.device)
    pick = lambda t, rows: t.index_select(0, rows)  # noqa: E731
    k_src, k_tgt, v_tgt = prompts.get_or_make(
        extra_options, k, lambda: (pick(k, src), pick(k, tgt), pick(v, tgt)), "targets")
    edited = edits.p2p_cross_with(attend, pick(q, src), k_src, pick(q, tgt), k_tgt, v_tgt, *operands)
    return attend(q, k, v).index_copy(0, tgt, edited.to(q.dtype))


def p2p_cross_replace(plan: CrossPlan, recorder: BlendRecorder | None, prompts: PromptCache | None = None):
    """attn2 replace: targets of positive chunks get the source's maps (``_layer_call``), in one attention call
    that also takes local blend's recording rows; no boolean split of the batch (each would wait for the GPU).
    What is built from k/v alone is kept in ``prompts`` for the run. Under another pack's replace, which may not
    take extra rows, recording runs in a call of its own and refinement through ``_through_previous``."""
    mixing = _LayoutCache()
    prompts = PromptCache() if prompts is None else prompts  # one never installed builds every time

    def make(previous):
        def replace(q, k, v, extra_options):
            attend = fused_attention(extra_options, previous)
            batch = q.shape[0]
            src, tgt = paired_index(extra_options, batch, q.device)
            recording = recorder is not None and recorder.wants(q, extra_options)
            if previous is not None:
                if recording:
                    recorder.record(q, k, extra_options, prompts)
                recording = False
                operands = plan.operands(extra_options, k.shape[1], q.device, q.dtype)
                if operands is not None and operands[1] is not None and len(tgt):
                    return _through_previous(attend, q, k, v, extra_options, prompts, operands)
            layout, build, version = _layer_call(plan, mixing, q, k, v, extra_options, src, tgt)
            if recording:
                def build_with_maps():
                    (keys, values), (map_keys, map_values) = build(), recorder.operands(q, k, extra_options)
                    return torch.cat([k if keys is None else keys, map_keys]), torch.cat([values, map_values])
                keys, values = prompts.get_or_make(extra_options, k, build_with_maps, "layer", (version, "maps"))
            elif version is None:
                keys, values = build()
                prompts.discard(extra_options, k, "layer")  # a window state that has passed keeps no room
            else:
                keys, values = prompts.get_or_make(extra_options, k, build, "layer", version)
            rows = call_rows(extra_options, batch, q.device, layout, then_pairs=recording)
            out = attend(q if rows is None else q.index_select(0, rows), k if keys is None else keys, values)
            main = batch + len(tgt) if layout == "extended" else batch
            if recording:
                recorder.take(out[main:], extra_options)
            if layout == "extended":
                return out[:batch].index_add_(0, tgt, out[batch:main])
            return out[:batch] if recording else out
        return replace
    return make


def p2p_self_patch(window: Window, max_downscale_ratio: float):
    """attn1_patch: targets of positive chunks attend with the source's self-attention map, in ``window``, at the
    low-resolution layers (the paper: maps of at most 16x16 at 512 px, i.e. latent / 4 and smaller). The block's
    input rows are gathered before the projections, so the targets' q and k are their source's: one gather where
    the keys come from the same input (self-attention), and any attn1 replace on the block still runs."""
    def patch(n, context, value, extra_options):
        if not in_window(extra_options, window) or downscale(extra_options) < max_downscale_ratio or not len(
                paired_index(extra_options, n.shape[0], n.device)[1]):
            return n, context, value
        rows = call_rows(extra_options, n.shape[0], n.device, "sources")
        gathered = n.index_select(0, rows)
        return gathered, gathered if context is n else context.index_select(0, rows), value
    return patch


SELF_MAX_DOWNSCALE = 4  # the paper injects self-attention maps of <= 16x16 at 512 px: latent / 4 and smaller


def low_resolution(model) -> int:
    """The downscale of the paper's 16x16 layers at 512 px (latent / 4), or the UNet's lowest if it has fewer."""
    return min(SELF_MAX_DOWNSCALE, 2 ** (len(model.model.diffusion_model.channel_mult) - 1))


def install_self_injection(model, window: Window) -> None:
    """The paper's self-attention injection on ``model`` (a clone), first in its attn1 patches: the Dual-Path
    blend's stash (or HyperTile) must see the gathered rows, not the block's own."""
    install_patch_first(model, "attn1_patch", p2p_self_patch(window, low_resolution(model)))


def install(model, blocks: list[Block], kind: str, make, node: str) -> None:
    for block in blocks:
        set_replace(model, kind, block, make, node)


def install_cross(model, blocks: list[Block], plan: CrossPlan, recorder: BlendRecorder | None) -> None:
    """The P2P attn2 replace on every block of ``model`` (a clone), with its per-run cache of what it builds from
    the prompts' k/v (kept where ComfyUI calls this replace itself)."""
    prompts = PromptCache(cache_budget(model))
    prompts.install(model)
    install(model, blocks, "attn2", p2p_cross_replace(plan, recorder, prompts), "Personalize P2P")
    prompts.watch(model, [b.key for b in blocks])
