"""Attention Reweight on the negative prompt: words are found in the prompt they weigh (the negative prompt's words sit
at other positions than the positive's), and each chunk of the batch takes its own prompt's weights."""
import pytest
import torch
from test_attention_nodes import empty_latent, encode, nodes  # noqa: F401
from test_sdxl import tiny_sdxl_clip  # noqa: F401
from test_train_lora import run_node

from comfyui_personalize.training.errors import InputError

pytestmark = pytest.mark.host
POSITIVE = "a photo of a red car on a street"
NEGATIVE = "blurry, low quality, street"


def reweighted(nodes, model, clip, words, apply_to, mode="value", negative_text=NEGATIVE):  # noqa: F811
    out = run_node(nodes["reweight"], model=model, clip=clip, text=POSITIVE, words=words, mode=mode,
                   apply_to=apply_to, start_percent=0.0, end_percent=1.0, latent=empty_latent(),
                   negative_text=negative_text).result
    return out[0], out[1], out[3]  # model, positive, negative


def sample(comfy, model, positive, negative, cfg=5.0):
    with torch.inference_mode():
        return comfy.nodes.common_ksampler(model, 3, 4, cfg, "euler", "normal", positive, negative,
                                           empty_latent())[0]["samples"]


@pytest.mark.parametrize("mode", ["value", "renormalized"])
def test_words_of_the_negative_prompt_are_weighed_where_they_are_in_it(comfy, tiny_sd15, nodes, mode):  # noqa: F811
    model, clip, _ = tiny_sd15
    positive, negative = encode(comfy, clip, POSITIVE), encode(comfy, clip, NEGATIVE)
    plain = sample(comfy, model, positive, negative)
    m, pos, neg = reweighted(nodes, model, clip, "blurry:1", "uncond", mode)
    torch.testing.assert_close(neg[0][0], negative[0][0], atol=0, rtol=0)  # the negative output is its encoding
    torch.testing.assert_close(sample(comfy, m, pos, neg), plain, atol=1e-5, rtol=1e-5)  # weight 1: identity
    m, pos, neg = reweighted(nodes, model, clip, "blurry:3", "uncond", mode)
    assert (sample(comfy, m, pos, neg) - plain).abs().max() > 1e-3
    # "both" weighs each prompt's own words: the same as the positive's and the negative's reweights chained
    both, pos, neg = reweighted(nodes, model, clip, "red:0.2, blurry:3", "both", mode)
    if mode == "value":  # value patches chain (renormalized refuses a replace under it)
        first, _, _ = reweighted(nodes, model, clip, "red:0.2", "cond", mode)
        chained, _, _ = reweighted(nodes, first, clip, "blurry:3", "uncond", mode)
        torch.testing.assert_close(sample(comfy, both, pos, neg), sample(comfy, chained, pos, neg), atol=1e-5,
                                   rtol=1e-5)
    # a word in both prompts ("street") weighs in each, at its own position there
    street, pos, neg = reweighted(nodes, model, clip, "street:0", "both", mode)
    only_positive, _, _ = reweighted(nodes, model, clip, "street:0", "cond", mode)
    assert (sample(comfy, street, pos, neg) - sample(comfy, only_positive, pos, neg)).abs().max() > 1e-3


def test_a_word_that_is_not_in_the_prompt_it_weighs_is_refused(comfy, tiny_sd15, nodes):  # noqa: F811
    model, clip, _ = tiny_sd15
    with pytest.raises(InputError, match="words.*'red' is not in the prompt"):
        reweighted(nodes, model, clip, "red:0", "uncond")  # before, it scaled whatever the negative held there
    with pytest.raises(InputError, match="words.*'green' is in neither"):
        reweighted(nodes, model, clip, "red:2, green:2", "both")
    with pytest.raises(InputError, match="negative_text"):
        reweighted(nodes, model, clip, "red:2", "both", negative_text=" ")


def test_p2p_locked_reweights_the_positive_alone(comfy, tiny_sd15, nodes, caplog):  # noqa: F811
    model, clip, _ = tiny_sd15
    m, pos, neg = reweighted(nodes, model, clip, "red:2", "both", "p2p_locked")
    assert "p2p_locked reweights the positive prompt only" in caplog.text
    assert pos[0][0].shape[0] == 2 and neg[0][0].shape[0] == 1  # the pair; the negative as written


FRESH_NOISE = ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_sde_gpu", "lcm", "ddpm", "seeds_2", "sa_solver"]


@pytest.mark.parametrize("sampler", FRESH_NOISE + ["dpmpp_2m"])
def test_samplers_that_add_noise_every_step_keep_the_pair_paired(comfy, tiny_sd15, nodes, caplog, sampler):  # noqa: F811
    """With weight 1 the reweighted image is the source's: each pair draws one per-step noise (before, lcm, ddpm,
    seeds and sa_solver drifted apart by 40-125 unwarned, ancestral and SDE ones with a warning)."""
    model, clip, _ = tiny_sd15
    out = run_node(nodes["reweight"], model=model, clip=clip, text=POSITIVE, words="red:1", mode="p2p_locked",
                   apply_to="cond", start_percent=0.0, end_percent=1.0, latent=empty_latent(2)).result
    with caplog.at_level("WARNING"), torch.inference_mode():
        pairs = comfy.nodes.common_ksampler(out[0], 3, 3, 5.0, sampler, "normal", out[1],
                                            encode(comfy, clip, NEGATIVE), out[2])[0]["samples"]
        plain = comfy.nodes.common_ksampler(model, 3, 3, 5.0, sampler, "normal", encode(comfy, clip, POSITIVE),
                                            encode(comfy, clip, NEGATIVE), empty_latent(2))[0]["samples"]
    assert not any("loses the source's layout" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(pairs[1::2], pairs[0::2], atol=1e-5, rtol=1e-5)
    assert (pairs[0] - pairs[2]).abs().max() > 1e-3  # the two pairs have their own noise
    # the sources are the images this sampler makes without the edit: its own kind of noise, from the same seed
    # (batches of 4 and 2 round differently on some CPUs, up to 9e-4 after 3 steps; other noise differs by > 0.1)
    torch.testing.assert_close(pairs[0::2], plain, atol=5e-3, rtol=5e-3)


def test_a_sampler_that_brings_its_own_noise_is_left_alone_and_warned(comfy, tiny_sd15, nodes, caplog):  # noqa: F811
    from comfy import sample, samplers

    model, clip, _ = tiny_sd15
    out = run_node(nodes["reweight"], model=model, clip=clip, text=POSITIVE, words="red:1", mode="p2p_locked",
                   apply_to="cond", start_percent=0.0, end_percent=1.0, latent=empty_latent()).result
    latent = out[2]["samples"]
    own = samplers.ksampler("euler_ancestral",
                            {"noise_sampler": lambda s, s_next: torch.randn(latent.shape, device=s.device)})
    sigmas = samplers.calculate_sigmas(out[0].get_model_object("model_sampling"), "normal", 3)
    with caplog.at_level("WARNING"), torch.inference_mode():
        pair = sample.sample_custom(out[0], sample.prepare_noise(latent, 3, [0, 0]), 5.0, own, sigmas, out[1],
                                    encode(comfy, clip, NEGATIVE), latent, seed=3)
    assert any("loses the source's layout" in r.getMessage() for r in caplog.records)
    assert (pair[1] - pair[0]).abs().max() > 1e-3  # its own noise, per image


def test_dual_path_on_sdxl_blends_the_pooled_vector_too(comfy, nodes, tiny_sdxl_clip):  # noqa: F811
    """SDXL reads the prompt through y as well: at a = 0 the blend is the base model on the hard prompt, pooled
    vector included (before, the soft prompt's pooled vector stayed: a difference of 65 on this model)."""
    from comfy import supported_models  # not "import comfy.x": that would shadow the comfy fixture
    from comfy_tiny import TINY_SDXL, tiny_unet_patcher
    from test_attention_nodes import attention_lora, dual

    model = tiny_unet_patcher(supported_models.SDXL, TINY_SDXL, seed=4)
    clip = tiny_sdxl_clip
    soft, hard = encode(comfy, clip, "a photo of zwx dog"), encode(comfy, clip, "a photo of a dog")
    negative = encode(comfy, clip, "blurry")
    assert hard[0][1]["pooled_output"].shape == (1, 1280)
    base_on_hard = sample(comfy, model, hard, negative)
    blended = dual(nodes, model, hard, attention_lora(model), 0.0)
    torch.testing.assert_close(sample(comfy, blended, soft, negative), base_on_hard, atol=1e-4, rtol=1e-4)
    half = dual(nodes, model, hard, attention_lora(model), 0.5)
    assert (sample(comfy, half, soft, negative) - base_on_hard).abs().max() > 1e-3


def test_p2p_refuses_a_word_window_outside_sampling_and_lists_the_words_it_can_find(comfy, tiny_sd15, nodes):  # noqa: F811
    from test_attention_nodes import p2p

    model, clip, _ = tiny_sd15
    target = POSITIVE.replace("car", "bus")
    with pytest.raises(InputError, match="word_windows.*from 0 to 1") as e:
        p2p(nodes, model, clip, POSITIVE, target, word_windows="bus:7")  # silently clamped to 1 before
    assert e.value.input_name == "word_windows"
    with pytest.raises(InputError, match="'truck' is not in the prompt.*Words found in the prompt: a, photo"):
        p2p(nodes, model, clip, POSITIVE, target, reweight="truck:2")


def test_dual_path_refuses_a_hard_prompt_of_another_length_before_sampling(comfy, tiny_sd15, nodes, monkeypatch):  # noqa: F811
    """A 154-token soft prompt with a 77-token hard prompt used to pass silently (the layer repeats a short prompt,
    as ComfyUI's batching does); now every mismatch is refused at the run's start, before the model runs."""
    from test_attention_nodes import attention_lora, dual

    model, clip, _ = tiny_sd15
    long_soft = encode(comfy, clip, "a photo of zwx dog, " + ", ".join(["a red ball on green grass"] * 16))
    soft, hard = encode(comfy, clip, "a photo of zwx dog"), encode(comfy, clip, "a photo of a dog")
    assert long_soft[0][0].shape[1] == 2 * hard[0][0].shape[1] == 154
    negative = encode(comfy, clip, "blurry")
    blended = dual(nodes, model, hard, attention_lora(model), 0.5)
    calls = []
    unet = model.model.diffusion_model
    monkeypatch.setattr(type(unet), "_forward", lambda *a, **k: calls.append(1))
    for positive, lengths in ((long_soft, "77 tokens and the positive conditioning sampled with it 154"),
                              (soft, "154 tokens and the positive conditioning sampled with it 77")):
        m = blended if positive is long_soft else dual(nodes, model, long_soft, attention_lora(model), 0.5)
        with pytest.raises(InputError, match=f"hard prompt has {lengths}") as e:
            sample(comfy, m, positive, negative)
        assert e.value.input_name == "hard" and not calls
    monkeypatch.undo()
    assert sample(comfy, blended, soft, negative).isfinite().all()  # equal lengths sample


@pytest.mark.parametrize("mode", ["value", "renormalized", "p2p_locked"])
def test_reweight_refuses_a_sampled_prompt_of_another_length_than_its_text(comfy, tiny_sd15, nodes, mode):  # noqa: F811
    """The weights are laid out for ``text``'s tokens: a 154-token positive sampled with weights of a 77-token text
    took them repeated onto its second chunk (other words weighed, silently); the other way a raw ValueError."""
    model, clip, _ = tiny_sd15
    long_text = POSITIVE + ", " + ", ".join(["a green tree in the park"] * 14)
    long_positive, negative = encode(comfy, clip, long_text), encode(comfy, clip, NEGATIVE)
    assert long_positive[0][0].shape[1] == 154
    m, _, _ = reweighted(nodes, model, clip, "red:2", "cond", mode)
    with pytest.raises(InputError, match="text has 77 tokens and the positive conditioning sampled with it "
                                         "154 .*connect this node's positive output") as e:
        sample(comfy, m, long_positive, negative)
    assert e.value.input_name == "text"
    if mode != "p2p_locked":  # (its positive is the text's source/target pair: always the text's length)
        m = run_node(nodes["reweight"], model=model, clip=clip, text=long_text, words="red:2", mode=mode,
                     apply_to="cond", start_percent=0.0, end_percent=1.0, latent=empty_latent()).result[0]
        with pytest.raises(InputError, match="text has 154 tokens and the positive conditioning sampled with it 77"):
            sample(comfy, m, encode(comfy, clip, POSITIVE), negative)
        assert sample(comfy, m, long_positive, negative).isfinite().all()  # equal lengths sample
    if mode == "value":  # the negative's weights against the negative it is sampled with
        m, pos, neg = reweighted(nodes, model, clip, "blurry:2", "uncond", mode)
        with pytest.raises(InputError, match="negative_text has 77 tokens and the negative conditioning") as e:
            sample(comfy, m, pos, long_positive)
        assert e.value.input_name == "negative_text"
        assert sample(comfy, m, pos, neg).isfinite().all()


def test_p2p_refuses_another_positive_and_an_empty_blend_word_list(comfy, tiny_sd15, nodes):  # noqa: F811
    from test_attention_nodes import p2p

    model, clip, _ = tiny_sd15
    m, pair, latent = p2p(nodes, model, clip, POSITIVE, POSITIVE.replace("car", "bus"))
    long_positive = encode(comfy, clip, POSITIVE + ", " + ", ".join(["a green tree in the park"] * 14))
    with pytest.raises(InputError, match="source prompt has 77 tokens and the positive conditioning sampled "
                                         "with it 154") as e:
        sample(comfy, m, long_positive, encode(comfy, clip, NEGATIVE))
    assert e.value.input_name == "source"
    with pytest.raises(InputError, match="names no word") as e:
        p2p(nodes, model, clip, POSITIVE, POSITIVE.replace("car", "bus"), blend_words=" , ")
    assert e.value.input_name == "blend_words"


def test_p2p_locked_holds_the_unweighted_images_self_attention_as_the_paper(comfy, tiny_sd15, nodes):  # noqa: F811
    """The paper's reweighting also injects the source's self-attention (self_replace_steps 0.4); p2p_locked used to
    lock the cross-attention only, a weaker hold on the layout."""
    model, clip, _ = tiny_sd15

    def pair(words, self_end):
        out = run_node(nodes["reweight"], model=model, clip=clip, text=POSITIVE, words=words, mode="p2p_locked",
                       apply_to="cond", start_percent=0.0, end_percent=1.0, latent=empty_latent(),
                       self_end_percent=self_end).result
        assert bool(out[0].model_options["transformer_options"].get("patches", {}).get("attn1_patch")) == (
            self_end > 0)
        with torch.inference_mode():
            return comfy.nodes.common_ksampler(out[0], 3, 4, 5.0, "euler", "normal", out[1],
                                               encode(comfy, clip, NEGATIVE), out[2])[0]["samples"]

    held, cross_only = pair("red:4", 0.4), pair("red:4", 0.0)
    torch.testing.assert_close(held[0], cross_only[0], atol=1e-5, rtol=1e-5)  # the same unweighted source
    assert (held[1] - held[0]).abs().mean() < (cross_only[1] - cross_only[0]).abs().mean()  # nearer its layout
    same = pair("red:1", 0.4)  # weight 1 with the self-attention held is still the source
    torch.testing.assert_close(same[1], same[0], atol=1e-5, rtol=1e-5)


def test_a_window_of_no_width_is_off(comfy, tiny_sd15, nodes):  # noqa: F811
    """Inclusive at both ends, P2P's cross window with start = end held the one step whose sigma sat exactly on
    it (0.5 of 3 normal steps), where its self window of no width was off."""
    from test_attention_nodes import p2p
    from test_attention_nodes import sample as sample_pair

    from comfyui_personalize.nodes.attention_hooks import EMPTY_WINDOW, in_window, percent_window
    model, clip, _ = tiny_sd15
    assert percent_window(model, 0.5, 0.5, ("s", "e")) == EMPTY_WINDOW
    assert not any(in_window({"sigmas": torch.tensor([s])}, EMPTY_WINDOW) for s in (0.0, 1.6, 14.6, 1e9))
    source, target = "a photo of a red car", "a photo of a red bus"
    pairs = []
    for at in (0.0, 0.5):
        m, positive, latent = p2p(nodes, model, clip, source, target, mode="swap", cross_start_percent=at,
                                  cross_end_percent=at, self_end_percent=0.0)
        pairs.append(sample_pair(comfy, m, positive, latent, clip, steps=3))
    torch.testing.assert_close(pairs[1], pairs[0], atol=1e-5, rtol=1e-5)
    words = []  # a word's own window of no width is off too, as one ending before the start
    for window in ("bus:0.5", "bus:0.4"):
        m, positive, latent = p2p(nodes, model, clip, source, target, mode="swap", cross_start_percent=0.5,
                                  cross_end_percent=1.0, self_end_percent=0.0, word_windows=window)
        words.append(sample_pair(comfy, m, positive, latent, clip, steps=3))
    torch.testing.assert_close(words[0], words[1], atol=1e-5, rtol=1e-5)
