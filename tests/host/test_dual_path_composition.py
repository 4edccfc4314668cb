"""The Dual-Path Attention Blend composed with what ComfyUI users chain around it: token-reshaping patches
(HyperTile, ToMe), a LoRA or a second blend downstream, scheduled LoRA hooks. The launch-lean sampling path must
give what the stock model with the LoRA merged gives (a = 1) or the base model (a = 0)."""
import pytest
import torch
from test_attention_nodes import attention_lora, dual, empty_latent, encode, nodes, sample  # noqa: F401

from comfyui_personalize.training.errors import InputError

pytestmark = pytest.mark.host


def hypertile(model):
    from comfy_extras.nodes_hypertile import HyperTile
    return HyperTile.execute(model, tile_size=32, swap_size=1, max_depth=0, scale_depth=False)[0]


def tome(model):
    from comfy_extras.nodes_tomesd import TomePatchModel
    return TomePatchModel.execute(model, 0.5)[0]


def with_lora(model, lora):
    import comfy.sd
    with torch.inference_mode():
        return comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)[0]  # what LoraLoader does


@pytest.mark.parametrize("reshaper", [hypertile, tome], ids=["hypertile", "tome"])
def test_a_token_reshaping_patch_applied_first_composes(comfy, tiny_sd15, nodes, reshaper):  # noqa: F811
    model, clip, _ = tiny_sd15
    lora = attention_lora(model)
    soft = encode(comfy, clip, "a photo of zwx dog")
    got = sample(comfy, dual(nodes, reshaper(model), soft, lora, 1.0), soft, empty_latent(size=16), clip)
    stock = sample(comfy, reshaper(with_lora(model, lora)), soft, empty_latent(size=16), clip)
    torch.testing.assert_close(got, stock, atol=5e-3, rtol=1e-3)


@pytest.mark.parametrize("reshaper", [hypertile, tome], ids=["hypertile", "tome"])
def test_a_token_reshaping_patch_applied_first_composes_when_both_paths_run(comfy, tiny_sd15, nodes,  # noqa: F811
                                                                           reshaper, monkeypatch):
    """HyperTile splits the queries into tiles and leaves k/v whole: the stacked [soft; hard] rows must be split
    per tensor, as the differentiable path (one attention call per path) does."""
    from comfyui_personalize.nodes import dual_path

    model, clip, _ = tiny_sd15
    soft, hard = encode(comfy, clip, "a photo of zwx dog"), encode(comfy, clip, "a photo of a dog")
    blended = dual(nodes, reshaper(model), hard, attention_lora(model), 0.5)
    lean = sample(comfy, blended, soft, empty_latent(size=16), clip, steps=2)
    monkeypatch.setattr(dual_path, "sampling", lambda: False)
    differentiable = sample(comfy, blended, soft, empty_latent(size=16), clip, steps=2)
    torch.testing.assert_close(lean, differentiable, atol=5e-3, rtol=1e-3)


@pytest.mark.parametrize("reshaper", [hypertile, tome], ids=["hypertile", "tome"])
def test_a_token_reshaping_patch_applied_after_is_refused_with_advice(comfy, tiny_sd15, nodes, reshaper):  # noqa: F811
    model, clip, _ = tiny_sd15
    soft = encode(comfy, clip, "a photo of zwx dog")
    m = reshaper(dual(nodes, model, soft, attention_lora(model), 0.5))
    with pytest.raises(InputError, match="before the Dual-Path Attention Blend") as e:
        sample(comfy, m, soft, empty_latent(size=16), clip, steps=2)
    assert e.value.input_name == "model"


def test_a_lora_added_downstream_reaches_the_hard_path_from_the_next_run(comfy, tiny_sd15, nodes):  # noqa: F811
    """The hard prompt's k/v are cached per run: a LoRA loaded after the blend must not meet stale ones."""
    model, clip, _ = tiny_sd15
    soft, hard = encode(comfy, clip, "a photo of zwx dog"), encode(comfy, clip, "a photo of a dog")
    blended = dual(nodes, model, hard, attention_lora(model), 0.0, paths="cross")
    sample(comfy, blended, soft, empty_latent(), clip, cfg=1.0)  # fills the cache with the base weights
    other = attention_lora(model, seed=11, scale=0.3)
    got = sample(comfy, with_lora(blended, other), soft, empty_latent(), clip, cfg=1.0)
    expected = sample(comfy, with_lora(model, other), hard, empty_latent(), clip, cfg=1.0)
    torch.testing.assert_close(got, expected, atol=5e-3, rtol=1e-3)


def test_scheduled_lora_hooks_reach_the_hard_path(comfy, tiny_sd15, nodes):  # noqa: F811
    """Hook keyframes re-patch the weights mid-run (ON_APPLY_HOOKS): the cached hard k/v must follow."""
    from comfy import hooks as comfy_hooks  # not "import comfy.hooks": that would shadow the comfy fixture

    model, clip, _ = tiny_sd15
    soft, hard = encode(comfy, clip, "a photo of zwx dog"), encode(comfy, clip, "a photo of a dog")

    def hooked(cond):
        hooks = comfy_hooks.create_hook_lora(attention_lora(model, seed=11, scale=0.3), 1.0, 1.0)
        keyframes = comfy_hooks.HookKeyframeGroup()
        keyframes.add(comfy_hooks.HookKeyframe(strength=1.0, start_percent=0.0))
        keyframes.add(comfy_hooks.HookKeyframe(strength=0.0, start_percent=0.5))
        hooks = hooks.clone()
        hooks.set_keyframes_on_hooks(hook_kf=keyframes)
        return comfy_hooks.set_hooks_for_conditioning(cond, hooks)

    blended = dual(nodes, model, hard, attention_lora(model), 0.0, paths="cross")
    got = sample(comfy, blended, hooked(soft), empty_latent(), clip, cfg=1.0, steps=6)
    expected = sample(comfy, model, hooked(hard), empty_latent(), clip, cfg=1.0, steps=6)
    torch.testing.assert_close(got, expected, atol=5e-3, rtol=1e-3)


def test_two_chained_blends_keep_both_out_deltas(comfy, tiny_sd15, nodes):  # noqa: F811
    model, clip, _ = tiny_sd15
    first, second = attention_lora(model), attention_lora(model, seed=11, scale=0.1)
    soft = encode(comfy, clip, "a photo of zwx dog")
    chained = dual(nodes, dual(nodes, model, soft, first, 1.0), soft, second, 1.0)
    got = sample(comfy, chained, soft, empty_latent(), clip)
    stock = sample(comfy, with_lora(with_lora(model, first), second), soft, empty_latent(), clip)
    torch.testing.assert_close(got, stock, atol=5e-3, rtol=1e-3)


def test_cross_only_says_when_it_leaves_self_attention_factors_out(comfy, tiny_sd15, nodes):  # noqa: F811
    from test_train_lora import run_node

    model, clip, _ = tiny_sd15
    soft = encode(comfy, clip, "a photo of zwx dog")
    args = dict(model=model, hard=soft, lora_name="none", a_blend=1.0, start_percent=0.0, end_percent=1.0)
    out = run_node(nodes["dual"], paths="cross", lora=attention_lora(model), **args)
    assert "self+cross" in out.ui.as_dict()["text"][0]
    cross_only = {k: v for k, v in attention_lora(model).items() if "attn1" not in k}
    assert run_node(nodes["dual"], paths="cross", lora=cross_only, **args).ui is None


def test_k_v_pairs_are_built_once_per_run_unless_another_patch_edits_the_prompt(comfy, tiny_sd15, nodes,  # noqa: F811
                                                                                  monkeypatch):
    """Both paths' k/v depend only on the prompts and the weights: the blend builds them at the first step and
    reuses them. Another node's attn2_patch may change the prompt at any step: then they are built at every step,
    and the image is the same as with the cache."""
    from comfyui_personalize.nodes import dual_path
    from comfyui_personalize.nodes.attention_hooks import transformer_blocks

    model, clip, _ = tiny_sd15
    soft, hard = encode(comfy, clip, "a photo of zwx dog"), encode(comfy, clip, "a photo of a dog")
    builds = []
    build = dual_path._Blend.hard_rows
    monkeypatch.setattr(dual_path._Blend, "hard_rows", lambda self, *args: builds.append(1) or build(self, *args))
    blended = dual(nodes, model, hard, attention_lora(model), 0.5, paths="cross")
    layers, steps = len(transformer_blocks(model)), 3
    cached = sample(comfy, blended, soft, empty_latent(), clip, steps=steps)
    assert len(builds) == layers  # cond and uncond run as one batch here: one build per layer
    builds.clear()
    again = sample(comfy, blended, soft, empty_latent(), clip, steps=steps)
    assert len(builds) == layers and torch.equal(again, cached)  # a new run builds anew
    builds.clear()
    foreign = blended.clone()
    foreign.set_model_attn2_patch(lambda n, context, value, extra_options: (n, context, value))
    uncached = sample(comfy, foreign, soft, empty_latent(), clip, steps=steps)
    assert len(builds) == layers * steps
    torch.testing.assert_close(uncached, cached, atol=1e-6, rtol=1e-6)
