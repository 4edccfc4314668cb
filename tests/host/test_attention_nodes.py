"""Attention nodes on a tiny ComfyUI model: patches on clones, chaining, pairing and the identities."""
import pytest
import torch
from test_train_lora import run_node

from comfyui_personalize.training.errors import InputError

pytestmark = pytest.mark.host
PROMPT = "a photo of a red car on a street"


@pytest.fixture(scope="module")
def nodes(comfy):
    from comfyui_personalize.nodes.attention_maps import PersonalizeAttentionMaps
    from comfyui_personalize.nodes.attention_reweight import PersonalizeAttentionReweight
    from comfyui_personalize.nodes.dual_path import PersonalizeDualPathBlend
    from comfyui_personalize.nodes.p2p import PersonalizeP2P
    return dict(reweight=PersonalizeAttentionReweight, p2p=PersonalizeP2P, dual=PersonalizeDualPathBlend,
                maps=PersonalizeAttentionMaps)


def empty_latent(n=1, size=8):
    return {"samples": torch.zeros(n, 4, size, size)}


def sample(comfy, model, positive, latent, clip=None, seed=3, steps=4, sampler="euler", cfg=5.0):
    neg = comfy.nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    with torch.inference_mode():
        return comfy.nodes.common_ksampler(model, seed, steps, cfg, sampler, "normal", positive, neg, latent)[0][
            "samples"]


def encode(comfy, clip, text):
    return comfy.nodes.CLIPTextEncode().encode(clip, text)[0]


def reweight(nodes, model, clip, words, mode="value", **kw):
    args = dict(model=model, clip=clip, text=PROMPT, words=words, mode=mode, apply_to="cond", start_percent=0.0,
                end_percent=1.0, latent=empty_latent())
    return run_node(nodes["reweight"], **{**args, **kw}).result[:3]  # model, positive, latent


def p2p(nodes, model, clip, source, target, **kw):
    args = dict(model=model, clip=clip, source=source, target=target, latent=empty_latent(), mode="auto",
                cross_start_percent=0.0, cross_end_percent=0.8, word_windows="", self_start_percent=0.0,
                self_end_percent=0.4, reweight="", blend_words="", blend_threshold=0.3, blend_start_percent=0.2)
    return run_node(nodes["p2p"], **{**args, **kw}).result


def test_reweight_one_is_identity_and_other_weights_change_the_image(comfy, tiny_sd15, nodes):
    model, clip, _ = tiny_sd15
    options_before = repr(model.model_options)
    plain = sample(comfy, model, encode(comfy, clip, PROMPT), empty_latent(), clip)
    for mode in ("value", "renormalized"):
        m, positive, _ = reweight(nodes, model, clip, "red:1.0, street:1", mode=mode)
        torch.testing.assert_close(sample(comfy, m, positive, empty_latent(), clip), plain, atol=1e-5, rtol=1e-5)
        m2, _, _ = reweight(nodes, model, clip, "red:3", mode=mode)
        assert (sample(comfy, m2, positive, empty_latent(), clip) - plain).abs().max() > 1e-3
    m0, positive, _ = reweight(nodes, model, clip, "red:0")
    m0x, _, _ = reweight(nodes, model, clip, "red:0, car:0")
    assert (sample(comfy, m0, positive, empty_latent(), clip) - sample(comfy, m0x, positive, empty_latent(), clip)
            ).abs().max() > 1e-4  # 0 removes a word: removing another one as well changes the image again
    assert repr(model.model_options) == options_before  # the input MODEL carries no patch


def test_reweight_window_outside_sampling_is_identity(comfy, tiny_sd15, nodes):
    model, clip, _ = tiny_sd15
    plain = sample(comfy, model, encode(comfy, clip, PROMPT), empty_latent(), clip)
    m, positive, _ = reweight(nodes, model, clip, "red:5", start_percent=1.0, end_percent=1.0)
    torch.testing.assert_close(sample(comfy, m, positive, empty_latent(), clip), plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("override, input_name", [
    (dict(words="blue:2"), "words"), (dict(words="red:lots"), "words"), (dict(words="red"), "words"),
    (dict(start_percent=0.8, end_percent=0.2), "start_percent"), (dict(words="red:-1", mode="renormalized"), "words"),
    (dict(words=" , "), "words"),
])
def test_reweight_bad_inputs_name_the_input(comfy, tiny_sd15, nodes, override, input_name):
    model, clip, _ = tiny_sd15
    with pytest.raises(InputError) as e:
        reweight(nodes, model, clip, **{"words": "red:2", **override})
    assert e.value.input_name == input_name


def test_p2p_identical_prompts_give_identical_pairs_and_the_plain_image(comfy, tiny_sd15, nodes):
    model, clip, _ = tiny_sd15
    m, positive, latent = p2p(nodes, model, clip, PROMPT, PROMPT)
    assert latent["samples"].shape[0] == 2 and latent["batch_index"] == [0, 0]
    pair = sample(comfy, m, positive, latent, clip)
    torch.testing.assert_close(pair[1], pair[0], atol=1e-5, rtol=1e-5)
    plain = sample(comfy, model, encode(comfy, clip, PROMPT), empty_latent(), clip)
    # batch 2 vs batch 1 changes the float summation order a little; the pairing itself is exact (above)
    torch.testing.assert_close(pair[:1], plain, atol=2e-3, rtol=1e-3)


def test_p2p_without_injection_is_plain_sampling_of_each_prompt(comfy, tiny_sd15, nodes):
    """Windows closed: the pair is exactly source and target sampled alone with the same noise."""
    model, clip, _ = tiny_sd15
    target = PROMPT.replace("car", "bus")
    m, positive, latent = p2p(nodes, model, clip, PROMPT, target, cross_end_percent=0.0, self_end_percent=0.0)
    pair = sample(comfy, m, positive, latent, clip)
    torch.testing.assert_close(pair[1:], sample(comfy, model, encode(comfy, clip, target), empty_latent(), clip),
                               atol=2e-3, rtol=1e-3)
    edited, _, _ = p2p(nodes, model, clip, PROMPT, target)
    pair_edited = sample(comfy, edited, positive, latent, clip)
    torch.testing.assert_close(pair_edited[0], pair[0], atol=1e-5, rtol=1e-5)  # the source row is untouched
    assert (pair_edited[1] - pair[1]).abs().max() > 1e-3  # injection changes the edited image


def test_p2p_self_injection_alone_edits_the_target_and_keeps_another_attn1_replace(comfy, tiny_sd15, nodes):
    """Self-attention injection only (cross window closed) changes the edited image, not the source; another
    pack's attn1 replace on the input model still runs (the injection is an attn1_patch before the projections)."""
    import comfy.ldm.modules.attention as attention

    from comfyui_personalize.nodes.attention_hooks import transformer_blocks
    model, clip, _ = tiny_sd15
    calls = []

    def other_replace(q, k, v, extra):
        calls.append(1)
        return attention.optimized_attention(q, k, v, extra["n_heads"])
    other = model.clone()
    for block in transformer_blocks(model):
        other.set_model_attn1_replace(other_replace, *block.key)
    target = PROMPT.replace("car", "bus")
    plain, positive, latent = p2p(nodes, other, clip, PROMPT, target, cross_end_percent=0.0, self_end_percent=0.0)
    injected, _, _ = p2p(nodes, other, clip, PROMPT, target, cross_end_percent=0.0, self_end_percent=1.0)
    pair = sample(comfy, plain, positive, latent, clip)
    calls.clear()
    pair_injected = sample(comfy, injected, positive, latent, clip)
    assert calls  # the other replace ran
    torch.testing.assert_close(pair_injected[0], pair[0], atol=1e-5, rtol=1e-5)
    assert (pair_injected[1] - pair[1]).abs().max() > 1e-3


def blend_mask(m, size=(8, 8)):
    """The local-blend mask the P2P model's post-CFG step used last (its maps stay after the run)."""
    from comfyui_personalize.nodes.p2p_patches import BlendRecorder
    recorder, = [cell.cell_contents for f in m.model_options["sampler_post_cfg_function"]
                 for cell in f.__closure__ or () if isinstance(cell.cell_contents, BlendRecorder)]
    return recorder.local.mask(size)[0, 0]


def test_p2p_local_blend_changes_the_target_only_inside_the_words_mask(comfy, tiny_sd15, nodes):
    """Euler's last step lands on the (blended) prediction, so the final target is the source outside the mask."""
    model, clip, _ = tiny_sd15
    target = PROMPT.replace("car", "bus")

    def run(source=PROMPT, edited=target, **kw):
        m, positive, latent = p2p(nodes, model, clip, source, edited, **kw)
        return sample(comfy, m, positive, latent, clip)

    # threshold 1: no map exceeds its own maximum, the mask is empty and the edit is blended away entirely
    kept = run(blend_words="car, bus", blend_threshold=1.0)
    torch.testing.assert_close(kept[1], kept[0], atol=1e-5, rtol=1e-5)
    for word in ("car", "bus"):  # the mask of a source word, of a target word
        m, positive, latent = p2p(nodes, model, clip, PROMPT, target, blend_words=word, blend_threshold=0.8)
        # "bus" through a clone, as any model node after P2P makes (FreeU, LoraLoader): the blend was lost there
        pair = sample(comfy, m if word == "car" else m.clone(), positive, latent, clip)
        mask = blend_mask(m).cpu()
        assert 0 < mask.mean() < 1, word  # part of the image may change
        changed = (pair[1] - pair[0]).abs().amax(0)
        assert changed[mask == 0].max() < 1e-5 and changed[mask == 1].max() > 1e-2, word
    # threshold 0: every map exceeds it, the mask is everything: the plain edit (as without blend words)
    torch.testing.assert_close(run(blend_words="car, bus", blend_threshold=0.0), run(), atol=1e-4, rtol=1e-4)
    # refinement (added words) with a reweight blends the same way
    refined = run("a photo of a car", "a photo of a red car", mode="refine", blend_words="car", blend_threshold=1.0,
                  reweight="red:2")
    torch.testing.assert_close(refined[1], refined[0], atol=1e-5, rtol=1e-5)


def test_p2p_bad_inputs(comfy, tiny_sd15, nodes):
    model, clip, _ = tiny_sd15
    with pytest.raises(InputError) as e:
        p2p(nodes, model, clip, "a photo of a car", "a photo of a red car", mode="swap")
    assert e.value.input_name == "target" and "refine" in str(e.value)
    with pytest.raises(InputError) as e:
        p2p(nodes, model, clip, PROMPT, PROMPT, self_start_percent=0.5, self_end_percent=0.1)
    assert e.value.input_name == "self_start_percent"
    with pytest.raises(InputError) as e:
        p2p(nodes, model, clip, PROMPT, PROMPT, blend_words="giraffe")
    assert e.value.input_name == "blend_words"


def test_patches_chain_with_an_existing_replace(comfy, tiny_sd15, nodes, monkeypatch):
    """A replace already on the model (IPAdapter-style) keeps running under ours, on every path of P2P's replace."""
    import comfy.ldm.modules.attention as attention

    from comfyui_personalize.attention import edits
    from comfyui_personalize.nodes.attention_hooks import transformer_blocks
    model, clip, _ = tiny_sd15
    split_calls = []
    split = edits.p2p_cross_with
    monkeypatch.setattr(edits, "p2p_cross_with", lambda *a: split_calls.append(1) or split(*a))

    def theirs(q, k, v, extra_options):  # scales its output: linear in v, as P2P's split into two calls needs
        return attention.optimized_attention(q, k, v, extra_options["n_heads"]) * 1.5

    base = model.clone()
    for b in transformer_blocks(base):
        base.set_model_attn2_replace(theirs, *b.key)
    positive = encode(comfy, clip, PROMPT)
    theirs_only = sample(comfy, base, positive, empty_latent(), clip, steps=2)
    assert (theirs_only - sample(comfy, model, positive, empty_latent(), clip, steps=2)).abs().max() > 1e-2
    # identical prompts make P2P an identity: both images are what their replace alone makes. By default the
    # targets take one attention call with the source's q/k; a word whose window closed early (red, after the
    # first step) splits it into two calls (source maps for the other words, its own map for that word).
    for windows, splits in (("", False), ("red:0", True)):
        m, paired, latent = p2p(nodes, base, clip, PROMPT, PROMPT, word_windows=windows)
        pair = sample(comfy, m, paired, latent, clip, steps=2)
        torch.testing.assert_close(pair, theirs_only.expand_as(pair), atol=2e-3, rtol=1e-3)
        assert bool(split_calls) == splits
    table = base.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert all(fn is theirs for fn in table.values())  # the input clone kept its own patches


def test_non_unet_model_is_refused(comfy):
    import types

    from comfyui_personalize.nodes.attention_hooks import require_unet
    fake = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=torch.nn.Linear(2, 2)))
    with pytest.raises(InputError) as e:
        require_unet(fake)
    assert e.value.input_name == "model" and "Linear" in str(e.value)


def test_attention_maps_are_images_of_the_words(comfy, tiny_sd15, nodes):
    model, clip, _ = tiny_sd15
    latent = {"samples": torch.randn(1, 4, 8, 8)}
    maps = run_node(nodes["maps"], model=model, clip=clip, text=PROMPT, words="red, street", latent=latent,
                    resolution="all", at_percent=0.5, seed=0).result[0]
    assert maps.shape == (2, 64, 64, 3) and 0 <= maps.min() and maps.max() <= 1
    assert not torch.allclose(maps[0], maps[1])
    with pytest.raises(InputError) as e:
        run_node(nodes["maps"], model=model, clip=clip, text=PROMPT, words="giraffe", latent=latent,
                 resolution="all", at_percent=0.5, seed=0)
    assert e.value.input_name == "words" and "Words found in the prompt: a, photo" in str(e.value)


def attention_lora(model, seed=5, scale=0.1):
    """A kohya-key LoRA on every attention projection with non-zero factors (as our trainer writes them)."""
    from comfyui_personalize.nodes.comfy_adapter import ComfyHost
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, lin in ComfyHost(model, None, None).unet_lora_targets("attention").items():
        sd[f"{name}.lora_down.weight"] = torch.randn(2, lin.in_features, generator=g) * scale
        sd[f"{name}.lora_up.weight"] = torch.randn(lin.out_features, 2, generator=g) * scale
        sd[f"{name}.alpha"] = torch.tensor(2.0)
    return sd


def dual(nodes, model, hard, lora, a, paths="self+cross"):
    return run_node(nodes["dual"], model=model, hard=hard, lora_name="none", a_blend=a, paths=paths,
                    start_percent=0.0, end_percent=1.0, lora=lora).result[0]


def test_dual_path_ends_are_the_lora_model_and_the_base_model(comfy, tiny_sd15, nodes):
    model, clip, _ = tiny_sd15
    lora = attention_lora(model)
    soft, hard = encode(comfy, clip, "a photo of zwx dog"), encode(comfy, clip, "a photo of a dog")
    import comfy.sd as comfy_sd
    with torch.inference_mode():
        with_lora, _ = comfy_sd.load_lora_for_models(model, None, lora, 1.0, 0.0)  # what LoraLoader does
    full = sample(comfy, dual(nodes, model, hard, lora, 1.0), soft, empty_latent(), clip)
    stock = sample(comfy, with_lora, soft, empty_latent(), clip)
    assert (stock - sample(comfy, model, soft, empty_latent(), clip)).abs().max() > 1.0  # the LoRA matters
    # (sample values here reach ~35: compare relatively; LoRA merged into W vs added beside it differ by rounding)
    torch.testing.assert_close(full, stock, atol=5e-3, rtol=1e-3)
    # a = 0: the positive rows attend with the hard prompt through the base weights; negative rows keep their
    # own prompt, also through the base weights (cfg 1 below, so only the positive rows are compared)
    base_cond = dual(nodes, model, hard, lora, 0.0)
    mid = sample(comfy, dual(nodes, model, hard, lora, 0.5), soft, empty_latent(), clip)
    assert (mid - full).abs().max() > 1e-3
    none = sample(comfy, base_cond, soft, empty_latent(), clip, cfg=1.0)
    torch.testing.assert_close(none, sample(comfy, model, hard, empty_latent(), clip, cfg=1.0), atol=5e-3, rtol=1e-3)
    assert "patches_replace" not in model.model_options.get("transformer_options", {})


def test_p2p_self_injection_over_a_dual_path_blend_is_the_source_map_of_its_lora_model(comfy, tiny_sd15, nodes):
    """P2P applied after a Dual-Path blend (self+cross, a = 1: the LoRA model): the targets' q and k must be their
    source's through W + dW alike, so the pair equals P2P on the LoRA-merged model. Were the blend's stash of the
    block input taken before P2P's gather, a target's q would be W x_src + dW x_tgt."""
    import comfy.sd as comfy_sd
    model, clip, _ = tiny_sd15
    lora = attention_lora(model, scale=0.3)
    with torch.inference_mode():
        with_lora, _ = comfy_sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    target = PROMPT.replace("car", "bus")
    blended = dual(nodes, model, encode(comfy, clip, PROMPT), lora, 1.0)
    pairs = []
    for base in (blended, with_lora):
        m, positive, latent = p2p(nodes, base, clip, PROMPT, target, cross_end_percent=0.0, self_end_percent=1.0)
        pairs.append(sample(comfy, m, positive, latent, clip))
    torch.testing.assert_close(pairs[0], pairs[1], atol=5e-3, rtol=1e-3)


def test_dual_path_sampling_path_equals_the_differentiable_one(comfy, tiny_sd15, nodes, monkeypatch):
    """Under inference mode the blend takes the launch-lean path (both paths in one attention call, per-run k/v
    pairs); with autograd on, the differentiable functions. Both sample the same image, run after run."""
    from comfy.patcher_extension import CallbacksMP

    from comfyui_personalize.nodes import dual_path, dual_path_direct
    from comfyui_personalize.nodes.attention_hooks import transformer_blocks

    calls = {"lean": 0, "differentiable": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(dual_path_direct, "blend_pairs", counted("lean", dual_path_direct.blend_pairs))
    monkeypatch.setattr(dual_path_direct, "paired_out", counted("lean", dual_path_direct.paired_out))  # on weights
    monkeypatch.setattr(dual_path, "cross_blend", counted("differentiable", dual_path.cross_blend))
    model, clip, _ = tiny_sd15
    lora = attention_lora(model)
    soft, hard = encode(comfy, clip, "a photo of zwx dog"), encode(comfy, clip, "a photo of a dog")
    blended = dual(nodes, model, hard, lora, 0.4, paths="cross")
    lean = [sample(comfy, blended, soft, empty_latent(), clip) for _ in range(2)]  # the 2nd reuses the caches
    monkeypatch.setattr(dual_path, "sampling", lambda: False)  # as if autograd were on (fast tuning)
    differentiable = sample(comfy, blended, soft, empty_latent(), clip)
    assert calls["lean"] > 0 and calls["differentiable"] > 0  # each run took the path it should
    torch.testing.assert_close(lean[0], differentiable, atol=5e-3, rtol=1e-3)
    assert torch.equal(lean[0], lean[1])
    resets = blended.get_all_callbacks(CallbacksMP.ON_PRE_RUN)  # per-run caches are dropped at each run start
    owners = [type(getattr(r, "__self__", None)).__name__ for r in resets if getattr(r, "__name__", "") == "reset"]
    assert owners.count("_Blend") == len(transformer_blocks(model)) and owners.count("PromptCache") == 1


def test_dual_path_over_a_replace_that_returns_its_input(comfy, tiny_sd15, nodes, monkeypatch):
    """Another pack's replace may return a view of q/k/v; the in-place sampling path must not run over it."""
    from comfyui_personalize.nodes import dual_path
    from comfyui_personalize.nodes.attention_hooks import transformer_blocks

    model, clip, _ = tiny_sd15
    base = model.clone()
    for b in transformer_blocks(base):
        base.set_model_attn2_replace(lambda q, k, v, extra_options: q, *b.key)  # "attention" = its query
    lora = attention_lora(model)
    soft, hard = encode(comfy, clip, "a photo of zwx dog"), encode(comfy, clip, "a photo of a dog")
    blended = dual(nodes, base, hard, lora, 0.4, paths="cross")
    got = sample(comfy, blended, soft, empty_latent(), clip, steps=2)
    monkeypatch.setattr(dual_path, "sampling", lambda: False)  # the out-of-place functions
    torch.testing.assert_close(got, sample(comfy, blended, soft, empty_latent(), clip, steps=2), atol=1e-4, rtol=1e-4)


def test_dual_path_needs_a_lora(comfy, tiny_sd15, nodes):
    model, clip, _ = tiny_sd15
    with pytest.raises(InputError) as e:
        dual(nodes, model, encode(comfy, clip, "a dog"), None, 0.5)
    assert e.value.input_name == "lora_name"


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m_sde", "euler"])
def test_p2p_pairs_keep_one_noise_with_samplers_that_add_noise_every_step(comfy, tiny_sd15, nodes, caplog, sampler):
    """Identical prompts give identical images in the pair, also where the sampler adds noise at every step (one
    per-step noise per pair), and nothing is warned."""
    model, clip, _ = tiny_sd15
    m, positive, latent = p2p(nodes, model, clip, PROMPT, PROMPT)
    with caplog.at_level("WARNING"):
        pair = sample(comfy, m, positive, latent, clip, steps=2, sampler=sampler)
    assert not [r for r in caplog.records if "loses the source's layout" in r.getMessage()]
    torch.testing.assert_close(pair[1], pair[0], atol=1e-5, rtol=1e-5)


def test_renormalized_mode_refuses_to_drop_an_existing_replace(comfy, tiny_sd15, nodes):
    from comfyui_personalize.nodes.attention_hooks import transformer_blocks
    model, clip, _ = tiny_sd15
    base = model.clone()
    block = transformer_blocks(base)[0]
    base.set_model_attn2_replace(lambda q, k, v, extra_options: v, *block.key)
    with pytest.raises(InputError) as e:
        reweight(nodes, base, clip, "car:2", mode="renormalized")
    assert e.value.input_name == "mode" and "value" in str(e.value)
    reweight(nodes, base, clip, "car:2", mode="value")  # value mode runs on top of it
