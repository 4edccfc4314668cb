"""The dual-path blend on a layer's own weights (q pair written by the GEMMs, to_out with W + dW merged) equals the
explicit blend a * Block_soft(W + dW) + (1 - a) * Block_hard(W)."""
import pytest
import torch
from test_dual_path import CTX_DIM, CountingAttention, inputs, make_block, make_deltas, merged, run_cross

from comfyui_personalize.attention.dual_path import AttentionDeltas, SamplingDeltas, scale_values_
from comfyui_personalize.attention.dual_path_weights import merged_weight, paired_out, paired_projection


@pytest.mark.parametrize("which", ["all", "no q delta", "no out delta"])
@pytest.mark.parametrize("q_bias", [False, True])
def test_the_blend_on_the_layers_weights_equals_the_explicit_blend(which, q_bias):
    x, soft, hard = inputs()
    block, full = make_block(CTX_DIM), make_deltas(CTX_DIM)
    if q_bias:
        block.to_q.bias = torch.nn.Parameter(torch.randn(block.to_q.out_features))
    deltas = {"all": full, "no q delta": AttentionDeltas(k=full.k, v=full.v, out=full.out),
              "no out delta": AttentionDeltas(q=full.q, k=full.k, v=full.v)}[which]
    prepared = SamplingDeltas.prepare(deltas, x.device, x.dtype)
    a = 0.3
    with torch.no_grad():
        expected = run_cross(block, x, soft, hard, deltas, a)
        pair = prepared.paired({"k": block.to_k(soft), "v": block.to_v(soft)}, {"k": soft, "v": soft},
                               {"k": block.to_k(hard), "v": block.to_v(hard)})
        q2 = paired_projection(x, block.to_q.weight, block.to_q.bias, prepared.parts.get("q"))
        reference = merged(block, deltas)
        torch.testing.assert_close(q2[:2], reference.to_q(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(q2[2:], block.to_q(x), atol=1e-5, rtol=1e-5)
        w = block.to_out.weight
        kept = merged_weight(w, prepared.parts.get("out"))
        torch.testing.assert_close(kept, reference.to_out.weight, atol=1e-5, rtol=1e-5)
        assert (kept is w) == (which == "no out delta")  # nothing to merge: nothing kept
        counting = CountingAttention()
        got = paired_out(counting(q2, pair["k"], scale_values_(pair["v"], a)), w, kept, block.to_out.bias)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert counting.calls == 1 and counting.rows == [4]
    assert got.shape == x.shape[:-1] + (w.shape[0],)

