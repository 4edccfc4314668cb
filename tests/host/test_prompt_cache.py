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

    cache, built = PromptCache(max_entries=2), []
    make = lambda: built.append(1) or len(built)  # noqa: E731
    like = torch.zeros(2, 3)
    call = {"uuids": ["u", "c"], "cond_or_uncond": [1, 0]}
    assert cache.get_or_make(call, like, make) == 1 and cache.get_or_make(call, like, make) == 2  # not yet enabled
    cache.reset(patcher_with([keeps_prompt(lambda *a: a)]))
    assert cache.get_or_make(call, like, make) == 3 and cache.get_or_make(call, like, make) == 3
    assert cache.get_or_make({**call, "uuids": ["u", "d"]}, like, make) == 4  # another batch of prompts
    assert cache.get_or_make({**call, "cond_or_uncond": [0, 1]}, like, make) == 5  # another layout
    assert cache.get_or_make(call, torch.zeros(4, 3), make) == 6  # another shape (and the bound clears)
    assert cache.get_or_make({"cond_or_uncond": [1, 0]}, like, make) == 7  # no uuids: nothing to key on
    cache.reset(patcher_with([keeps_prompt(lambda *a: a)]))
    assert cache.get_or_make(call, like, make) == 8  # a new run builds anew
    cache.reset(patcher_with([keeps_prompt(lambda *a: a), lambda *a: a]))  # a patch that may edit the prompt
    assert cache.get_or_make(call, like, make) == 9 and cache.get_or_make(call, like, make) == 10


def test_p2p_builds_its_prompt_edits_once_per_run_and_samples_the_same_image(comfy, tiny_sd15, nodes,  # noqa: F811
                                                                            monkeypatch):
    """The swap gathers the source's keys and mixes the target's values: once per run. With another node's
    attn2_patch in the model they are built at every step, and the pair is the same."""
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
    builds.clear()
    foreign = m.clone()
    foreign.set_model_attn2_patch(lambda n, context, value, extra_options: (n, context, value))
    uncached = sample(comfy, foreign, positive, latent, clip, steps=steps)
    assert len(builds) == layers * steps
    torch.testing.assert_close(uncached, cached, atol=1e-6, rtol=1e-6)
    assert (cached[1] - cached[0]).abs().max() > 0  # the swap did edit the target
