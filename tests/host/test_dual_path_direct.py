"""The Dual-Path blend's cross-attention as the layer itself (an object patch on the node's clone): used where
nothing else replaces the block's attn2, the same image as ComfyUI's replace route, sent back to that route when
our nodes chain a replace over it, and refused when another pack's replace would bypass it."""
import pytest
import torch
from comfy_tiny import assert_sampled_close, weights_hash
from test_attention_nodes import PROMPT, attention_lora, dual, empty_latent, encode, nodes, p2p, reweight, sample  # noqa: F401
from test_train_lora import run_node

from comfyui_personalize.training.errors import InputError

pytestmark = pytest.mark.host


def direct_layers(model):
    from comfyui_personalize.nodes.dual_path_direct import DirectCrossAttention
    return {k: v for k, v in model.object_patches.items() if isinstance(v, DirectCrossAttention)}


def windowed(nodes, model, hard, lora, a, start, end):  # noqa: F811
    return run_node(nodes["dual"], model=model, hard=hard, lora_name="none", a_blend=a, paths="cross",
                    start_percent=start, end_percent=end, lora=lora).result[0]


def test_the_blend_is_the_layer_itself_on_the_clone_and_the_input_stays_as_it_was(comfy, tiny_sd15, nodes):  # noqa: F811
    from comfyui_personalize.nodes.attention_hooks import transformer_blocks

    model, clip, _ = tiny_sd15
    before = weights_hash(model.model)
    soft, hard = encode(comfy, clip, "a photo of zwx dog"), encode(comfy, clip, "a photo of a dog")
    blended = dual(nodes, model, hard, attention_lora(model), 0.5, paths="cross")
    blocks = transformer_blocks(model)
    assert sorted(direct_layers(blended)) == sorted(f"{b.path}.attn2" for b in blocks)
    options = blended.model_options.get("transformer_options", {})
    assert not options.get("patches_replace", {}).get("attn2")  # no replace route, no stash or output patch
    assert not options.get("patches", {}).get("attn2_patch") and not options.get("patches", {}).get(
        "attn2_output_patch")
    assert not direct_layers(model)
    image = sample(comfy, blended, soft, empty_latent(), clip)
    assert (image - sample(comfy, model, soft, empty_latent(), clip)).abs().max() > 1e-3
    import comfy.ldm.modules.attention as attention
    assert all(type(b.module.attn2) is attention.CrossAttention for b in blocks)  # unpatched after the run
    assert weights_hash(model.model) == before


@pytest.mark.parametrize("a, start, end", [(0.3, 0.0, 1.0), (0.6, 0.25, 0.6), (0.0, 0.0, 1.0)])
def test_the_layer_samples_what_the_replace_route_samples(comfy, tiny_sd15, nodes, monkeypatch, a, start, end):  # noqa: F811
    """Windows included: outside it the layer runs the tuned block alone (a = 1), inside both paths at once."""
    from comfyui_personalize.nodes import dual_path

    model, clip, _ = tiny_sd15
    soft, hard = encode(comfy, clip, "a photo of zwx dog"), encode(comfy, clip, "a photo of a dog")
    blended = windowed(nodes, model, hard, attention_lora(model), a, start, end)
    direct = sample(comfy, blended, soft, empty_latent(), clip, steps=5)
    monkeypatch.setattr(dual_path, "sampling", lambda: False)  # the replace route's math (differentiable)
    torch.testing.assert_close(direct, sample(comfy, blended, soft, empty_latent(), clip, steps=5), atol=5e-3,
                               rtol=1e-3)


def test_our_replace_over_the_blend_sends_it_back_to_the_replace_route(comfy, tiny_sd15, nodes):  # noqa: F811
    """P2P over the blend chains it as a replace on P2P's clone; the blend's own MODEL keeps the direct layer. With
    identical prompts P2P changes nothing: both images of the pair are the blend's image."""
    model, clip, _ = tiny_sd15
    positive = encode(comfy, clip, PROMPT)
    blended = dual(nodes, model, positive, attention_lora(model), 0.5, paths="cross")
    alone = sample(comfy, blended, positive, empty_latent(), clip)
    m, paired, latent = p2p(nodes, blended, clip, PROMPT, PROMPT)
    assert not direct_layers(m) and len(direct_layers(blended)) == len(m.object_patches)
    pair = sample(comfy, m, paired, latent, clip)
    torch.testing.assert_close(pair[1], pair[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pair[:1], alone, atol=2e-3, rtol=1e-3)  # batch 2 vs 1: summation order only
    torch.testing.assert_close(sample(comfy, blended, positive, empty_latent(), clip), alone, atol=0, rtol=0)


def test_a_later_replace_of_another_pack_is_refused_and_renormalized_reweight_too(comfy, tiny_sd15, nodes):  # noqa: F811
    import comfy.ldm.modules.attention as attention

    from comfyui_personalize.nodes.attention_hooks import transformer_blocks

    model, clip, _ = tiny_sd15
    positive = encode(comfy, clip, PROMPT)
    blended = dual(nodes, model, positive, attention_lora(model), 0.5, paths="cross")
    theirs = blended.clone()
    theirs.set_model_attn2_replace(lambda q, k, v, extra: attention.optimized_attention(q, k, v, extra["n_heads"]),
                                   *transformer_blocks(model)[0].key)
    with pytest.raises(InputError) as e:
        sample(comfy, theirs, positive, empty_latent(), clip, steps=2)
    assert e.value.input_name == "model" and "after that node" in str(e.value)
    with pytest.raises(InputError) as e:
        reweight(nodes, blended, clip, "red:2", mode="renormalized")
    assert e.value.input_name == "mode"
    sample(comfy, blended, positive, empty_latent(), clip, steps=2)  # the blend's own MODEL still samples


def test_a_blend_left_loaded_does_not_leak_into_another_branch(comfy, tiny_sd15, nodes):  # noqa: F811
    """ComfyUI keeps the last sampled model patched in place (our layers live in the shared UNet until another clone
    loads): a node building on the plain MODEL meanwhile must see ComfyUI's own layer, not the blend."""
    from comfyui_personalize.nodes.attention_hooks import direct_layer, transformer_blocks

    model, clip, _ = tiny_sd15
    positive = encode(comfy, clip, PROMPT)
    target = PROMPT.replace("car", "bus")
    before, paired, latent = p2p(nodes, model, clip, PROMPT, target)
    expected = sample(comfy, before, paired, latent, clip)
    blended = dual(nodes, model, positive, attention_lora(model), 0.5, paths="cross")
    sample(comfy, blended, positive, empty_latent(), clip)
    blocks = transformer_blocks(model)
    assert any(type(b.module.attn2).__name__ == "DirectCrossAttention" for b in blocks)  # still applied in place
    assert all(direct_layer(model, b) is None for b in blocks)
    after, paired, latent = p2p(nodes, model, clip, PROMPT, target)
    torch.testing.assert_close(sample(comfy, after, paired, latent, clip), expected, atol=0, rtol=0)


@pytest.fixture(scope="module")
def biased_sd15(comfy, tiny_sd15):
    """The tiny SD1.5 UNet with random attention biases (the shared one has them at zero, where a bias counted twice
    or dropped goes unseen), and its CLIP."""
    import comfy.supported_models
    from comfy_tiny import TINY_UNET, tiny_unet_patcher

    model = tiny_unet_patcher(comfy.supported_models.SD15, TINY_UNET, seed=1)
    g = torch.Generator().manual_seed(7)
    with torch.inference_mode():  # its weights were made in inference mode
        for name, p in model.model.named_parameters():
            if "attn2.to_" in name and name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model, tiny_sd15[1]


def counting_weight_paths(monkeypatch):
    """Calls of the weights path's two outputs: the blend (paired_out) and the tuned path alone (soft_out)."""
    from comfyui_personalize.nodes import dual_path_direct

    calls = {"paired_out": 0, "soft_out": 0}
    for name in calls:
        def counted(*args, _name=name, _f=getattr(dual_path_direct, name)):
            calls[_name] += 1
            return _f(*args)
        monkeypatch.setattr(dual_path_direct, name, counted)
    return calls


def by_modules(monkeypatch):
    from comfyui_personalize.nodes import dual_path_direct
    monkeypatch.setattr(dual_path_direct, "plain_linear", lambda module, like: None)


def test_the_layers_own_weights_path_samples_what_the_module_path_samples(comfy, biased_sd15, nodes, monkeypatch):  # noqa: F811
    """Plain linear projections are used as weights (q pair by one batched GEMM, to_out with W + dW merged for the
    run, biases included); projections that are not (lowvram, manual cast, fp8) and runs whose budget cannot keep
    W + dW go through the modules. All three give the same image; W + dW is gone after the run."""
    from comfyui_personalize.nodes import dual_path

    model, clip = biased_sd15
    soft, hard = encode(comfy, clip, "a photo of zwx dog"), encode(comfy, clip, "a photo of a dog")
    lora = attention_lora(model)
    calls = counting_weight_paths(monkeypatch)
    blended = windowed(nodes, model, hard, lora, 0.4, 0.0, 0.6)  # a = 1 after the window: merged out alone
    on_weights = sample(comfy, blended, soft, empty_latent(), clip, steps=5)
    assert calls["paired_out"] > 0 and calls["soft_out"] > 0
    layer = next(iter(direct_layers(blended).values()))
    assert not layer.blend.prompts._values  # W + dW and the k/v released at the run's end

    calls.update(paired_out=0, soft_out=0)
    with monkeypatch.context() as m:
        by_modules(m)
        assert_sampled_close(sample(comfy, blended, soft, empty_latent(), clip, steps=5), on_weights,
                             atol=2e-3, rtol=1e-3)
    with monkeypatch.context() as m:
        m.setattr(dual_path, "cache_budget", lambda model: 0)  # no room for W + dW: the modules
        unkept = windowed(nodes, model, hard, lora, 0.4, 0.0, 0.6)
        assert_sampled_close(sample(comfy, unkept, soft, empty_latent(), clip, steps=5), on_weights,
                             atol=2e-3, rtol=1e-3)
    assert calls == {"paired_out": 0, "soft_out": 0}


def test_scheduled_lora_hooks_reach_the_weights_path(comfy, biased_sd15, nodes, monkeypatch):  # noqa: F811
    """Hook keyframes re-patch the weights mid-run: W + dW and the weights the layer holds must follow them, inside
    the blend's window and after it (a = 1)."""
    from comfy import hooks as comfy_hooks  # not "import comfy.hooks": that would shadow the comfy fixture

    model, clip = biased_sd15
    soft, hard = encode(comfy, clip, "a photo of zwx dog"), encode(comfy, clip, "a photo of a dog")
    hook = comfy_hooks.create_hook_lora(attention_lora(model, seed=11, scale=0.3), 1.0, 1.0).clone()
    keyframes = comfy_hooks.HookKeyframeGroup()
    keyframes.add(comfy_hooks.HookKeyframe(strength=1.0, start_percent=0.0))
    keyframes.add(comfy_hooks.HookKeyframe(strength=0.0, start_percent=0.5))
    hook.set_keyframes_on_hooks(hook_kf=keyframes)
    hooked = comfy_hooks.set_hooks_for_conditioning(soft, hook)
    blended = windowed(nodes, model, hard, attention_lora(model), 0.5, 0.0, 0.7)
    calls = counting_weight_paths(monkeypatch)
    got = sample(comfy, blended, hooked, empty_latent(), clip, cfg=1.0, steps=6)
    assert calls["paired_out"] > 0 and calls["soft_out"] > 0
    by_modules(monkeypatch)
    expected = sample(comfy, blended, hooked, empty_latent(), clip, cfg=1.0, steps=6)
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=1e-3)


def test_only_plain_linear_layers_are_used_as_weights(comfy, tiny_sd15):
    import comfy.ops

    from comfyui_personalize.nodes.dual_path_direct import plain_linear

    x = torch.zeros(1, 4)
    plain = comfy.ops.disable_weight_init.Linear(4, 3)
    plain.weight.data, plain.bias.data = torch.ones(3, 4), torch.zeros(3)
    assert plain_linear(plain, x) == (plain, plain.weight, plain.bias)
    assert plain_linear(plain, x.double()) is None  # another dtype: the module casts
    hooked = comfy.ops.disable_weight_init.Linear(4, 3)
    hooked.weight.data, hooked.bias.data = torch.ones(3, 4), torch.zeros(3)
    handle = hooked.register_forward_hook(lambda module, args, out: out * 2)  # a pack's hook would be skipped
    assert plain_linear(hooked, x) is None
    handle.remove()
    hooked.forward = lambda t: t  # an instance forward, likewise
    assert plain_linear(hooked, x) is None
    del hooked.forward
    assert plain_linear(hooked, x) is not None
    hooked.bias = torch.nn.Parameter(torch.zeros(3, device="meta"))  # a bias elsewhere than the input
    assert plain_linear(hooked, x) is None
    cast = comfy.ops.manual_cast.Linear(4, 3)
    cast.weight.data = torch.ones(3, 4)
    assert plain_linear(cast, x) is None
    plain.weight_function = [lambda w: w * 2]  # a patch applied per call (lowvram LoRA)
    assert plain_linear(plain, x) is None
    fp8 = comfy.ops.fp8_ops.Linear(4, 3)
    fp8.weight.data = torch.ones(3, 4)
    assert plain_linear(fp8, x) is None


def one_prompt(comfy, clip, soft):
    return soft, encode(comfy, clip, "blurry"), 3, 2  # 3 images with CFG: 2 distinct rows of 6


def negative_is_positive(comfy, clip, soft):
    return soft, soft, 2, 2  # equal rows, but only the positive ones take the hard prompt


def two_prompts(comfy, clip, soft):
    other = encode(comfy, clip, "a painting of zwx dog")
    return [[torch.cat([soft[0][0], other[0][0]]), soft[0][1]]], encode(comfy, clip, "blurry"), 2, 3


@pytest.mark.parametrize("case", [one_prompt, negative_is_positive, two_prompts])
@pytest.mark.parametrize("a", [0.4, 0.0])
def test_rows_repeating_a_prompt_are_kept_once_and_sample_what_every_row_built_samples(comfy, biased_sd15, nodes,  # noqa: F811
                                                                                        monkeypatch, case, a):
    """A prompt repeated over the latent batch is projected and kept once and gathered at each call, by value and
    chunk: a negative prompt equal to the positive one keeps its own path, two prompts in one conditioning stay
    apart. Inside the window (a) and after it (the tuned path alone)."""
    from comfyui_personalize.nodes import prompt_cache

    model, clip = biased_sd15
    soft, hard = encode(comfy, clip, "a photo of zwx dog"), encode(comfy, clip, "a photo of a dog")
    positive, negative, images, distinct = case(comfy, clip, soft)
    found, kept, find, release = [], [], prompt_cache.find_distinct_rows, prompt_cache.PromptCache.release
    monkeypatch.setattr(prompt_cache, "find_distinct_rows", lambda c, rows: found.append(find(c, rows)) or found[-1])
    monkeypatch.setattr(prompt_cache.PromptCache, "release", lambda self, *args: kept.append(self._used) or release(
        self, *args))  # the bytes kept at the run's end
    blended = windowed(nodes, model, hard, attention_lora(model), a, 0.0, 0.6)

    def run(latent):
        kept.clear()
        with torch.inference_mode():
            return comfy.nodes.common_ksampler(blended, 3, 3, 5.0, "euler", "normal", positive, negative,
                                               latent)[0]["samples"], max(kept)

    gathered, kept_bytes = run(empty_latent(images))
    assert found and all(len(rows.firsts) == distinct for rows in found)
    if case is one_prompt:
        assert kept_bytes == run(empty_latent(1))[1]  # the kept k/v do not grow with the batch
    monkeypatch.setattr(prompt_cache, "find_distinct_rows", lambda c, labels: None)
    every_row, every_row_bytes = run(empty_latent(images))
    assert every_row_bytes > kept_bytes
    assert_sampled_close(gathered, every_row, atol=1e-4, rtol=1e-4)


def test_hooks_on_the_positive_alone_do_not_find_the_rows_at_every_call(comfy, biased_sd15, nodes, monkeypatch):  # noqa: F811
    """Hooks that differ between cond and uncond re-patch the weights before every model call (ON_APPLY_HOOKS): the
    k/v go, the row map (a host sync) stays for the run, one per layout."""
    from comfy import hooks as comfy_hooks  # not "import comfy.hooks": that would shadow the comfy fixture

    from comfyui_personalize.nodes import prompt_cache

    model, clip = biased_sd15
    soft, hard = encode(comfy, clip, "a photo of zwx dog"), encode(comfy, clip, "a photo of a dog")
    hooked = comfy_hooks.set_hooks_for_conditioning(soft, comfy_hooks.create_hook_lora(
        attention_lora(model, seed=11, scale=0.3), 1.0, 1.0))
    blended = windowed(nodes, model, hard, attention_lora(model), 0.5, 0.0, 1.0)
    found, find = [], prompt_cache.find_distinct_rows
    monkeypatch.setattr(prompt_cache, "find_distinct_rows", lambda c, rows: found.append(find(c, rows)) or found[-1])
    gathered = sample(comfy, blended, hooked, empty_latent(3), clip, steps=4)
    assert len(found) == 2 and all(len(rows.firsts) == 1 for rows in found)  # cond and uncond called apart
    monkeypatch.setattr(prompt_cache, "find_distinct_rows", lambda c, rows: None)
    assert_sampled_close(gathered, sample(comfy, blended, hooked, empty_latent(3), clip, steps=4), atol=1e-4,
                         rtol=1e-4)
