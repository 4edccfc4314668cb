"""The attention patches called as ComfyUI calls them (a batch of chunks in the sampler's order, a sigma tensor),
checked row by row against the map-side reference; run twice to catch stale per-layout caches."""
import pytest
import torch

from comfyui_personalize.attention import reference
from comfyui_personalize.attention.align import swap_mapper

pytestmark = pytest.mark.host
HEADS, L, C, NQ = 2, 77, 16, 12
ALL = (1e9, 0.0)


@pytest.fixture(scope="module")
def patches(comfy):
    from comfyui_personalize.nodes import p2p_patches
    return p2p_patches


def options(kinds, sigma=5.0):
    return {"cond_or_uncond": kinds, "n_heads": HEADS, "sigmas": torch.full((1,), sigma), "attn_precision": None}


def qkv(batch, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, NQ, C, generator=g), torch.randn(batch, L, C, generator=g),
            torch.randn(batch, L, C, generator=g))


REFINE_ALPHAS = torch.ones(L)
REFINE_ALPHAS[6] = 0.0  # an inserted token: the target keeps its own map there (the batch plus a row per target)


@pytest.mark.parametrize("kinds", [[0, 1], [1, 0]])
@pytest.mark.parametrize("alphas", [torch.ones(L), REFINE_ALPHAS], ids=["swap", "refine"])
def test_p2p_cross_edits_only_positive_targets(patches, kinds, alphas):
    mapper = swap_mapper([([10], [3]), ([11], [5])], [([20], [3]), ([21, 22], [5, 6])], L)
    plan = patches.CrossPlan(mapper, alphas, torch.ones(L), ALL)
    replace = patches.p2p_cross_replace(plan, None)(None)
    for seed in (0, 1):  # the second call reuses the cached indices and operands
        q, k, v = qkv(4, seed)
        out = replace(q, k, v, options(kinds))
        plain = reference.attention(q, k, v, HEADS)
        cond = slice(0, 2) if kinds[0] == 0 else slice(2, 4)
        src, tgt = cond.start, cond.start + 1
        expected = plain.clone()
        expected[tgt] = reference.p2p_cross(q[src:src + 1], k[src:src + 1], q[tgt:tgt + 1], k[tgt:tgt + 1],
                                            v[tgt:tgt + 1], HEADS, mapper, torch.ones(L), refine_alphas=alphas)[0]
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out[tgt], plain[tgt], atol=1e-3)  # the edit did something


def start_run(prompts, replace) -> None:
    """Start a run in which ComfyUI calls ``replace`` itself on block KEY: ``prompts`` keeps values there."""
    from types import SimpleNamespace
    patcher = SimpleNamespace(model_options={"transformer_options": {
        "patches": {}, "patches_replace": {"attn2": {KEY: replace}}}})
    prompts.watch(patcher, [KEY])
    prompts.reset(patcher)


KEY = ("input", 1, 0)
KEPT = {"uuids": ["c", "u"], "block": KEY[:2], "block_index": KEY[2], "personalize_prompt_fixed": True}


@pytest.mark.parametrize("chained", [False, True], ids=["own kernel", "under another replace"])
def test_p2p_refinement_with_per_word_windows_matches_the_reference_at_every_step(patches, chained):
    """Added words keep the target's own map (one call over the batch plus a row per target, or through another
    pack's replace); per-word windows change the operands as sigma falls; the prompt's k/v are kept for the run, and
    each window state keeps its own."""
    mapper = swap_mapper([([10], [3]), ([11], [5])], [([20], [3]), ([21, 22], [5, 6])], L)
    plan = patches.CrossPlan(mapper, REFINE_ALPHAS, torch.ones(L), ALL, {3: (1e9, 2.0), 6: (1e9, 3.0)})
    previous = (lambda q, k, v, extra: reference.attention(q, k, v, HEADS)) if chained else None
    from comfyui_personalize.nodes.prompt_cache import PromptCache
    prompts = PromptCache(max_bytes=2**30)
    replace = patches.p2p_cross_replace(plan, None, prompts)(previous)
    start_run(prompts, replace)
    builds = count_builds(prompts)
    q0, k, v = qkv(8, 11)  # two images: the positive chunk (rows 4-7) holds two source/target pairs
    kinds = [1, 0]
    kept = []
    for step, sigma in enumerate((5.0, 2.5, 1.0, 0.5)):
        q = q0 + step  # the image tokens change at every step, the prompt's k/v do not
        out = replace(q, k, v, {**options(kinds, sigma), **KEPT})
        alpha = torch.ones(L)
        alpha[3], alpha[6] = float(sigma >= 2.0), float(sigma >= 3.0)
        expected = reference.attention(q, k, v, HEADS)
        for src, tgt in ((4, 5), (6, 7)):
            expected[tgt] = reference.p2p_cross(q[src:src + 1], k[src:src + 1], q[tgt:tgt + 1], k[tgt:tgt + 1],
                                                v[tgt:tgt + 1], HEADS, mapper, alpha, refine_alphas=REFINE_ALPHAS)[0]
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        kept.append(prompts._used)
    # the values were kept, and each window state's replaced the last state's: the bytes of one state at a time
    assert kept[0] > 0 and kept == [kept[0]] * 4
    assert len(builds) == (1 if chained else 3)  # built once per window state (the last two steps share one)


def count_builds(prompts) -> list:
    """The tags of what ``prompts`` builds from here on (a build is a cache miss)."""
    builds, get_or_make = [], prompts.get_or_make
    prompts.get_or_make = lambda extra, like, make, tag=None, version=None: get_or_make(
        extra, like, lambda: builds.append(tag) or make(), tag, version)
    return builds


def test_p2p_cross_frees_its_kept_values_when_its_window_closes(patches):
    """Swap until sigma 3: the layer's kept values go when the window closes; a negative-only call keeps nothing."""
    from comfyui_personalize.nodes.prompt_cache import PromptCache
    mapper = swap_mapper([([10], [3])], [([20], [3])], L)
    prompts = PromptCache(max_bytes=2**30)
    replace = patches.p2p_cross_replace(patches.CrossPlan(mapper, torch.ones(L), torch.ones(L), (5.0, 3.0)), None,
                                        prompts)(None)
    start_run(prompts, replace)
    q, k, v = qkv(4, 3)
    kept = []
    for sigma in (5.0, 4.0, 2.0, 1.0):
        out = replace(q, k, v, {**options([1, 0], sigma), **KEPT})
        kept.append(prompts._used)
        negative = replace(q[:2], k[:2], v[:2], {**options([1], sigma), **KEPT})  # CFG's chunks run apart
        torch.testing.assert_close(negative, reference.attention(q[:2], k[:2], v[:2], HEADS), atol=1e-5, rtol=1e-5)
        assert prompts._used == kept[-1]
    assert kept[0] > 0 and kept == [kept[0], kept[0], 0, 0]
    torch.testing.assert_close(out, reference.attention(q, k, v, HEADS), atol=1e-5, rtol=1e-5)


def test_p2p_target_that_keeps_only_its_own_map_runs_one_plain_sized_call(patches):
    """Refinement where every target token is new (no source map injected): the target attends with its own map
    over equalized values; the call stays the batch's size."""
    equalizer = torch.ones(L)
    equalizer[4] = 2.0
    plan = patches.CrossPlan(torch.eye(L), torch.zeros(L), equalizer, ALL)
    sizes = []

    def previous_free_attention(q, k, v):
        sizes.append(q.shape[0])
        return reference.attention(q, k, v, HEADS)
    q, k, v = qkv(2, 4)
    from comfyui_personalize.nodes import p2p_patches
    original = p2p_patches.fused_attention
    p2p_patches.fused_attention = lambda extra, previous: previous_free_attention
    try:
        out = patches.p2p_cross_replace(plan, None)(None)(q, k, v, options([0]))
    finally:
        p2p_patches.fused_attention = original
    assert sizes == [2]
    expected = reference.p2p_cross(q[:1], k[:1], q[1:], k[1:], v[1:], HEADS, torch.eye(L), torch.ones(L),
                                   refine_alphas=torch.zeros(L), equalizer=equalizer)
    torch.testing.assert_close(out[1:], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:1], reference.attention(q[:1], k[:1], v[:1], HEADS), atol=1e-5, rtol=1e-5)


def test_p2p_cross_outside_its_window_is_plain(patches):
    mapper = swap_mapper([([10], [3])], [([20], [3])], L)
    plan = patches.CrossPlan(mapper, torch.ones(L), torch.ones(L), (2.0, 1.0))
    q, k, v = qkv(4, 0)
    out = patches.p2p_cross_replace(plan, None)(None)(q, k, v, options([0, 1], sigma=5.0))
    torch.testing.assert_close(out, reference.attention(q, k, v, HEADS), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chained", [False, True], ids=["own kernel", "under another replace"])
@pytest.mark.parametrize("window", [ALL, (1.0, 0.5)], ids=["inside the window", "outside it"])
@pytest.mark.parametrize("alphas", [torch.ones(L), REFINE_ALPHAS], ids=["swap", "refine"])
def test_p2p_layer_records_local_blend_maps_in_its_one_attention_call(patches, monkeypatch, alphas, window, chained):
    """Two images with CFG: the positive chunk holds two pairs. Each pair's maps are the source words' summed
    attention on the source row and the target words' on the target row, averaged over heads, summed over layer
    calls; on the host's kernel they come from the layer's one attention call (extra rows), under another pack's
    replace from a call of their own. The edit is the reference's either way."""
    from comfyui_personalize.attention.local_blend import LocalBlend
    from comfyui_personalize.nodes.prompt_cache import PromptCache
    calls = []
    monkeypatch.setattr(patches, "fused_attention", lambda extra, previous=None: lambda q, k, v: calls.append(
        q.shape[0]) or reference.attention(q, k, v, HEADS))  # counts the calls; another replace would be the same
    mapper = swap_mapper([([10], [3]), ([11], [5])], [([20], [3]), ([21, 22], [5, 6])], L)
    source_words, target_words = [2, 10], [3, 5, 6]
    local = LocalBlend(torch.tensor(source_words), torch.tensor(target_words))
    prompts = PromptCache(max_bytes=2**30)
    previous = (lambda q, k, v, extra: reference.attention(q, k, v, HEADS)) if chained else None
    plan = patches.CrossPlan(mapper, alphas, torch.ones(L), window, {3: (1e9, 4.5)})  # word 3 for one step
    replace = patches.p2p_cross_replace(plan,
                                        patches.BlendRecorder(local, downscale=1, start=0.0), prompts)(previous)
    start_run(prompts, replace)
    builds = count_builds(prompts)
    hw = (3, 4)  # NQ image tokens
    layout = {"activations_shape": (8, C, *hw), "original_shape": (8, 4, *hw), **KEPT}
    expected_maps = torch.zeros(2, 2, *hw)
    _, k, v = qkv(8, 5)
    for step, sigma in enumerate((5.0, 4.0, 3.5)):  # the prompt's k/v stay, the image tokens change
        q = qkv(8, 6 + step)[0]
        out = replace(q, k, v, {**options([1, 0], sigma), **layout})
        negative = replace(q[:4], k[:4], v[:4], {**options([1], sigma), **layout, "activations_shape": (4, C, *hw)})
        torch.testing.assert_close(negative, reference.attention(q[:4], k[:4], v[:4], HEADS), atol=1e-5, rtol=1e-5)
        expected = reference.attention(q, k, v, HEADS)
        maps = reference.attention_maps(q, k, HEADS).mean(1)  # [batch, NQ, L], averaged over heads
        for pair, (src, tgt) in enumerate(((4, 5), (6, 7))):
            expected_maps[pair, 0] += maps[src][:, source_words].sum(-1).view(hw)
            expected_maps[pair, 1] += maps[tgt][:, target_words].sum(-1).view(hw)
            alpha = torch.full((L,), float(window == ALL))
            alpha[3] = float(step == 0)
            expected[tgt] = reference.p2p_cross(q[src:src + 1], k[src:src + 1], q[tgt:tgt + 1], k[tgt:tgt + 1],
                                                v[tgt:tgt + 1], HEADS, mapper, alpha, refine_alphas=alphas)[0]
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(local.maps, expected_maps, atol=1e-5, rtol=1e-5)
    assert prompts._used > 0  # what was built from the prompt was kept for the run
    if not chained:  # the batch, one row per target where it keeps part of its own map, and the pairs' rows
        # one row per target where it keeps part of its own map and takes the source's on the others
        extra = [2 if alphas is REFINE_ALPHAS else 0, 2, 2] if window == ALL else [2, 0, 0]
        assert calls == [n for e in extra for n in (8 + e + 4, 4)]  # a negative-only call records nothing
        assert builds == ["layer", "layer"]  # once per window state: word 3's window closes after the first step


@pytest.mark.parametrize("self_attention", [True, False], ids=["self-attention", "attn1 over a context"])
def test_p2p_self_injects_the_source_map_into_targets_only(patches, self_attention):
    """The block's input rows are gathered before the projections: each target's q and k are its source's, its
    values its own; other rows and calls outside the window or at high resolution are untouched."""
    patch = patches.p2p_self_patch((5.0, 2.0), 2)
    torch.manual_seed(2)
    to_q, to_k, to_v = (torch.nn.Linear(C, C, bias=False) for _ in range(3))
    n = torch.randn(4, NQ, C)
    context = n if self_attention else torch.randn(4, NQ, C)  # SD2's disable_self_attn: attn1 reads the prompt

    def attn1(opts):
        n2, c2, v2 = patch(n, context, context, opts)
        with torch.no_grad():
            return n2, c2, reference.attention(to_q(n2), to_k(c2), to_v(v2), HEADS)
    low = {**options([1, 0], 3.0), "activations_shape": (4, C, 2, 3), "original_shape": (4, 4, 4, 6)}
    gathered, keys_from, out = attn1(low)
    with torch.no_grad():
        plain = reference.attention(to_q(n), to_k(context), to_v(context), HEADS)
        torch.testing.assert_close(out[:3], plain[:3], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[3:], reference.p2p_self(to_q(n[2:3]), to_k(context[2:3]), to_v(context[3:]),
                                                               HEADS), atol=1e-5, rtol=1e-5)
    assert (keys_from is gathered) == self_attention  # one gather where q and k read the same input
    value = torch.randn(4, NQ, C)  # an earlier patch's values: passed on as they are
    assert patch(n, context, value, low)[2] is value
    high = {**low, "activations_shape": (4, C, 4, 6)}  # latent / 1: below the patch's resolution
    negative_only = {**low, **options([1], 3.0)}
    for opts in (high, {**low, **options([1, 0], 1.0)}, negative_only):
        assert all(a is b for a, b in zip(patch(n, context, value, opts), (n, context, value)))


@pytest.mark.parametrize("kinds", [[0, 1], [1, 0]])
@pytest.mark.parametrize("weighted", [(0,), (1,), (0, 1)])
def test_reweights_apply_each_prompts_weights_to_its_own_chunk(patches, kinds, weighted):
    """Each chunk kind takes the weights of its own prompt's tokens (the negative prompt's words sit elsewhere);
    chunks of other kinds run unchanged."""
    weights = {0: torch.ones(L), 1: torch.ones(L)}
    weights[0][4], weights[0][9] = 2.5, 0.25
    weights[1][2] = 3.0
    weights = {kind: weights[kind] for kind in weighted}
    q, k, v = qkv(2, 3)
    value_patch = patches.value_reweight_patch(weights, ALL)
    renorm = patches.renormalized_replace(weights, ALL)(None)
    plain = reference.attention(q, k, v, HEADS)
    for _ in range(2):  # the second call from the layout cache
        _, _, scaled = value_patch(q, k, v, options(kinds))
        out = renorm(q, k, v, options(kinds))
        for row, kind in enumerate(kinds):
            w = weights.get(kind, torch.ones(L))
            torch.testing.assert_close(scaled[row], v[row] * w.view(-1, 1))
            torch.testing.assert_close(out[row:row + 1], reference.renormalized(q[row:row + 1], k[row:row + 1],
                                                                                v[row:row + 1], HEADS, w),
                                       atol=1e-5, rtol=1e-5)
            if kind not in weights:
                torch.testing.assert_close(out[row], plain[row], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kinds", [[0, 1], [1, 0]])
def test_dual_path_hard_prompt_goes_to_positive_rows_only(comfy, kinds):
    from types import SimpleNamespace

    from comfyui_personalize.attention.dual_path import AttentionDeltas, LowRankDelta
    from comfyui_personalize.nodes.dual_path import _Blend
    torch.manual_seed(0)
    attn2 = SimpleNamespace(to_k=torch.nn.Linear(8, C, bias=False), to_v=torch.nn.Linear(8, C, bias=False))
    block = SimpleNamespace(key=("input", 1, 0), module=SimpleNamespace(attn2=attn2))
    deltas = AttentionDeltas(out=LowRankDelta.from_weights(torch.randn(2, C), torch.randn(C, 2)))
    hard = torch.randn(1, L, 8)
    replace = _Blend(block, deltas, hard, 0.0, ALL).cross(None)
    q, k, v = qkv(2, 5)
    with torch.no_grad():
        for _ in range(2):
            out = replace(q, k, v, options(kinds))
            cond = kinds.index(0)
            hk, hv = attn2.to_k(hard), attn2.to_v(hard)
            torch.testing.assert_close(out[cond:cond + 1], reference.attention(q[cond:cond + 1], hk, hv, HEADS),
                                       atol=1e-5, rtol=1e-5)
            other = 1 - cond
            torch.testing.assert_close(out[other:other + 1], reference.attention(
                q[other:other + 1], k[other:other + 1], v[other:other + 1], HEADS), atol=1e-5, rtol=1e-5)


def test_p2p_cross_follows_per_word_windows_as_sigma_falls(patches):
    """Word 3 is injected until sigma 2, the rest all along: the cached operands must follow the window state."""
    mapper = swap_mapper([([10], [3]), ([11], [5])], [([20], [3]), ([21], [5])], L)
    plan = patches.CrossPlan(mapper, torch.ones(L), torch.ones(L), ALL, {3: (1e9, 2.0)})
    replace = patches.p2p_cross_replace(plan, None)(None)
    q, k, v = qkv(2, 7)
    for sigma, alpha3 in ((5.0, 1.0), (1.0, 0.0), (5.0, 1.0)):
        alpha = torch.ones(L)
        alpha[3] = alpha3
        out = replace(q, k, v, options([0], sigma=sigma))
        expected = reference.p2p_cross(q[:1], k[:1], q[1:], k[1:], v[1:], HEADS, mapper, alpha)
        torch.testing.assert_close(out[1:], expected, atol=1e-5, rtol=1e-5)
