"""The dual-path blend for sampling on a layer's own weights (the W and b of plain linear projections), with fewer
kernel launches than calling the projections and adding rank-r deltas after them.

- q pair: one batched GEMM writes x W^T + b into both halves of one buffer, then the soft half gets x dW^T in place:
  [x (W + dW)^T + b; x W^T + b] in three kernels (the module call, a cat and the delta's two GEMMs are four).
- out: with the values prescaled by a and 1 - a (``scale_values_``) the stacked attention holds a attn_soft and
  (1 - a) attn_hard, and to_out of the blend plus the soft path's out delta is

      W o_hard + b + (W + dW) o_soft

  two GEMMs with W + dW merged once per run, instead of add, to_out and the rank-r product (four kernels).

With these a blended cross-attention layer launches one kernel more than ComfyUI's own (which projects the prompt's
k/v at every step; the caller builds them once per run). The price is W + dW of to_out per layer for the run (SDXL:
0.2 GB) and two more full GEMMs on the image tokens (the base q twice, W o_hard and W o_soft apart): about 1% more
GPU time on SDXL (H200 profiler), the launches saved are worth more where a sampler is launch-bound. For sampling:
the callers run without autograd (``out=`` has none)."""
from __future__ import annotations

import torch

from .dual_path import _halves, _rows

Factors = tuple[torch.Tensor, torch.Tensor]  # (down.T [in, r], up.T [r, out] with the scale folded in)


def paired_projection(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      delta: Factors | None) -> torch.Tensor:
    """[B, N, in] -> [2B, N, out]: rows :B x (W + dW)^T + b (the soft path), rows B: x W^T + b (the hard path)."""
    rows = _rows(x)
    pair = x.new_empty((2, rows.shape[0], weight.shape[0]))
    # one batched GEMM writes the base projection into both halves: its inputs are expanded (batch stride 0, no
    # copy); a second GEMM and a cat, or an out-of-place addmm (a device copy first), would each launch one more
    batch = (rows.expand(2, -1, -1), weight.t().expand(2, -1, -1))
    if bias is None:
        torch.bmm(*batch, out=pair)
    else:
        torch.baddbmm(bias, *batch, out=pair)
    if delta is not None:
        down, up = delta
        pair[0].addmm_(rows @ down, up)
    return pair.view((2 * x.shape[0],) + tuple(x.shape[1:-1]) + (weight.shape[0],))


def merged_weight(weight: torch.Tensor, delta: Factors | None) -> torch.Tensor:
    """W + dW, [out, in], in one GEMM on the sampler's device, rounded once to the weight's dtype (as ComfyUI merges a
    LoRA); ``weight`` itself without a delta: nothing to keep."""
    if delta is None:
        return weight
    down, up = delta
    return torch.addmm(weight, up.t(), down.t())


def paired_out(o2: torch.Tensor, weight: torch.Tensor, merged: torch.Tensor, bias: torch.Tensor | None
               ) -> torch.Tensor:
    """to_out of the prescaled stacked attention [a attn_soft; (1 - a) attn_hard], [2B, N, C] -> [B, N, out]:
    W o_hard + b + (W + dW) o_soft, i.e. the blend, its to_out and a dOut(attn_soft) in two GEMMs."""
    soft, hard = _halves(o2)
    n = _rows(hard) @ weight.t() if bias is None else torch.addmm(bias, _rows(hard), weight.t())
    n.addmm_(_rows(soft), merged.t())
    return n.view(tuple(soft.shape[:-1]) + (weight.shape[0],))


def soft_out(o_soft: torch.Tensor, merged: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """to_out of the tuned path alone (a = 1, outside the blend's window): (W + dW) o_soft + b, one GEMM."""
    return torch.nn.functional.linear(o_soft, merged, bias)
