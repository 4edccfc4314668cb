"""Attention patches for reweighting and prompt-to-prompt, built on ``attention/edits.py``.

The paired batch: the P2P node gives the sampler a conditioning of two prompts and a latent batch laid out
[src0, tgt0, src1, tgt1, ...] with shared initial noise, so one sampling run makes the source and the edited
image. In positive chunks each target row takes the source row's maps (V-side, fused attention); source rows and
negative chunks run unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..attention import edits
from ..attention.local_blend import LocalBlend, blend
from .attention_hooks import (
    COND,
    Block,
    chunks,
    downscale,
    fused_attention,
    in_window,
    masked_attention,
    paired_rows,
    set_replace,
)

Window = tuple[float, float]  # (sigma_high, sigma_low)


def value_reweight_patch(weights: torch.Tensor, kinds: tuple[int, ...], window: Window):
    """attn2_patch: scale the value rows of the weighted tokens in the chosen chunks (zero extra cost)."""
    def patch(n, context, value, extra_options):
        if not in_window(extra_options, window):
            return n, context, value
        value = value.clone()
        for kind, rows in chunks(extra_options, value.shape[0]):
            if kind in kinds:
                value[rows] = edits.scale_values(value[rows], weights)
        return n, context, value
    return patch


def renormalized_replace(weights: torch.Tensor, kinds: tuple[int, ...], window: Window):
    """attn2 replace: softmax(q k^T + log w) on the chosen chunks, through the fused kernel's float mask."""
    bias = edits.log_weight_bias(weights)

    def make(previous):
        def replace(q, k, v, extra_options):
            if not in_window(extra_options, window):
                return fused_attention(extra_options, previous)(q, k, v)
            mask = torch.zeros(q.shape[0], 1, k.shape[1], device=q.device, dtype=q.dtype)
            tiled = edits.tile_tokens(bias.to(q.device, q.dtype), k.shape[1])
            for kind, rows in chunks(extra_options, q.shape[0]):
                if kind in kinds:
                    mask[rows] = tiled
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

    def coefficients(self, extra_options: dict, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        state = (in_window(extra_options, self.window),
                 tuple(in_window(extra_options, w) for w in self.token_windows.values()))
        key = (state, device, dtype)
        if key not in self._cache:
            alpha = torch.full(self.mapper.shape[1:], float(state[0]))
            for pos, inside in zip(self.token_windows, state[1]):
                alpha[pos] = float(inside)
            c_src, c_tgt = edits.coefficients(alpha, self.refine_alphas, self.equalizer)
            self._cache[key] = (c_src.to(device, dtype), c_tgt.to(device, dtype))
        return self._cache[key]


class BlendRecorder:
    """Feeds LocalBlend the positive chunks' maps at one resolution and blends the denoised prediction after
    CFG from ``start`` on: the target where the words are, the source elsewhere (the paper blends x_t; blending
    the prediction gives the same image at the end for first-order samplers and is close for the others)."""

    def __init__(self, local: LocalBlend, downscale: int, start: float):
        self.local, self.downscale, self.start = local, downscale, start
        self._last_sigma = float("inf")

    def record(self, q, k, extra_options: dict) -> None:
        shape = extra_options.get("activations_shape")
        if shape is None or downscale(extra_options) != self.downscale:
            return
        sigmas = extra_options.get("sigmas")
        sigma = float(sigmas.max()) if sigmas is not None else 0.0
        if sigma > self._last_sigma:  # sigmas only fall within a run: a higher one starts a new run
            self.local.reset()
        self._last_sigma = sigma
        for kind, rows in chunks(extra_options, q.shape[0]):
            if kind == COND:
                src, tgt = (r.to(q.device) for r in paired_rows(rows))
                self.local.record(q[src], k[src], q[tgt], k[tgt], extra_options["n_heads"], tuple(shape[-2:]))

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


def p2p_cross_replace(plan: CrossPlan, recorder: BlendRecorder | None):
    """attn2 replace: targets of positive chunks get the source's maps; maps for local blend are recorded."""
    def make(previous):
        def replace(q, k, v, extra_options):
            attend = fused_attention(extra_options, previous)
            if recorder is not None:
                recorder.record(q, k, extra_options)
            c_src, c_tgt = plan.coefficients(extra_options, q.device, q.dtype)
            if not bool(c_src.any()):
                return attend(q, k, v)
            targets = torch.cat([paired_rows(rows)[1] for kind, rows in chunks(extra_options, q.shape[0])
                                 if kind == COND]).to(q.device)
            sources = targets - 1
            keep = torch.ones(q.shape[0], dtype=torch.bool, device=q.device)
            keep[targets] = False
            # Rows that are not edited in one call, edited targets in one (two outside a swap's window): the
            # same attention work as the plain batch.
            plain = attend(q[keep], k[keep], v[keep])
            edited = edits.p2p_cross(attend, q[sources], k[sources], q[targets], k[targets], v[targets],
                                     plan.mapper, c_src, c_tgt)
            out = plain.new_empty((q.shape[0],) + tuple(plain.shape[1:]))
            out[keep] = plain
            out[targets] = edited
            return out
        return replace
    return make


def p2p_self_replace(window: Window, max_downscale_ratio: float):
    """attn1 replace: targets of positive chunks attend with the source's self-attention map, in ``window``,
    at the low-resolution layers (the paper: maps of at most 16x16 at 512 px, i.e. latent / 4 and smaller)."""
    def make(previous):
        def replace(q, k, v, extra_options):
            attend = fused_attention(extra_options, previous)
            if not in_window(extra_options, window) or downscale(extra_options) < max_downscale_ratio:
                return attend(q, k, v)
            targets = torch.cat([paired_rows(rows)[1] for kind, rows in chunks(extra_options, q.shape[0])
                                 if kind == COND]).to(q.device)
            q, k = q.clone(), k.clone()
            q[targets], k[targets] = q[targets - 1], k[targets - 1]
            return attend(q, k, v)
        return replace
    return make


def install(model, blocks: list[Block], kind: str, make) -> None:
    for block in blocks:
        set_replace(model, kind, block, make)
