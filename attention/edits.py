"""Prompt-to-prompt edits applied to V, so they run on any fused attention kernel.

Every P2P cross-attention edit is linear on the token axis of the map (research B.6):

    A_tgt' = (A_src M diag(a e) + A_tgt diag(1 - a e)) alpha + A_tgt (1 - alpha)     (per target column)

with M the source->target token mapper (identity for a reweight, the word-swap mapper, or refinement's 0/1
alignment), a the refinement alphas (0 for inserted tokens), e the equalizer (reweight) and alpha the
injection schedule. Multiplying by V_tgt, both terms are ordinary attention calls with edited values:

    out = attention(q_src, k_src, (M * c_src) V_tgt) + attention(q_tgt, k_tgt, c_tgt * V_tgt)
    c_src = a e alpha,   c_tgt = (1 - a) e alpha + (1 - alpha)

so no [Nq, Nk] map is materialised. ``attention`` is the host's fused kernel with the heads bound:
``(q, k, v) -> out``, all [B, N, heads * dim_head].
"""
from __future__ import annotations

from typing import Callable

import torch

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def tile_tokens(vector: torch.Tensor, length: int) -> torch.Tensor:
    """Fit a per-token vector [L] to a context of ``length`` rows. ComfyUI repeats a conditioning to the least
    common multiple of the lengths batched together, so ``length`` is a multiple of L."""
    n = vector.shape[-1]
    if length == n:
        return vector
    if length % n:
        raise ValueError(f"context of {length} tokens is not a repeat of the prompt's {n} tokens")
    return vector.repeat(length // n)


def tile_mapper(mapper: torch.Tensor, length: int) -> torch.Tensor:
    """The mapper for a context repeated k times: each copy of the keys maps within its copy."""
    n = mapper.shape[-1]
    if length == n:
        return mapper
    if length % n:
        raise ValueError(f"context of {length} tokens is not a repeat of the prompt's {n} tokens")
    return torch.block_diag(*[mapper] * (length // n))


def scale_values(value: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Reweighting a token's column of the post-softmax map = scaling its value row (``to_v`` has no bias).
    Same operation as P2P's equalizer (no renormalisation, negative weights allowed)."""
    w = tile_tokens(weights.to(value.device, value.dtype), value.shape[1])
    return value * w.view(1, -1, 1)


def log_weight_bias(weights: torch.Tensor) -> torch.Tensor:
    """Additive logit bias log(w): the softmax renormalises, so weights scale attention relative to the other
    tokens. Weights must be positive; 0 maps to -inf (the token is masked out)."""
    if (weights < 0).any():
        raise ValueError("renormalized reweighting needs weights >= 0")
    return torch.log(weights)


def coefficients(alpha: torch.Tensor, refine_alphas: torch.Tensor | None = None,
                 equalizer: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_src, c_tgt) per target token from the injection schedule ``alpha`` (1 = inject the source map),
    refinement alphas and equalizer (both default to ones)."""
    a = torch.ones_like(alpha) if refine_alphas is None else refine_alphas.to(alpha)
    e = torch.ones_like(alpha) if equalizer is None else equalizer.to(alpha)
    return a * e * alpha, (1 - a) * e * alpha + (1 - alpha)


def p2p_operands(mapper: torch.Tensor, c_src: torch.Tensor, c_tgt: torch.Tensor,
                 length: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The constants of ``p2p_cross`` for a context of ``length`` keys, computed once (on the host) per window
    state: (M * c_src, or None when no source map is injected; c_tgt, or None when the target's own map drops
    out, as inside a swap's window)."""
    c_src, c_tgt = tile_tokens(c_src, length), tile_tokens(c_tgt, length)
    mixed = tile_mapper(mapper, length) * c_src.view(1, -1) if bool(c_src.any()) else None
    own = c_tgt if bool(c_tgt.any()) or mixed is None else None
    return mixed, own


def p2p_cross_with(attention: Attention, q_src: torch.Tensor, k_src: torch.Tensor, q_tgt: torch.Tensor,
                   k_tgt: torch.Tensor, v_tgt: torch.Tensor, mixed: torch.Tensor | None,
                   own: torch.Tensor | None) -> torch.Tensor:
    """``p2p_cross`` on prepared operands (``p2p_operands``): one attention call per operand that is not None."""
    out = None
    if mixed is not None:
        out = attention(q_src, k_src, torch.matmul(mixed.to(v_tgt), v_tgt))
    if own is not None:
        kept = attention(q_tgt, k_tgt, v_tgt * own.to(v_tgt).view(1, -1, 1))
        out = kept if out is None else out + kept
    return out


def p2p_cross(attention: Attention, q_src: torch.Tensor, k_src: torch.Tensor, q_tgt: torch.Tensor,
              k_tgt: torch.Tensor, v_tgt: torch.Tensor, mapper: torch.Tensor, c_src: torch.Tensor,
              c_tgt: torch.Tensor) -> torch.Tensor:
    """The target's cross-attention output with the source's maps injected (formula in the module doc).
    q/k/v: [B, N, C] with source row i paired with target row i; mapper [L, L] (source x target);
    c_src/c_tgt [L]. One attention call when c_tgt is zero (inside the window, swap), one when c_src is."""
    mixed, own = p2p_operands(mapper, c_src.cpu(), c_tgt.cpu(), k_tgt.shape[1])
    return p2p_cross_with(attention, q_src, k_src, q_tgt, k_tgt, v_tgt, mixed, own)


def p2p_self(attention: Attention, q_src: torch.Tensor, k_src: torch.Tensor, v_tgt: torch.Tensor) -> torch.Tensor:
    """Self-attention injection: the target attends with the source's map over its own values."""
    return attention(q_src, k_src, v_tgt)


def selected_maps(q: torch.Tensor, k: torch.Tensor, heads: int, columns: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) for the chosen key columns only, averaged over heads: [B, Nq, len(columns)].
    The softmax needs every key of a row, so that layer's logits exist for the moment (cross-attention: Nk is 77
    per chunk); only the chosen columns are kept."""
    b, nq, c = q.shape
    d = c // heads
    qh = q.view(b, nq, heads, d).transpose(1, 2).float()
    kh = k.view(b, k.shape[1], heads, d).transpose(1, 2).float()
    logits = torch.matmul(qh, kh.transpose(-1, -2)) * d**-0.5
    return torch.softmax(logits, dim=-1).index_select(-1, columns.to(q.device)).mean(1)


def word_map_values(columns: torch.Tensor, length: int, channels: int, like: torch.Tensor) -> torch.Tensor:
    """Values [B, length, channels] that make attention return a word map: row b is 1 at the keys
    ``columns[b]`` (a [B, length] 0/1 mask) in every channel, so each head's output channels all equal the sum of
    that head's map over those keys. With the host's fused kernel, no map is materialised."""
    return columns.to(like.device, like.dtype)[:, :length, None].expand(-1, -1, channels).contiguous()


def head_maps(out: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, Nq, heads] from attention over ``word_map_values``: each head's map summed over the words. All channels
    of a head are equal, so this is a strided view of each head's first channel: no operation."""
    return out.view(*out.shape[:-1], heads, -1)[..., 0]
