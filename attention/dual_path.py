"""Dual-path attention blend (DATE-style prior preservation), on the host's fused attention kernel.

Per attention layer, with LoRA deltas dW on the q/k/v/out projections and a in [0, 1]:

    out = a Block(x, soft context, W + dW) + (1 - a) Block(x, hard context, W)
    Block(x, c, W) = to_out(attention(to_q(x), to_k(c), to_v(c)))

``to_out`` is affine and a + (1 - a) = 1, so its bias is counted once and one ``to_out`` call serves both paths:

    out = to_out(a attn_soft + (1 - a) attn_hard) + a dOut(attn_soft)
    attn_soft = attention(q + dQ(x), k_soft + dK(c_soft), v_soft + dV(c_soft))
    attn_hard = attention(q, k_hard, v_hard)

The host (a ComfyUI attention replace) receives q, k, v already projected with the base weights, [B, N,
heads * dim_head], not head-split; it passes the stashed pre-projection ``x`` / soft context for the deltas, runs
``to_out`` on the first result and adds the second after it. ``attention`` is the host's fused kernel with the
heads bound, ``(q, k, v) -> [B, Nq, heads * dim_head]``, so no attention map is materialised. Everything is
differentiable (gradients reach the deltas and the soft context; the tests check it): Personalize Fast Tune with
a_blend < 1 tunes through these functions (nodes/dual_path_training.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Union

import torch
import torch.nn.functional as F

from ..training.errors import InputError

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Blend = Union[float, torch.Tensor]


@dataclass
class LowRankDelta:
    """A LoRA pair on one projection: ``delta(x) = scale * (x @ down.T) @ up.T``, down [r, in], up [out, r]."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float

    @classmethod
    def from_weights(cls, down: torch.Tensor, up: torch.Tensor, alpha: float | None = None) -> "LowRankDelta":
        """Kohya convention: scale = alpha / rank (alpha missing = rank, scale 1)."""
        rank = down.shape[0]
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != rank:
            raise ValueError(f"LoRA factors must be down [r, in] and up [out, r]; got {tuple(down.shape)} and "
                             f"{tuple(up.shape)}")
        return cls(down, up, (rank if alpha is None else float(alpha)) / rank)

    @property
    def in_features(self) -> int:
        return self.down.shape[1]

    @property
    def out_features(self) -> int:
        return self.up.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"LoRA delta expects {self.in_features} input features, the layer gives {x.shape[-1]}")
        # cast the small factors, not x: the product stays in the host's dtype; .to keeps autograd to down/up
        down, up = self.down.to(x.device, x.dtype), self.up.to(x.device, x.dtype)
        h = F.linear(x, down)
        return F.linear(h if self.scale == 1.0 else h * self.scale, up)  # scale the rank-r intermediate: cheapest

    def folded(self, device=None, dtype=None) -> "LowRankDelta":
        """The same delta with the scale folded into ``up`` and the factors moved, for repeated inference calls."""
        return LowRankDelta(self.down.to(device, dtype), (self.up * self.scale).to(device, dtype), 1.0)


@dataclass
class AttentionDeltas:
    """LoRA deltas of one attention layer's projections; None = no delta on that projection."""

    q: LowRankDelta | None = None
    k: LowRankDelta | None = None
    v: LowRankDelta | None = None
    out: LowRankDelta | None = None

    @property
    def changes_attention(self) -> bool:
        """True when a delta reaches the attention inputs (q, k or v), i.e. the soft attention differs."""
        return self.q is not None or self.k is not None or self.v is not None


def check_blend(a: Blend, batch: int, input_name: str = "a_blend") -> Blend:
    """A float in [0, 1], or a tensor: 0-d or one value per sample [B]. Tensor values are not range-checked
    (that would synchronise the device on every layer)."""
    if isinstance(a, torch.Tensor):
        if a.dim() > 1 or (a.dim() == 1 and a.shape[0] != batch):
            raise InputError(input_name, f"give one blend value or one per sample ({batch}); got shape "
                                         f"{tuple(a.shape)}")
        return a
    a = float(a)
    if math.isnan(a) or not 0.0 <= a <= 1.0:
        raise InputError(input_name, f"must be between 0 (base model only) and 1 (personalised path only); got {a}")
    return a


def _plus(t: torch.Tensor, delta: LowRankDelta | None, source: torch.Tensor | None, what: str) -> torch.Tensor:
    if delta is None:
        return t
    if source is None:
        raise ValueError(f"a LoRA delta on {what} needs its pre-projection input; the host did not pass it")
    return t + delta(source).to(t.dtype)


def _weight(a: Blend, like: torch.Tensor) -> Blend:
    """a as a multiplier of [B, N, C] tensors: per-sample values broadcast over tokens and channels."""
    if isinstance(a, torch.Tensor):
        a = a.to(like.device, like.dtype)
        return a.view(-1, 1, 1) if a.dim() == 1 else a
    return a


def _blend(attention: Attention, q: torch.Tensor, k_soft: torch.Tensor, v_soft: torch.Tensor,
           k_hard: torch.Tensor, v_hard: torch.Tensor, x: torch.Tensor | None, context_soft: torch.Tensor | None,
           value_soft: torch.Tensor | None, deltas: AttentionDeltas,
           a: Blend) -> tuple[torch.Tensor, torch.Tensor | None]:
    a = check_blend(a, q.shape[0])
    fixed = not isinstance(a, torch.Tensor)
    if fixed and a == 0.0:  # base block on the hard context only: no deltas at all
        return attention(q, k_hard, v_hard), None
    soft = attention(_plus(q, deltas.q, x, "to_q"), _plus(k_soft, deltas.k, context_soft, "to_k"),
                     _plus(v_soft, deltas.v, value_soft, "to_v"))
    w = _weight(a, soft)
    delta_out = None
    if deltas.out is not None:
        d = deltas.out(soft).to(soft.dtype)
        delta_out = d if fixed and a == 1.0 else w * d
    if fixed and a == 1.0:
        return soft, delta_out
    same_inputs = not deltas.changes_attention and k_soft is k_hard and v_soft is v_hard
    hard = soft if same_inputs else attention(q, k_hard, v_hard)  # self-attention without q/k/v deltas: one call
    return torch.lerp(hard, soft, w), delta_out


def cross_blend(attention: Attention, q: torch.Tensor, k_soft: torch.Tensor, v_soft: torch.Tensor,
                k_hard: torch.Tensor, v_hard: torch.Tensor, x: torch.Tensor | None, context_soft: torch.Tensor | None,
                deltas: AttentionDeltas, a: Blend,
                value_soft: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cross-attention (attn2) blend.

    q = to_q(x), k/v_soft = to_k/to_v(context_soft), k/v_hard = to_k/to_v(hard context), all with the base
    weights, [B, N, heads * dim_head]. ``x`` / ``context_soft`` / ``value_soft`` (default: the context) are the
    pre-projection inputs the q / k / v deltas read (may be None where that delta is None). ``a``: float in
    [0, 1], or a tensor, 0-d or per sample [B] (rows with a = 1 then still pay for the hard attention).
    Returns (blended attention to pass through to_out, a * dOut(attn_soft) to add after to_out, or None when
    there is no out delta or a = 0). Fast paths for a float: a == 1 runs only the soft attention, a == 0 only
    the hard one.
    """
    value = context_soft if value_soft is None else value_soft
    return _blend(attention, q, k_soft, v_soft, k_hard, v_hard, x, context_soft, value, deltas, a)


def self_blend(attention: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor | None,
               deltas: AttentionDeltas, a: Blend, context: torch.Tensor | None = None,
               value: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Self-attention (attn1) blend: both paths read x; the soft one through W + dW. Same returns as cross_blend.
    ``context`` / ``value``: what to_k / to_v read when a patch gave them their own input (default: x).
    Without q/k/v deltas the two attentions are equal and computed once."""
    context = x if context is None else context
    return _blend(attention, q, k, v, k, v, x, context, context if value is None else value, deltas, a)


# ---------------------------------------------------------------- sampling (no autograd): fewer kernel launches
# On a fast GPU the sampler is bound by kernel launches, not arithmetic (the wall time of an SDXL step follows its
# kernel count). For sampling the same math runs with fewer: the soft and the hard path are stacked on the batch
# axis, [soft rows; hard rows], so ONE fused attention call serves both; the cross-attention k/v pair is built once
# per run by the caller; factors of projections that read the same input are stacked (one matmul to the joint rank,
# one in-place addmm per projection on the new stacked tensor); the out delta stays a rank-r product that the
# output patch adds in place after to_out. The host's q/k/v are never changed: another pack's replace that calls
# ours may reuse them.


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., C] -> [T, C], a view when it can be (fewer ops than F.linear's own reshapes)."""
    return t.reshape(-1, t.shape[-1])


@dataclass
class OutUpdate:
    """``a * dOut(soft)`` as its rank-r factors, added in place after ``to_out``: n += alpha * h @ up."""

    h: torch.Tensor
    up: torch.Tensor
    alpha: float

    def apply_(self, n: torch.Tensor) -> torch.Tensor:
        if n.shape[:-1].numel() != self.h.shape[0]:
            raise ValueError(f"the attention output has {n.shape[:-1].numel()} rows, the out delta {self.h.shape[0]}")
        if not n.is_contiguous():
            return n + self.alpha * (self.h @ self.up).view_as(n)
        n.view(-1, n.shape[-1]).addmm_(self.h, self.up, alpha=self.alpha)
        return n


@dataclass
class SamplingDeltas:
    """One layer's AttentionDeltas placed on the sampler's device and dtype: per projection (down.T [in, r],
    up.T [r, out] with the scale folded in), and stacks of those that read one input, made on first use."""

    parts: dict[str, tuple[torch.Tensor, torch.Tensor]]
    stacks: dict[tuple[str, ...], tuple[torch.Tensor, list[torch.Tensor]]] = field(default_factory=dict)

    @classmethod
    def prepare(cls, deltas: AttentionDeltas, device, dtype) -> "SamplingDeltas":
        parts = {name: (d.down.t().to(device, dtype).contiguous(), (d.up * d.scale).t().to(device, dtype).contiguous())
                 for name, d in vars(deltas).items() if d is not None}
        return cls(parts)

    @property
    def changes_attention(self) -> bool:
        return any(name in self.parts for name in ("q", "k", "v"))

    def _stack(self, names: tuple[str, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if names not in self.stacks:
            self.stacks[names] = (torch.cat([self.parts[n][0] for n in names], dim=1),
                                  [self.parts[n][1] for n in names])
        return self.stacks[names]

    def paired(self, projections: dict[str, torch.Tensor], sources: dict[str, torch.Tensor | None],
               hard: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Per projection [B, N, C], a new [2B, N, C] tensor: rows :B the projection plus its delta (the soft
        path), rows B: the hard path's projection (``hard[name]``, default the projection itself)."""
        hard = hard or {}
        out = {}
        for name, t in projections.items():
            other = hard.get(name, t)
            out[name] = torch.cat([t, other])  # one op (Tensor.repeat dispatches about thirty on torch 2.14)
        groups: dict[int, list[str]] = {}
        for name in projections:
            if name in self.parts:
                if sources.get(name) is None:
                    raise ValueError(f"a LoRA delta on to_{name} needs its pre-projection input; the host did not "
                                     "pass it")
                groups.setdefault(id(sources[name]), []).append(name)
        for names in map(tuple, groups.values()):
            down, ups = self._stack(names)
            joint, start = _rows(sources[names[0]]) @ down, 0
            for name, up in zip(names, ups):
                batch = projections[name].shape[0]
                _rows(out[name][:batch]).addmm_(joint[:, start:start + up.shape[0]], up)  # rows :B are contiguous
                start += up.shape[0]
        return out

    def plus_(self, name: str, t: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
        """``t`` (contiguous, the caller's own) plus the delta of projection ``name`` on ``source``, in place."""
        if name in self.parts:
            if source is None:
                raise ValueError(f"a LoRA delta on to_{name} needs its pre-projection input; the host did not pass it")
            down, up = self.parts[name]
            _rows(t).addmm_(_rows(source) @ down, up)
        return t

    def paired_one(self, name: str, t: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
        """``paired`` for one projection whose hard rows are its base rows (the cross-attention q, every step):
        the same ops, less Python per call."""
        t2 = torch.cat([t, t])
        self.plus_(name, t2[:t.shape[0]], source)  # rows :B are contiguous
        return t2

    def out_update(self, soft: torch.Tensor, a: float) -> OutUpdate | None:
        if "out" not in self.parts:
            return None
        down, up = self.parts["out"]
        return OutUpdate(_rows(soft) @ down, up, a)


def _halves(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(soft rows, hard rows) of a stacked tensor. Per tensor: q may have more rows than k/v when a patch split
    the queries into tiles (HyperTile), and the attention kernel's view splits k/v alike."""
    half = t.shape[0] // 2
    return t[:half], t[half:]


def scale_values_(v2: torch.Tensor, a: float) -> torch.Tensor:
    """[soft rows; hard rows] values scaled in place by a and 1 - a: attention is linear in v, so the stacked call
    then returns a * attn_soft and (1 - a) * attn_hard, and the blend is their sum (``blend_pairs(prescaled=True)``).
    Done once per run on the cached values, it takes the blend's scaling off every step."""
    soft, hard = _halves(v2)
    soft.mul_(a)
    hard.mul_(1.0 - a)
    return v2


@torch.no_grad()
def blend_pairs(attention: Attention, q2: torch.Tensor, k2: torch.Tensor, v2: torch.Tensor, deltas: SamplingDeltas,
                a: float, together: bool = True, prescaled: bool = False) -> tuple[torch.Tensor, OutUpdate | None]:
    """The blend for sampling from stacked inputs [soft rows; hard rows] (``SamplingDeltas.paired``), a float ``a``
    in [0, 1]. ``together``: one attention call over both halves (False: one per path, for a replace of another
    pack that reads the row layout). ``prescaled``: v2 already carries a and 1 - a (``scale_values_``; together
    only). Returns (blended attention for to_out, the out delta for the output patch). a = 1 / a = 0 attend only
    the soft / hard rows."""
    if 0.0 < a < 1.0 and together:  # the common case first, slicing no input (every op costs a dispatch)
        soft, hard = _halves(attention(q2, k2, v2))
        update = deltas.out_update(soft, 1.0 if prescaled else a)  # queued before the blend overwrites the soft rows
        # in place: no third [B, N, C] tensor at the peak
        return (soft.add_(hard) if prescaled else soft.lerp_(hard, 1.0 - a)), update
    if prescaled:
        raise ValueError("prescaled values hold a blend of both paths: attend them together, with 0 < a < 1")
    (q_soft, q_hard), (k_soft, k_hard), (v_soft, v_hard) = _halves(q2), _halves(k2), _halves(v2)
    if a == 0.0:
        return attention(q_hard, k_hard, v_hard), None
    soft = attention(q_soft, k_soft, v_soft)
    if a == 1.0:
        return soft, deltas.out_update(soft, a)
    # another pack's replace reads the row layout, and its outputs may alias its inputs: a call per path, out of place
    return torch.lerp(attention(q_hard, k_hard, v_hard), soft, a), deltas.out_update(soft, a)


@torch.no_grad()
def self_blend_for_sampling(attention: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            x: torch.Tensor | None, context: torch.Tensor | None, value: torch.Tensor | None,
                            deltas: SamplingDeltas, a: float, together: bool = True
                            ) -> tuple[torch.Tensor, OutUpdate | None]:
    """self_blend for sampling: both paths read x (``context`` / ``value``: what to_k / to_v read). Without q/k/v
    deltas the two paths attend alike: one attention, only the out delta differs."""
    if not deltas.changes_attention:
        out = attention(q, k, v)
        return out, deltas.out_update(out, a) if a > 0.0 else None
    pair = deltas.paired({"q": q, "k": k, "v": v}, {"q": x, "k": context, "v": value})
    return blend_pairs(attention, pair["q"], pair["k"], pair["v"], deltas, a, together)
