"""Dual-path blend against explicit blocks: a=1 is the block with merged LoRA weights on the soft context, a=0
the base block on the hard context, in between a * Block_soft(W + dW) + (1 - a) * Block_hard(W)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from comfyui_personalize.attention.dual_path import (
    AttentionDeltas,
    LowRankDelta,
    SamplingDeltas,
    blend_pairs,
    cross_blend,
    scale_values_,
    self_blend,
    self_blend_for_sampling,
)
from comfyui_personalize.training.errors import InputError

HEADS, C, CTX_DIM, CTX, R = 2, 16, 8, 5, 3


def sdpa(q, k, v):
    """The host's fused kernel stand-in: [B, N, heads * dim] in and out."""
    b, n, c = q.shape
    split = lambda t: t.reshape(b, t.shape[1], HEADS, c // HEADS).transpose(1, 2)
    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, n, c)


class CountingAttention:
    def __init__(self):
        self.calls, self.rows = 0, []

    def __call__(self, q, k, v):
        self.calls += 1
        self.rows.append(q.shape[0])
        return sdpa(q, k, v)


class Block(nn.Module):
    def __init__(self, ctx_dim):
        super().__init__()
        self.to_q, self.to_k = nn.Linear(C, C, bias=False), nn.Linear(ctx_dim, C, bias=False)
        self.to_v, self.to_out = nn.Linear(ctx_dim, C, bias=False), nn.Linear(C, C)

    def forward(self, x, ctx):
        return self.to_out(sdpa(self.to_q(x), self.to_k(ctx), self.to_v(ctx)))


def make_block(ctx_dim):
    torch.manual_seed(0)
    return Block(ctx_dim)


def merged(block, deltas):
    """The reference LoRA block: W + scale * up @ down merged into a copy."""
    out = copy.deepcopy(block)
    with torch.no_grad():
        for name in ("q", "k", "v", "out"):
            d = getattr(deltas, name)
            if d is not None:
                getattr(out, f"to_{name}").weight += d.scale * d.up @ d.down
    return out


def make_deltas(ctx_dim, requires_grad=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    make = lambda i: LowRankDelta.from_weights(torch.randn(R, i, generator=g).requires_grad_(requires_grad),
                                               torch.randn(C, R, generator=g).requires_grad_(requires_grad), 2.0)
    return AttentionDeltas(make(C), make(ctx_dim), make(ctx_dim), make(C))


def run_cross(block, x, soft, hard, deltas, a, attention=sdpa):
    out, delta = cross_blend(attention, block.to_q(x), block.to_k(soft), block.to_v(soft), block.to_k(hard),
                             block.to_v(hard), x, soft, deltas, a)
    return block.to_out(out) + (0 if delta is None else delta)


def run_self(block, x, deltas, a, attention=sdpa):
    out, delta = self_blend(attention, block.to_q(x), block.to_k(x), block.to_v(x), x, deltas, a)
    return block.to_out(out) + (0 if delta is None else delta)


def inputs(batch=2):
    torch.manual_seed(2)
    return torch.randn(batch, 6, C), torch.randn(batch, CTX, CTX_DIM), torch.randn(batch, CTX, CTX_DIM)


def test_low_rank_delta_is_the_merged_weight_difference():
    d = make_deltas(CTX_DIM).k
    assert d.scale == pytest.approx(2.0 / R)
    x = torch.randn(4, CTX_DIM)
    torch.testing.assert_close(d(x), x @ (d.scale * d.up @ d.down).t())
    assert LowRankDelta.from_weights(d.down, d.up).scale == 1.0  # no alpha: alpha = rank


@pytest.mark.parametrize("a, calls", [(1.0, 1), (0.0, 1), (0.3, 2)])
def test_cross_blend_is_the_blend_of_the_lora_block_and_the_base_block(a, calls):
    block, deltas = make_block(CTX_DIM), make_deltas(CTX_DIM)
    x, soft, hard = inputs()
    expected = a * merged(block, deltas)(x, soft) + (1 - a) * block(x, hard)
    attention = CountingAttention()
    with torch.no_grad():
        torch.testing.assert_close(run_cross(block, x, soft, hard, deltas, a, attention), expected,
                                   atol=1e-5, rtol=1e-5)
    assert attention.calls == calls  # the ends run one path only


@pytest.mark.parametrize("a, calls", [(1.0, 1), (0.0, 1), (0.6, 2)])
def test_self_blend_is_the_blend_of_the_lora_block_and_the_base_block(a, calls):
    block, deltas = make_block(C), make_deltas(C)
    x, _, _ = inputs()
    expected = a * merged(block, deltas)(x, x) + (1 - a) * block(x, x)
    attention = CountingAttention()
    with torch.no_grad():
        # the merged weight W + dW rounds differently from W x + dW x (up to 3e-5 on some CPUs)
        torch.testing.assert_close(run_self(block, x, deltas, a, attention), expected, atol=1e-4, rtol=1e-4)
    assert attention.calls == calls


def test_self_blend_with_only_an_out_delta_runs_attention_once():
    block, full = make_block(C), make_deltas(C)
    deltas = AttentionDeltas(out=full.out)
    x, _, _ = inputs()
    attention = CountingAttention()
    with torch.no_grad():
        got = run_self(block, x, deltas, 0.4, attention)
        torch.testing.assert_close(got, 0.4 * merged(block, deltas)(x, x) + 0.6 * block(x, x), atol=1e-5, rtol=1e-5)
    assert attention.calls == 1


def test_missing_deltas_act_as_zero():
    block, full = make_block(CTX_DIM), make_deltas(CTX_DIM)
    zero = lambda d: LowRankDelta(d.down, torch.zeros_like(d.up), d.scale)
    partial = AttentionDeltas(q=None, k=full.k, v=None, out=None)
    zeroed = AttentionDeltas(zero(full.q), full.k, zero(full.v), zero(full.out))
    x, soft, hard = inputs()
    with torch.no_grad():
        torch.testing.assert_close(run_cross(block, x, soft, hard, partial, 0.3),
                                   run_cross(block, x, soft, hard, zeroed, 0.3), atol=1e-6, rtol=1e-6)
        # no deltas at all, a = 1: the base block on the soft prompt (x and context may then be omitted)
        out, delta = cross_blend(sdpa, block.to_q(x), block.to_k(soft), block.to_v(soft), block.to_k(hard),
                                 block.to_v(hard), None, None, AttentionDeltas(), 1.0)
        assert delta is None
        torch.testing.assert_close(block.to_out(out), block(x, soft))


def test_per_sample_blend_matches_each_row_blended_alone():
    block, deltas = make_block(CTX_DIM), make_deltas(CTX_DIM)
    x, soft, hard = inputs(batch=3)
    a = torch.tensor([1.0, 0.0, 0.25])
    with torch.no_grad():
        got = run_cross(block, x, soft, hard, deltas, a)
        rows = [run_cross(block, x[i:i + 1], soft[i:i + 1], hard[i:i + 1], deltas, float(a[i])) for i in range(3)]
        torch.testing.assert_close(got, torch.cat(rows), atol=1e-5, rtol=1e-5)
        self_block, self_deltas = make_block(C), make_deltas(C)
        torch.testing.assert_close(run_self(self_block, x, self_deltas, torch.tensor(0.3)),
                                   run_self(self_block, x, self_deltas, 0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("a", [1.5, -0.1, float("nan"), torch.ones(4)])
def test_bad_blend_names_the_input(a):
    block, deltas = make_block(CTX_DIM), make_deltas(CTX_DIM)
    x, soft, hard = inputs()
    with pytest.raises(InputError) as e:
        run_cross(block, x, soft, hard, deltas, a)
    assert e.value.input_name == "a_blend"


def test_a_delta_without_its_input_is_refused():
    block, deltas = make_block(C), make_deltas(C)
    x, _, _ = inputs()
    with pytest.raises(ValueError, match="to_q"):
        self_blend(sdpa, block.to_q(x), block.to_k(x), block.to_v(x), None, deltas, 0.5)


def test_gradients_reach_the_deltas_and_the_soft_token():
    block, deltas = make_block(CTX_DIM), make_deltas(CTX_DIM, requires_grad=True)
    block.requires_grad_(False)
    token = torch.randn(CTX_DIM, requires_grad=True)
    x, soft, hard = inputs(batch=1)
    soft = torch.cat([soft[:, :2], token.view(1, 1, -1), soft[:, 3:]], dim=1)
    run_cross(block, x, soft, hard, deltas, 0.5).square().sum().backward()
    assert token.grad is not None and token.grad.abs().sum() > 0
    for d in (deltas.q, deltas.k, deltas.v, deltas.out):
        assert d.down.grad.abs().sum() > 0 and d.up.grad.abs().sum() > 0


def test_gradients_reach_self_attention_deltas_and_a_learned_blend():
    block, deltas = make_block(C), make_deltas(C, requires_grad=True)
    block.requires_grad_(False)
    a = torch.tensor(0.5, requires_grad=True)
    x, _, _ = inputs()
    run_self(block, x, deltas, a).square().sum().backward()
    assert a.grad is not None and a.grad.abs() > 0
    for d in (deltas.q, deltas.k, deltas.v, deltas.out):
        assert d.down.grad.abs().sum() > 0 and d.up.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_keep_their_dtype(dtype):
    block, deltas = make_block(CTX_DIM), make_deltas(CTX_DIM)  # fp32 factors, as the node loads them
    x, soft, hard = (t.to(dtype) for t in inputs())
    half = block.to(dtype)
    with torch.no_grad():
        out, delta = cross_blend(sdpa, half.to_q(x), half.to_k(soft), half.to_v(soft), half.to_k(hard),
                                 half.to_v(hard), x, soft, deltas, torch.tensor([0.3, 0.7]))
        assert out.dtype == dtype and delta.dtype == dtype
        own = make_block(C).to(dtype)
        out, delta = self_blend(sdpa, own.to_q(x), own.to_k(x), own.to_v(x), x, make_deltas(C), 0.5)
        assert out.dtype == dtype and delta.dtype == dtype


def test_folded_delta_equals_the_scaled_one():
    torch.manual_seed(4)
    delta = LowRankDelta.from_weights(torch.randn(4, 16), torch.randn(8, 4), alpha=2.0)  # scale 0.5
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    folded = delta.folded(dtype=torch.float64)
    assert folded.scale == 1.0 and folded.up.dtype == torch.float64
    torch.testing.assert_close(folded(x), delta(x))
    torch.testing.assert_close(delta(x), 0.5 * x @ delta.down.double().t() @ delta.up.double().t())


def run_sampling(block, x, soft, hard, deltas, a, attention=sdpa, together=True):
    """The launch-lean sampling path, through the same block; hard None = self-attention."""
    prepared = SamplingDeltas.prepare(deltas, x.device, x.dtype)
    ctx = x if hard is None else soft
    q, k, v = block.to_q(x), block.to_k(ctx), block.to_v(ctx)
    before = [t.clone() for t in (q, k, v)]
    if hard is None:
        out, update = self_blend_for_sampling(attention, q, k, v, x, x, x, prepared, a, together)
    else:
        pair = prepared.paired({"k": k, "v": v}, {"k": soft, "v": soft}, {"k": block.to_k(hard), "v": block.to_v(hard)})
        q2 = prepared.paired_one("q", q, x)  # as the node pairs the cross-attention q
        out, update = blend_pairs(attention, q2, pair["k"], pair["v"], prepared, a, together)
    assert all(torch.equal(t, b) for t, b in zip((q, k, v), before))  # the host's projections are left alone
    n = block.to_out(out)
    return n if update is None else update.apply_(n)


@pytest.mark.parametrize("together", [True, False])
@pytest.mark.parametrize("a", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("which", ["all", "k only", "out only", "none"])
def test_sampling_path_equals_the_differentiable_blend(a, which, together):
    x, soft, hard = inputs()
    for cross in (True, False):
        block, full = make_block(CTX_DIM if cross else C), make_deltas(CTX_DIM if cross else C)
        deltas = {"all": full, "k only": AttentionDeltas(k=full.k), "out only": AttentionDeltas(out=full.out),
                  "none": AttentionDeltas()}[which]
        with torch.no_grad():
            expected = run_cross(block, x, soft, hard, deltas, a) if cross else run_self(block, x, deltas, a)
            counting = CountingAttention()
            got = run_sampling(block, x, soft, hard if cross else None, deltas, a, counting, together)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        both_paths = 0 < a < 1 and (cross or which in ("all", "k only"))
        # one call over [soft rows; hard rows] serves both paths unless told to split them
        assert counting.calls == (2 if both_paths and not together else 1), (cross, which, a)
        assert counting.rows == [2 * x.shape[0] if both_paths and together else x.shape[0]] * counting.calls


@pytest.mark.parametrize("which", ["all", "out only"])
def test_prescaled_values_give_the_same_blend_in_one_attention_call(which):
    """The direct layer scales the cached values by a and 1 - a once per run; the blend is then a sum."""
    x, soft, hard = inputs()
    block, full = make_block(CTX_DIM), make_deltas(CTX_DIM)
    deltas = full if which == "all" else AttentionDeltas(out=full.out)
    prepared = SamplingDeltas.prepare(deltas, x.device, x.dtype)
    with torch.no_grad():
        expected = run_cross(block, x, soft, hard, deltas, 0.3)
        k, v = block.to_k(soft), block.to_v(soft)
        pair = prepared.paired({"k": k, "v": v}, {"k": soft, "v": soft}, {"k": block.to_k(hard), "v": block.to_v(hard)})
        v2 = scale_values_(pair["v"].clone(), 0.3)
        torch.testing.assert_close(v2[:2], 0.3 * pair["v"][:2])
        torch.testing.assert_close(v2[2:], 0.7 * pair["v"][2:])
        counting = CountingAttention()
        out, update = blend_pairs(counting, prepared.paired_one("q", block.to_q(x), x), pair["k"], v2, prepared, 0.3,
                                  prescaled=True)
        torch.testing.assert_close(update.apply_(block.to_out(out)), expected, atol=1e-5, rtol=1e-5)
    assert counting.calls == 1 and counting.rows == [4]
    with pytest.raises(ValueError):  # a prescaled pair cannot be split into one path
        blend_pairs(sdpa, prepared.paired_one("q", block.to_q(x), x), pair["k"], v2, prepared, 1.0, prescaled=True)


def test_paired_rows_are_the_soft_then_the_hard_projections():
    block, deltas = make_block(CTX_DIM), make_deltas(CTX_DIM)
    x, soft, hard = inputs()
    with torch.no_grad():
        prepared = SamplingDeltas.prepare(deltas, x.device, x.dtype)
        k, k_hard = block.to_k(soft), block.to_k(hard)
        got = prepared.paired({"k": k}, {"k": soft}, {"k": k_hard})["k"]
        batch = x.shape[0]
        torch.testing.assert_close(got[:batch], merged(block, deltas).to_k(soft), atol=1e-5, rtol=1e-5)
        assert torch.equal(got[batch:], k_hard)
        same = prepared.paired({"k": k}, {"k": soft})["k"]  # no hard projection given: the base one
        assert torch.equal(same[batch:], k) and torch.equal(same[:batch], got[:batch])
        assert torch.equal(prepared.paired_one("k", k, soft), same)
        assert torch.equal(SamplingDeltas.prepare(AttentionDeltas(), x.device, x.dtype).paired_one("k", k, None),
                           torch.cat([k, k]))  # no delta on this projection: both halves are the base rows


def test_v_delta_reads_the_value_input_when_a_patch_gave_it_its_own():
    """ComfyUI's attn patches return n, context and value separately (e.g. a hypernetwork changes them apart)."""
    block, deltas = make_block(CTX_DIM), make_deltas(CTX_DIM)
    x, soft, other = inputs()
    q, k, v = block.to_q(x), block.to_k(soft), block.to_v(other)
    with torch.no_grad():
        merged_v = merged(block, deltas).to_v(other)
        prepared = SamplingDeltas.prepare(deltas, x.device, x.dtype)
        pair = prepared.paired({"q": q, "k": k, "v": v}, {"q": x, "k": soft, "v": other})
        torch.testing.assert_close(pair["v"][:x.shape[0]], merged_v, atol=1e-5, rtol=1e-5)
        got, _ = blend_pairs(sdpa, pair["q"], pair["k"], pair["v"], prepared, 1.0)
        expected, _ = cross_blend(sdpa, q, k, v, k, v, x, soft, deltas, 1.0, other)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        self_got, _ = self_blend(sdpa, q, k, v, x, deltas, 1.0, soft, other)
        torch.testing.assert_close(self_got, expected, atol=1e-5, rtol=1e-5)
        lean_self, _ = self_blend_for_sampling(sdpa, q, k, v, x, soft, other, prepared, 1.0)
        torch.testing.assert_close(lean_self, expected, atol=1e-5, rtol=1e-5)


def test_sampling_path_keeps_half_precision():
    block, deltas = make_block(CTX_DIM), make_deltas(CTX_DIM)
    x, soft, hard = inputs()
    with torch.no_grad():
        exact = run_cross(block, x, soft, hard, deltas, 0.4)
        half, low = copy.deepcopy(block).to(torch.bfloat16), [t.bfloat16() for t in (x, soft, hard)]
        differentiable = run_cross(half, *low, deltas, 0.4)
        got = run_sampling(half, *low, deltas, 0.4)
        assert got.dtype == torch.bfloat16
        # bf16 rounds differently in the two orders of operations: no less precise than the differentiable path
        error = (got.float() - exact).abs().mean()
        assert error <= 1.5 * (differentiable.float() - exact).abs().mean(), error
        assert error < 0.02 * exact.abs().mean()
