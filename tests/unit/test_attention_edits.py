"""V-side prompt-to-prompt edits equal the paper's map-side controllers, on a fused attention kernel."""
import pytest
import torch
import torch.nn.functional as F

from comfyui_personalize.attention import edits, reference

HEADS, D, NQ, L = 2, 8, 16, 12


def sdpa(q, k, v, heads=HEADS):
    """Multi-head fused attention, the host's kernel stand-in (never materialises the map)."""
    b, nq, c = q.shape
    split = lambda t: t.view(b, t.shape[1], heads, c // heads).transpose(1, 2)  # noqa: E731
    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, nq, c)


def tensors(seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return r(b, NQ, HEADS * D), r(b, L, HEADS * D), r(b, NQ, HEADS * D), r(b, L, HEADS * D), r(b, L, HEADS * D)


def swap_mapper():
    """Token 3 of the source spreads over target tokens 3 and 4; later tokens shift by one."""
    m = torch.zeros(L, L, dtype=torch.float64)
    for i in range(3):
        m[i, i] = 1
    m[3, 3] = m[3, 4] = 0.5
    for i in range(4, L - 1):
        m[i, i + 1] = 1
    return m


def refine(seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, L, (L,), generator=g)
    m = torch.zeros(L, L, dtype=torch.float64)
    m[idx, torch.arange(L)] = 1
    alphas = (torch.rand(L, generator=g) > 0.3).double()
    return m, alphas


@pytest.mark.parametrize("alpha_kind", ["all", "none", "per_word"])
def test_swap_equals_map_side(alpha_kind):
    q_s, k_s, q_t, k_t, v_t = tensors()
    alpha = {"all": torch.ones(L), "none": torch.zeros(L),
             "per_word": torch.tensor([1.0] * 6 + [0.0] * 6)}[alpha_kind].double()
    c_src, c_tgt = edits.coefficients(alpha)
    ours = edits.p2p_cross(sdpa, q_s, k_s, q_t, k_t, v_t, swap_mapper(), c_src, c_tgt)
    ref = reference.p2p_cross(q_s, k_s, q_t, k_t, v_t, HEADS, swap_mapper(), alpha)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_refine_with_equalizer_equals_map_side():
    q_s, k_s, q_t, k_t, v_t = tensors(3)
    mapper, alphas = refine()
    eq = torch.linspace(-1.0, 3.0, L, dtype=torch.float64)
    alpha = torch.tensor([1.0] * 8 + [0.0] * 4, dtype=torch.float64)
    c_src, c_tgt = edits.coefficients(alpha, alphas, eq)
    ours = edits.p2p_cross(sdpa, q_s, k_s, q_t, k_t, v_t, mapper, c_src, c_tgt)
    ref = reference.p2p_cross(q_s, k_s, q_t, k_t, v_t, HEADS, mapper, alpha, alphas, eq)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_identical_prompts_are_an_exact_identity():
    """Same prompt on both rows (same q, k, v), identity mapper: the edit changes nothing."""
    q, k, _, _, v = tensors(4)
    c_src, c_tgt = edits.coefficients(torch.ones(L, dtype=torch.float64))
    out = edits.p2p_cross(sdpa, q, k, q, k, v, torch.eye(L, dtype=torch.float64), c_src, c_tgt)
    torch.testing.assert_close(out, sdpa(q, k, v), atol=1e-12, rtol=0)


def test_reweight_value_scaling_equals_post_softmax_equalizer():
    q, k, _, _, v = tensors(5)
    w = torch.ones(L, dtype=torch.float64)
    w[[2, 3]] = torch.tensor([2.5, -1.0], dtype=torch.float64)
    torch.testing.assert_close(sdpa(q, k, edits.scale_values(v, w)), reference.reweighted(q, k, v, HEADS, w),
                               atol=1e-5, rtol=1e-5)


def test_weight_one_is_identity_and_zero_removes_the_word():
    q, k, _, _, v = tensors(6)
    ones = torch.ones(L, dtype=torch.float64)
    assert torch.equal(edits.scale_values(v, ones), v)
    w = ones.clone()
    w[4] = 0
    out = sdpa(q, k, edits.scale_values(v, w))
    # Without token 4's value the output is what the other tokens contribute under the unchanged map.
    maps = reference.attention_maps(q, k, HEADS)
    vh = v.view(2, L, HEADS, D).transpose(1, 2)
    vh = vh.clone()
    vh[:, :, 4] = 0
    expected = torch.matmul(maps.double(), vh).transpose(1, 2).reshape(2, NQ, -1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # ...and changing token 4's value no longer changes anything.
    v2 = v.clone()
    v2[:, 4] += 10
    torch.testing.assert_close(sdpa(q, k, edits.scale_values(v2, w)), out, atol=1e-9, rtol=0)


def test_renormalized_bias_equals_renormalised_maps():
    q, k, _, _, v = tensors(7)
    w = torch.ones(L, dtype=torch.float64)
    w[[1, 5]] = torch.tensor([3.0, 0.25], dtype=torch.float64)
    bias = edits.log_weight_bias(w).view(1, 1, 1, L)
    b, c = q.shape[0], q.shape[2]
    split = lambda t: t.view(b, t.shape[1], HEADS, c // HEADS).transpose(1, 2)  # noqa: E731
    ours = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=bias)
    ours = ours.transpose(1, 2).reshape(b, NQ, c)
    torch.testing.assert_close(ours, reference.renormalized(q, k, v, HEADS, w), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        edits.log_weight_bias(-w)


def test_self_attention_injection_equals_map_replacement():
    q_s, _, _, _, _ = tensors(8)
    k_s, v_t = torch.randn(2, NQ, HEADS * D, dtype=torch.float64), torch.randn(2, NQ, HEADS * D, dtype=torch.float64)
    torch.testing.assert_close(edits.p2p_self(sdpa, q_s, k_s, v_t), reference.p2p_self(q_s, k_s, v_t, HEADS),
                               atol=1e-5, rtol=1e-5)


def test_repeated_context_tiles_the_mapper_and_weights():
    """ComfyUI repeats a 77-token conditioning to 154 when batched with a longer one: same output."""
    q_s, k_s, q_t, k_t, v_t = tensors(9)
    alpha = torch.tensor([1.0] * 6 + [0.0] * 6, dtype=torch.float64)
    c_src, c_tgt = edits.coefficients(alpha)
    once = edits.p2p_cross(sdpa, q_s, k_s, q_t, k_t, v_t, swap_mapper(), c_src, c_tgt)
    rep = lambda t: torch.cat([t, t], dim=1)  # noqa: E731
    twice = edits.p2p_cross(sdpa, q_s, rep(k_s), q_t, rep(k_t), rep(v_t), swap_mapper(), c_src, c_tgt)
    torch.testing.assert_close(twice, once, atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="not a repeat"):
        edits.tile_tokens(torch.ones(L), L + 5)


def test_selected_maps_are_the_maps_columns():
    q, k, _, _, _ = tensors(10)
    cols = torch.tensor([2, 7])
    full = reference.attention_maps(q, k, HEADS).mean(1)
    torch.testing.assert_close(edits.selected_maps(q, k, HEADS, cols), full[..., cols].float(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("target_words", [[7], []], ids=["both sides", "source words only"])
def test_local_blend_sums_each_sides_words_on_its_own_rows_over_layers(target_words):
    """Fused attention over the blend's values gives the words' maps (no map materialised); each layer's maps are
    averaged over its own heads (SDXL's layers differ in head count) and summed over layers."""
    from comfyui_personalize.attention.local_blend import LocalBlend

    q, k, _, _, _ = tensors(12, b=4)  # two pairs: rows 0, 1 the sources, rows 2, 3 their targets
    blend = LocalBlend(torch.tensor([2, 5]), torch.tensor(target_words, dtype=torch.long), 0.3)
    layers = ((1.0, HEADS), (0.5, HEADS), (0.7, 2 * HEADS))
    for scale, heads in layers:
        blend.record(sdpa(q * scale, k, blend.values(2, L, HEADS * D, q), heads), (4, 4), heads)
    expected = 0
    for scale, heads in layers:
        full = reference.attention_maps(q * scale, k, heads).mean(1)
        words = lambda rows, cols: full[rows][..., cols].sum(-1).view(2, 4, 4)  # noqa: E731
        expected = expected + torch.stack([words(slice(0, 2), [2, 5]), words(slice(2, 4), target_words)], dim=1)
    torch.testing.assert_close(blend.maps, expected.float(), atol=1e-6, rtol=1e-5)
    blend.record(sdpa(q, k, blend.values(2, L, HEADS * D, q), HEADS)[:, :4], (2, 2), HEADS)  # another size
    assert blend.maps.shape == (2, 2, 2, 2)  # a new run: the last size's sums are gone
