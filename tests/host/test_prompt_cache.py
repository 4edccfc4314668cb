"""Per-run caches of what patches build from the prompts' k/v: built once per run and batch of conditionings,
rebuilt at every step when another node's attn2_patch may change the prompt, and the same image either way."""
import types

import pytest
import torch
from test_attention_nodes import PROMPT, attention_lora, dual, empty_latent, encode, nodes, p2p, sample  # noqa: F401

pytestmark = pytest.mark.host


KEY = ("input", 1, 0)


def patcher_with(attn2_patches, replace=None):
    """A stand-in for the sampling ModelPatcher: its attn2_patch list and the attn2 replace of block KEY."""
    options = {"transformer_options": {"patches": {"attn2_patch": list(attn2_patches)},
                                       "patches_replace": {"attn2": {} if replace is None else {KEY: replace}}}}
    return types.SimpleNamespace(model_options=options)


def call_options(**kw):
    """A layer call's options; the model call's wrapper noted that its attn2_patches keep the prompt."""
    from comfyui_personalize.nodes.prompt_cache import PROMPT_FIXED
    return {"uuids": ["u", "c"], "cond_or_uncond": [1, 0], "block": KEY[:2], "block_index": KEY[2], PROMPT_FIXED: True,
            **kw}


def test_the_cache_keys_by_layer_conditionings_and_layout_and_drops_everything_at_a_run_start(comfy):
    from comfyui_personalize.nodes.prompt_cache import PromptCache, keeps_prompt

    ours, cache, built = (lambda *a: a), PromptCache(max_bytes=2**20), []
    cache.watch(patcher_with([], ours), [KEY])

    def make():
        built.append(1)
        return torch.full((4,), float(len(built)))  # 16 bytes

    got = lambda options, like=torch.zeros(2, 3): int(cache.get_or_make(options, like, make)[0])  # noqa: E731
    call = call_options()
    assert got(call) == 1 and got(call) == 2  # not enabled before a run starts
    cache.reset(patcher_with([keeps_prompt(lambda *a: a)], ours))
    assert got(call) == 3 and got(call) == 3
    assert int(cache.get_or_make(call, torch.zeros(2, 3), make, "other value")[0]) == 4
    assert got({**call, "uuids": ["u", "d"]}) == 5  # another batch of prompts
    assert got({**call, "cond_or_uncond": [0, 1]}) == 6  # another layout
    assert got(call, torch.zeros(4, 3)) == 7  # another shape
    assert got(call_options(uuids=None)) == 8 and got(call_options(uuids=None)) == 9  # no uuids: no key
    assert got(call_options(block_index=1)) == 10 and got(call_options(block_index=1)) == 11  # a layer not watched
    assert got(call_options(context_window=object())) == 12  # context windows slice the prompt per window
    cache.reset(patcher_with([keeps_prompt(lambda *a: a)], ours))
    assert got(call) == 13 and got(call) == 13  # a new run builds anew
    prompt_patch = call_options(personalize_prompt_fixed=False)  # this model call has a patch that may edit it
    assert got(prompt_patch) == 14 and got(prompt_patch) == 15
    unnoted = {k: v for k, v in call.items() if k != "personalize_prompt_fixed"}  # no note: nothing is known
    assert got(unnoted) == 16 and got(unnoted) == 17
    assert got(call) == 13
    cache.reset(patcher_with([], lambda *a: ours(*a)))  # another replace wraps ours: it may pass other k/v
    assert got(call) == 18 and got(call) == 19


def test_the_cache_keeps_no_more_than_its_budget(comfy):
    from comfyui_personalize.nodes.prompt_cache import PromptCache

    ours, cache, built = (lambda *a: a), PromptCache(max_bytes=40), []
    cache.watch(patcher_with([], ours), [KEY])

    def make():
        built.append(1)
        return torch.zeros(2), torch.zeros(2, dtype=torch.float64)  # 8 + 16 bytes

    cache.reset(patcher_with([], ours))
    for tag in range(3):
        for _ in range(2):
            cache.get_or_make(call_options(), torch.zeros(1), make, tag)
    assert len(built) == 1 + 2 + 2  # the first pair fits (24 of 40 bytes), the others are built per call
    cache.reset(patcher_with([], ours))
    cache.get_or_make(call_options(), torch.zeros(1), make, 2)
    cache.get_or_make(call_options(), torch.zeros(1), make, 2)
    assert len(built) == 6  # a run start frees the budget


def test_a_new_version_replaces_the_kept_value_within_the_budget(comfy):
    """A window state that has passed gives its room to the next one (sigma only falls within a run)."""
    from comfyui_personalize.nodes.prompt_cache import PromptCache

    ours, cache = (lambda *a: a), PromptCache(max_bytes=40)
    cache.watch(patcher_with([], ours), [KEY])
    cache.reset(patcher_with([], ours))
    get = lambda make, version: cache.get_or_make(call_options(), torch.zeros(1), make, "maps", version)  # noqa: E731
    first, second = torch.zeros(8), torch.ones(8)  # 32 bytes each: only one fits
    assert get(lambda: first, "a") is first and get(lambda: second, "a") is first
    assert get(lambda: second, "b") is second and cache._used == 32  # replaced, not beside it
    assert get(lambda: first, "b") is second
    assert get(lambda: first, "a") is first and cache._used == 32  # an earlier state comes back: made again


def test_rows_that_repeat_a_prompt_are_found_by_value_and_label_once_per_run(comfy, monkeypatch):
    from comfyui_personalize.nodes.prompt_cache import PromptCache, find_distinct_rows

    a, b = torch.randn(3, 4), torch.randn(3, 4)
    context = torch.stack([a, a, b, a, b, b])
    rows = find_distinct_rows(context, [0, 0, 0, 1, 1, 1])  # a positive chunk and a negative one
    assert rows.firsts == [0, 2, 3, 4]  # the negative "a" is not the positive "a": its hard path differs
    assert rows.first_index.tolist() == rows.firsts
    assert rows.index.tolist() == [0, 0, 1, 2, 3, 3]
    assert rows.pair_index.tolist() == [0, 0, 1, 2, 3, 3, 4, 4, 5, 6, 7, 7]
    torch.testing.assert_close(context[rows.firsts][rows.index], context, atol=0, rtol=0)
    near = a.clone()
    near[1, 2] += 1e-6  # one element apart: another prompt
    assert find_distinct_rows(torch.stack([a, near]), [0, 0]) is None
    assert find_distinct_rows(torch.stack([a, a]), [0, 1]) is None
    nan = torch.full((3, 4), float("nan"))
    assert find_distinct_rows(torch.stack([nan, nan, a, a]), [0, 0, 0, 0]).firsts == [0, 1, 2]  # NaN equals nothing

    ours, cache, found = (lambda *a: a), PromptCache(max_bytes=0), []
    other = call_options(block=("output", 2), block_index=0)
    cache.watch_layer(("output", 2, 0), lambda patcher: True)  # a second layer of ours
    cache.watch(patcher_with([], ours), [KEY])
    twice = torch.stack([a, a, b, b])
    count = lambda context, labels: found.append(1) or find_distinct_rows(context, labels)  # noqa: E731
    import comfyui_personalize.nodes.prompt_cache as prompt_cache
    monkeypatch.setattr(prompt_cache, "find_distinct_rows", count)
    assert cache.distinct_rows(call_options(), twice, lambda: [1, 1, 0, 0]) is None and not found  # no run yet
    cache.reset(patcher_with([], ours))
    first = cache.distinct_rows(call_options(), twice, lambda: [1, 1, 0, 0])
    assert first.firsts == [0, 2] and found == [1]
    assert cache.distinct_rows(call_options(block_index=0, block=("middle", 0)), twice, lambda: [1, 1, 0, 0]) is None
    assert cache.distinct_rows(other, twice, lambda: [1, 1, 0, 0]) is first and found == [1]  # shared by the layers
    assert cache.distinct_rows(call_options(cond_or_uncond=[0, 1]), twice, lambda: [0, 0, 1, 1]).firsts == [0, 2]
    assert found == [1, 1]  # another layout
    assert cache.distinct_rows(call_options(personalize_prompt_fixed=False), twice, lambda: [1, 1, 0, 0]) is None
    assert cache.distinct_rows(call_options(uuids=["u", "d"]), twice, lambda: [1, 1, 0, 0]) is not first
    assert found == [1, 1, 1]  # other conditionings (a timestep-ranged prompt) of the same layout and shape
    cache.weights_changed()  # hooks re-patch the weights (before each model call if cond and uncond differ)
    assert cache.distinct_rows(call_options(), twice, lambda: [1, 1, 0, 0]) is first and found == [1, 1, 1]
    cache.reset(patcher_with([], ours))
    assert cache.distinct_rows(call_options(), twice, lambda: [1, 1, 0, 0]) is not first  # a new run
    assert found == [1, 1, 1, 1]


def test_weights_kept_for_the_run_give_way_to_k_v_and_follow_their_weights(comfy):
    from comfyui_personalize.nodes.prompt_cache import PromptCache

    ours, cache, made = (lambda *a: a), PromptCache(max_bytes=40), []
    cache.watch(patcher_with([], ours), [KEY])

    def weights(value, size):
        def make():
            made.append(value)
            return value, size
        return make

    assert cache.keep_for_run(call_options(), "w", weights("w", 16)) is None and not made  # no run yet
    cache.reset(patcher_with([], ours))
    assert cache.keep_for_run(call_options(), "w", weights("w", 16)) == "w"
    assert cache.keep_for_run(call_options(), "w", weights("w2", 16)) == "w" and made == ["w"]  # once per run
    assert cache.keep_for_run(call_options(block_index=1), "w", weights("w", 16)) is None  # a layer not ours
    kv = torch.zeros(8)  # 32 bytes: only with the weights gone
    assert cache.get_or_make(call_options(), torch.zeros(1), lambda: kv) is kv
    assert cache.get_or_make(call_options(), torch.zeros(1), lambda: torch.ones(8)) is kv  # k/v kept
    assert cache.keep_for_run(call_options(), "w", weights("w3", 16)) is None and made == ["w"]  # for the run
    assert cache.keep_for_run(call_options(), "big", weights("big", 64)) is None  # past the budget: None kept
    assert cache.keep_for_run(call_options(), "big", weights("big", 8)) is None and made == ["w", "big"]
    stale = lambda value: False  # noqa: E731  (the weights it read were moved)
    assert cache.keep_for_run(call_options(), "v", weights("v1", 0), stale) == "v1"
    assert cache.keep_for_run(call_options(), "v", weights("v2", 0), stale) == "v2"  # made anew
    cache.reset(patcher_with([], ours))
    assert cache.keep_for_run(call_options(), "w", weights("w4", 16)) == "w4"  # a new run, a new value


def no_cache(monkeypatch):
    from comfyui_personalize.nodes.prompt_cache import PromptCache
    monkeypatch.setattr(PromptCache, "get_or_make", lambda self, options, like, make, tag=None, version=None: make())


def blend_over_blend(node_classes, model, clip, comfy):
    soft, hard = encode(comfy, clip, PROMPT.replace("car", "zwx car")), encode(comfy, clip, PROMPT)
    inner = dual(node_classes, model, hard, attention_lora(model), 0.5, paths="cross")
    return dual(node_classes, inner, hard, attention_lora(model, seed=11, scale=0.3), 0.5, paths="cross"), soft, \
        empty_latent()


def blend_over_p2p(node_classes, model, clip, comfy):
    m, positive, latent = p2p(node_classes, model, clip, PROMPT, PROMPT.replace("car", "bus"), mode="swap",
                              cross_end_percent=1.0, self_end_percent=0.0)
    blended = dual(node_classes, m, encode(comfy, clip, PROMPT), attention_lora(model), 0.5, paths="cross")
    return blended, positive, latent


def p2p_over_blend(node_classes, model, clip, comfy):
    blended = dual(node_classes, model, encode(comfy, clip, PROMPT), attention_lora(model), 0.5, paths="cross")
    return p2p(node_classes, blended, clip, PROMPT, PROMPT.replace("car", "bus"), mode="swap", cross_end_percent=0.5,
               self_end_percent=0.0)


@pytest.mark.parametrize("chain", [blend_over_blend, blend_over_p2p, p2p_over_blend])
def test_a_replace_wrapping_ours_gets_no_stale_k_v(comfy, tiny_sd15, nodes, monkeypatch, chain):  # noqa: F811
    """The outer replace hands the inner one other k/v at every call (the soft and the hard path; P2P's swapped
    keys inside its window, the plain ones after): the inner node must not serve them from its cache."""
    model, clip, _ = tiny_sd15
    m, positive, latent = chain(nodes, model, clip, comfy)
    cached = sample(comfy, m, positive, latent, clip, steps=4)
    no_cache(monkeypatch)
    torch.testing.assert_close(cached, sample(comfy, m, positive, latent, clip, steps=4), atol=1e-5, rtol=1e-5)


def test_p2p_builds_its_prompt_edits_once_per_run_and_samples_the_same_image(comfy, tiny_sd15, nodes,  # noqa: F811
                                                                            monkeypatch):
    """The swap gathers the source's keys and mixes the target's values: once per run. With another node's
    attn2_patch in the model they are built at every step, and the pair is the same."""
    from comfy.patcher_extension import CallbacksMP

    from comfyui_personalize.nodes.attention_hooks import transformer_blocks
    from comfyui_personalize.nodes.prompt_cache import PromptCache

    builds = []
    get_or_make = PromptCache.get_or_make
    monkeypatch.setattr(PromptCache, "get_or_make", lambda self, options, like, make, tag=None, version=None:
                        get_or_make(self, options, like, lambda: builds.append(1) or make(), tag, version))
    model, clip, _ = tiny_sd15
    m, positive, latent = p2p(nodes, model, clip, PROMPT, PROMPT.replace("car", "bus"), mode="swap",
                              cross_end_percent=1.0)
    layers, steps = len(transformer_blocks(model)), 3
    cached = sample(comfy, m, positive, latent, clip, steps=steps)
    assert len(builds) == layers
    caches = [getattr(r, "__self__", None) for r in m.get_all_callbacks(CallbacksMP.ON_PRE_RUN)]
    caches = [c for c in caches if isinstance(c, PromptCache)]
    assert len(caches) == 1 and not caches[0]._values  # nothing is kept on the device once a run has ended
    builds.clear()
    foreign = m.clone()
    foreign.set_model_attn2_patch(lambda n, context, value, extra_options: (n, context, value))
    uncached = sample(comfy, foreign, positive, latent, clip, steps=steps)
    assert len(builds) == layers * steps
    torch.testing.assert_close(uncached, cached, atol=1e-6, rtol=1e-6)
    assert (cached[1] - cached[0]).abs().max() > 0  # the swap did edit the target


def direct_blend(node_classes, model, clip, comfy):
    hard = encode(comfy, clip, "a photo of a dog")
    blended = dual(node_classes, model, hard, attention_lora(model), 0.5, paths="cross")
    return blended, encode(comfy, clip, "a photo of zwx dog"), empty_latent()


def blend_over_a_replace(node_classes, model, clip, comfy):
    """The blend on ComfyUI's replace route: another pack's replace (pass-through) was there first."""
    import comfy.ldm.modules.attention as attention

    from comfyui_personalize.nodes.attention_hooks import transformer_blocks

    base = model.clone()
    for block in transformer_blocks(model):
        base.set_model_attn2_replace(lambda q, k, v, extra: attention.optimized_attention(q, k, v, extra["n_heads"]),
                                     *block.key)
    return direct_blend(node_classes, base, clip, comfy)


def p2p_swap(node_classes, model, clip, comfy):
    return p2p(node_classes, model, clip, PROMPT, PROMPT.replace("car", "bus"), mode="swap", cross_end_percent=1.0,
               self_end_percent=0.0)


@pytest.mark.parametrize("setup", [direct_blend, blend_over_a_replace, p2p_swap])
def test_a_prompt_patch_carried_by_a_hook_turns_the_cache_off_at_the_call(comfy, tiny_sd15, nodes, monkeypatch,  # noqa: F811
                                                                           setup):
    """A TransformerOptionsHook on the conditionings adds its attn2_patch at the model call, not to the patcher the
    run starts with (and, the same hooks on every batch, no ON_APPLY_HOOKS resets the cache); a replace does not even
    see the patches. The model call's note tells the cache: k/v are built at every step, the same image as with no
    cache at all, for our direct layer and on the replace route."""
    from comfy import hooks  # not "import comfy.hooks": that would shadow the fixture

    from comfyui_personalize.nodes.prompt_cache import PromptCache

    model, clip, _ = tiny_sd15
    m, positive, latent = setup(nodes, model, clip, comfy)

    def by_sigma(n, context, value, extra_options):  # a different prompt at every step
        return n, context * (1.0 + 0.2 * float(extra_options["sigmas"].max())), value

    group = hooks.HookGroup()
    group.add(hooks.TransformerOptionsHook({"patches": {"attn2_patch": [by_sigma]}},
                                           hook_scope=hooks.EnumHookScope.HookedOnly))
    negative = encode(comfy, clip, "blurry")

    def run(pos, neg):
        with torch.inference_mode():
            return comfy.nodes.common_ksampler(m, 3, 4, 5.0, "euler", "normal", pos, neg, latent)[0]["samples"]

    hooked = [hooks.set_hooks_for_conditioning(c, group) for c in (positive, negative)]
    image = run(*hooked)
    assert (image - run(positive, negative)).abs().max() > 1e-2  # the patch matters
    monkeypatch.setattr(PromptCache, "get_or_make", lambda self, options, like, make, tag=None, version=None: make())
    torch.testing.assert_close(image, run(*hooked), atol=1e-5, rtol=1e-5)
