"""Dual-path blend: a=1 is the LoRA block, a=0 the base block, in between the formula; gradients flow."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from comfyui_personalize.attention.dual_path import AttentionDeltas, LowRankDelta, cross_blend, self_blend

HEADS, C, CTX, R = 2, 16, 12, 4


def sdpa(q, k, v):
    b, n, c = q.shape
    split = lambda t: t.view(b, t.shape[1], HEADS, c // HEADS).transpose(1, 2)  # noqa: E731
    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, n, c)


class Block(nn.Module):
    def __init__(self, ctx_dim):
        super().__init__()
        torch.manual_seed(0)
        self.to_q, self.to_k = nn.Linear(C, C, bias=False), nn.Linear(ctx_dim, C, bias=False)
        self.to_v, self.to_out = nn.Linear(ctx_dim, C, bias=False), nn.Linear(C, C)

    def forward(self, x, ctx, deltas=None):
        d = deltas or AttentionDeltas()
        add = lambda lin, delta, inp: lin(inp) + (delta(inp) if delta else 0)  # noqa: E731
        attn = sdpa(add(self.to_q, d.q, x), add(self.to_k, d.k, ctx), add(self.to_v, d.v, ctx))
        return add(self.to_out, d.out, attn)


def deltas(ctx_dim, requires_grad=False):
    g = torch.Generator().manual_seed(1)
    make = lambda i, o: LowRankDelta.from_weights(  # noqa: E731
        torch.randn(R, i, generator=g).requires_grad_(requires_grad),
        torch.randn(o, R, generator=g).requires_grad_(requires_grad), alpha=2.0)
    return AttentionDeltas(make(C, C), make(ctx_dim, C), make(ctx_dim, C), make(C, C))


def run_cross(block, x, soft, hard, d, a):
    q = block.to_q(x)
    out, delta = cross_blend(sdpa, q, block.to_k(soft), block.to_v(soft), block.to_k(hard), block.to_v(hard),
                             x, soft, d, a)
    return block.to_out(out) + (0 if delta is None else delta)


@pytest.mark.parametrize("a", [1.0, 0.0, 0.3])
def test_cross_blend_is_the_blend_of_the_two_blocks(a):
    block, d = Block(8), deltas(8)
    x, soft, hard = torch.randn(2, 6, C), torch.randn(2, CTX, 8), torch.randn(2, CTX, 8)
    expected = a * block(x, soft, d) + (1 - a) * block(x, hard)
    torch.testing.assert_close(run_cross(block, x, soft, hard, d, a), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("a", [1.0, 0.0, 0.6])
def test_self_blend_is_the_blend_of_the_two_blocks(a):
    block, d = Block(C), deltas(C)
    x = torch.randn(2, 6, C)
    q, k, v = block.to_q(x), block.to_k(x), block.to_v(x)
    out, delta = self_blend(sdpa, q, k, v, x, d, a)
    got = block.to_out(out) + (0 if delta is None else delta)
    torch.testing.assert_close(got, a * block(x, x, d) + (1 - a) * block(x, x), atol=1e-5, rtol=1e-5)


def test_no_deltas_and_a_one_is_the_base_block_on_the_soft_prompt():
    block = Block(8)
    x, soft, hard = torch.randn(1, 6, C), torch.randn(1, CTX, 8), torch.randn(1, CTX, 8)
    torch.testing.assert_close(run_cross(block, x, soft, hard, AttentionDeltas(), 1.0), block(x, soft))


def test_gradients_reach_the_deltas_and_the_soft_token():
    block, d = Block(8), deltas(8, requires_grad=True)
    token = torch.randn(8, requires_grad=True)
    x, hard = torch.randn(1, 6, C), torch.randn(1, CTX, 8)
    soft = torch.cat([torch.randn(1, 3, 8), token.view(1, 1, 8), torch.randn(1, CTX - 4, 8)], dim=1)
    run_cross(block, x, soft, hard, d, 0.5).square().sum().backward()
    assert token.grad is not None and token.grad.abs().sum() > 0
    for delta in (d.q, d.k, d.v, d.out):
        assert delta.down.grad.abs().sum() > 0 and delta.up.grad.abs().sum() > 0


def test_half_precision_keeps_its_dtype():
    d = deltas(8)
    x = torch.randn(1, 6, C, dtype=torch.bfloat16)
    assert d.q(x).dtype == torch.bfloat16
