"""Dual-path attention blend: out = a Block(x, soft context, W + dW) + (1 - a) Block(x, hard context, W).

Block = to_out(attention(to_q(x), to_k(c), to_v(c))). ``to_out`` is affine, so
    out = to_out(a attn_soft + (1 - a) attn_hard) + a dOut(attn_soft)
and one ``to_out`` call serves both paths: the host's block runs it, these functions return the blended
attention and the delta to add after it. Everything is differentiable (fast tuning trains through it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class LowRankDelta:
    """scale * up(down(x)): a LoRA factor pair, down [r, in], up [out, r]."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float

    @classmethod
    def from_weights(cls, down: torch.Tensor, up: torch.Tensor, alpha: float) -> "LowRankDelta":
        return cls(down, up, alpha / down.shape[0])  # kohya: scale = alpha / rank

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.down.to(x.device, x.dtype), self.up.to(x.device, x.dtype)
        return torch.matmul(torch.matmul(x, down.t()), up.t()) * self.scale


@dataclass
class AttentionDeltas:
    """LoRA deltas of one attention layer's projections; None = no delta there."""

    q: LowRankDelta | None = None
    k: LowRankDelta | None = None
    v: LowRankDelta | None = None
    out: LowRankDelta | None = None


def _plus(t: torch.Tensor, delta: LowRankDelta | None, x: torch.Tensor | None) -> torch.Tensor:
    if delta is None:
        return t
    if x is None:
        raise ValueError("a delta on this projection needs the projection's input")
    return t + delta(x)


def _blend(attention: Attention, q, k_soft, v_soft, k_hard, v_hard, x, context, deltas: AttentionDeltas,
           a: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    if a <= 0.0:
        return attention(q, k_hard, v_hard), None
    soft = attention(_plus(q, deltas.q, x), _plus(k_soft, deltas.k, context), _plus(v_soft, deltas.v, context))
    delta_out = None if deltas.out is None else a * deltas.out(soft)
    if a >= 1.0:
        return soft, delta_out
    return a * soft + (1.0 - a) * attention(q, k_hard, v_hard), delta_out


def cross_blend(attention: Attention, q: torch.Tensor, k_soft: torch.Tensor, v_soft: torch.Tensor,
                k_hard: torch.Tensor, v_hard: torch.Tensor, x: torch.Tensor | None, context_soft: torch.Tensor | None,
                deltas: AttentionDeltas, a: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cross-attention: (blended attention before to_out, a dOut(attn_soft) to add after to_out, or None).
    q = to_q(x), k/v_soft from the soft context, k/v_hard from the hard context, all with the base weights."""
    return _blend(attention, q, k_soft, v_soft, k_hard, v_hard, x, context_soft, deltas, a)


def self_blend(attention: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor | None,
               deltas: AttentionDeltas, a: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Self-attention: both paths read x; the soft one through W + dW."""
    return _blend(attention, q, k, v, k, v, x, x, deltas, a)
