"""Per-run caches of what patches build from the prompts' k/v: built once per run and batch of conditionings,
rebuilt at every step when another node's attn2_patch may change the prompt, and the same image either way."""
import types

import pytest
import torch
from test_attention_nodes import PROMPT, encode, nodes, p2p, sample  # noqa: F401

pytestmark = pytest.mark.host


def patcher_with(attn2_patches):
    options = {"transformer_options": {"patches": {"attn2_patch": list(attn2_patches)}}}
    return types.SimpleNamespace(model_options=options)


def test_the_cache_keys_by_conditionings_and_layout_and_drops_everything_at_a_run_start(comfy):
    from comfyui_personalize.nodes.prompt_cache import PromptCache, keeps_prompt

    cache, built = PromptCache(max_bytes=2**20), []

    def make():
        built.append(1)
        return torch.full((4,), float(len(built)))  # 16 bytes

    got = lambda options, like=torch.zeros(2, 3): int(cache.get_or_make(options, like, make, "layer")[0])  # noqa
    call = {"uuids": ["u", "c"], "cond_or_uncond": [1, 0]}
    assert got(call) == 1 and got(call) == 2  # not enabled before a run starts
    cache.reset(patcher_with([keeps_prompt(lambda *a: a)]))
    assert got(call) == 3 and got(call) == 3
    assert int(cache.get_or_make(call, torch.zeros(2, 3), make, "other layer")[0]) == 4
    assert got({**call, "uuids": ["u", "d"]}) == 5  # another batch of prompts
    assert got({**call, "cond_or_uncond": [0, 1]}) == 6  # another layout
    assert got(call, torch.zeros(4, 3)) == 7  # another shape
    assert got({"cond_or_uncond": [1, 0]}) == 8 and got({"cond_or_uncond": [1, 0]}) == 9  # no uuids: no key
    cache.reset(patcher_with([keeps_prompt(lambda *a: a)]))
    assert got(call) == 10 and got(call) == 10  # a new run builds anew
    cache.reset(patcher_with([keeps_prompt(lambda *a: a), lambda *a: a]))  # a patch that may edit the prompt
    assert got(call) == 11 and got(call) == 12


def test_the_cache_keeps_no_more_than_its_budget(comfy):
    from comfyui_personalize.nodes.prompt_cache import PromptCache

    cache, built = PromptCache(max_bytes=40), []

    def make():
        built.append(1)
        return torch.zeros(2), torch.zeros(2, dtype=torch.float64)  # 8 + 16 bytes

    cache.reset(patcher_with([]))
    for layer in range(3):
        for _ in range(2):
            cache.get_or_make({"uuids": ["u"]}, torch.zeros(1), make, layer)
    assert len(built) == 1 + 2 + 2  # the first layer's pair fits (24 of 40 bytes), the others are built per call
    cache.reset(patcher_with([]))
    cache.get_or_make({"uuids": ["u"]}, torch.zeros(1), make, 2)
    cache.get_or_make({"uuids": ["u"]}, torch.zeros(1), make, 2)
    assert len(built) == 6  # a run start frees the budget


def test_p2p_builds_its_prompt_edits_once_per_run_and_samples_the_same_image(comfy, tiny_sd15, nodes,  # noqa: F811
                                                                            monkeypatch):
    """The swap gathers the source's keys and mixes the target's values: once per run. With another node's
    attn2_patch in the model they are built at every step, and the pair is the same."""
    from comfy.patcher_extension import CallbacksMP

    from comfyui_personalize.nodes.attention_hooks import transformer_blocks
    from comfyui_personalize.nodes.prompt_cache import PromptCache

    builds = []
    get_or_make = PromptCache.get_or_make
    monkeypatch.setattr(PromptCache, "get_or_make", lambda self, options, like, make, tag=None: get_or_make(
        self, options, like, lambda: builds.append(1) or make(), tag))
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
