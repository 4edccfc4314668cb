"""Map-side prompt-to-prompt, as the paper's controllers do it: materialise softmax(q k^T), edit the map, then
multiply by V. Used only to check the V-side edits (tests) and as the memory/time reference (bench)."""
from __future__ import annotations

import torch


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def attention_maps(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, heads, Nq, Nk] post-softmax maps (at least fp32)."""
    b, nq, c = q.shape
    d = c // heads
    qh = _wide(q.view(b, nq, heads, d).transpose(1, 2))
    kh = _wide(k.view(b, k.shape[1], heads, d).transpose(1, 2))
    return torch.softmax(torch.matmul(qh, kh.transpose(-1, -2)) * d**-0.5, dim=-1)


def apply_maps(maps: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """maps [B, heads, Nq, Nk] x v [B, Nk, heads*d] -> [B, Nq, heads*d]."""
    b, heads, nq, nk = maps.shape
    vh = v.view(b, nk, heads, -1).transpose(1, 2).to(maps.dtype)
    return torch.matmul(maps, vh).transpose(1, 2).reshape(b, nq, -1).to(v.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    return apply_maps(attention_maps(q, k, heads), v)


def p2p_cross(q_src, k_src, q_tgt, k_tgt, v_tgt, heads: int, mapper: torch.Tensor, alpha: torch.Tensor,
              refine_alphas: torch.Tensor | None = None, equalizer: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's AttentionControlEdit.forward for the cross-attention of one target row per source row:
    replace = A_src M (AttentionReplace) or A_src[:, mapper] a + A_tgt (1 - a) (AttentionRefine), times the
    equalizer (AttentionReweight), then alpha * replace + (1 - alpha) * A_tgt."""
    a_src, a_tgt = attention_maps(q_src, k_src, heads), attention_maps(q_tgt, k_tgt, heads)
    replace = torch.einsum("bhpw,wn->bhpn", a_src, mapper.to(a_src.dtype))
    if refine_alphas is not None:
        replace = replace * refine_alphas + a_tgt * (1 - refine_alphas)
    if equalizer is not None:
        replace = replace * equalizer
    edited = replace * alpha + a_tgt * (1 - alpha)
    return apply_maps(edited, v_tgt)


def p2p_self(q_src, k_src, v_tgt, heads: int) -> torch.Tensor:
    """replace_self_attention: the target takes the source's self-attention map."""
    return apply_maps(attention_maps(q_src, k_src, heads), v_tgt)


def reweighted(q, k, v, heads: int, weights: torch.Tensor) -> torch.Tensor:
    """Post-softmax column scaling without renormalisation (the equalizer on a branch's own map)."""
    maps = attention_maps(q, k, heads)
    return apply_maps(maps * weights.to(maps.dtype), v)


def renormalized(q, k, v, heads: int, weights: torch.Tensor) -> torch.Tensor:
    """Column scaling followed by renormalisation of each row."""
    maps = attention_maps(q, k, heads)
    maps = maps * weights.to(maps.dtype)
    return apply_maps(maps / maps.sum(-1, keepdim=True), v)
