"""The Dual-Path blend's LoRA input: every naming LoraLoader reads, LoRAs that cover part of the UNet, and what the
blend cannot add beside the weights (refused) or leaves out (reported)."""
import pytest
import torch
from test_attention_nodes import attention_lora, dual, empty_latent, encode, nodes, sample  # noqa: F401
from test_dual_path_composition import with_lora
from test_train_lora import run_node

from comfyui_personalize.training.errors import InputError

pytestmark = pytest.mark.host
SOFT, HARD = "a photo of zwx dog", "a photo of a dog"


def renamed(model, lora, style):
    """The same factors under another trainer's naming: 'peft' (lora_A / lora_B suffixes), 'comfy' (ComfyUI's own
    trainer: the ldm weight path, e.g. diffusion_model.input_blocks.1.1...attn1.to_q.lora_up.weight)."""
    import comfy.lora
    to_weight = comfy.lora.model_lora_keys_unet(model.model, {})
    out = {}
    for key, value in lora.items():
        name, suffix = key.split(".", 1)
        if style == "peft":
            suffix = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(suffix, suffix)
        else:
            name = to_weight[name].removesuffix(".weight")
        out[f"{name}.{suffix}"] = value
    return out


@pytest.mark.parametrize("style", ["peft", "comfy"])
def test_a_lora_named_as_other_trainers_name_it_blends_as_the_kohya_one(comfy, tiny_sd15, nodes, style):  # noqa: F811
    model, clip, _ = tiny_sd15
    soft, hard = encode(comfy, clip, SOFT), encode(comfy, clip, HARD)
    lora = attention_lora(model)
    other = renamed(model, lora, style)
    assert {k for k in other if not k.endswith(".alpha")}.isdisjoint(lora)  # (was: "has no attention factors")
    kohya = sample(comfy, dual(nodes, model, hard, lora, 0.6), soft, empty_latent(), clip)
    torch.testing.assert_close(sample(comfy, dual(nodes, model, hard, other, 0.6), soft, empty_latent(), clip), kohya)
    stock = sample(comfy, with_lora(model, other), soft, empty_latent(), clip)
    torch.testing.assert_close(sample(comfy, dual(nodes, model, hard, other, 1.0), soft, empty_latent(), clip), stock,
                               atol=5e-3, rtol=1e-3)


def test_a_lora_on_some_blocks_still_gives_the_base_model_on_the_hard_prompt_at_a_0(comfy, tiny_sd15, nodes):  # noqa: F811
    """Blocks without factors kept reading the soft prompt (learned token included) at every a."""
    model, clip, _ = tiny_sd15
    soft, hard = encode(comfy, clip, SOFT), encode(comfy, clip, HARD)
    partial = {k: v for k, v in attention_lora(model).items() if "up_blocks" in k}
    assert partial
    base_on_hard = sample(comfy, model, hard, empty_latent(), clip, cfg=1.0)
    for paths in ("cross", "self+cross"):
        blended = dual(nodes, model, hard, partial, 0.0, paths=paths)
        torch.testing.assert_close(sample(comfy, blended, soft, empty_latent(), clip, cfg=1.0), base_on_hard)
    stock = sample(comfy, with_lora(model, partial), soft, empty_latent(), clip)
    torch.testing.assert_close(sample(comfy, dual(nodes, model, hard, partial, 1.0), soft, empty_latent(), clip),
                               stock, atol=5e-3, rtol=1e-3)


def blend_note(nodes, model, hard, lora, paths="self+cross"):  # noqa: F811
    out = run_node(nodes["dual"], model=model, hard=hard, lora_name="none", a_blend=0.5, paths=paths,
                   start_percent=0.0, end_percent=1.0, lora=lora)
    return out.ui.as_dict()["text"][0] if out.ui is not None else None


def test_what_the_blend_leaves_out_of_a_lora_is_reported(comfy, tiny_sd15, nodes):  # noqa: F811
    """Feed-forward and text-encoder factors were dropped without a word, so a = 1 was silently not the LoRA."""
    from comfyui_personalize.nodes.comfy_adapter import ComfyHost

    model, clip, _ = tiny_sd15
    hard = encode(comfy, clip, HARD)
    lora = attention_lora(model)
    assert blend_note(nodes, model, hard, lora) is None
    # a pivotal word bundled in the file (Save LoRA's bundle_embedding) is no weight left out
    assert blend_note(nodes, model, hard, {**lora, "bundle_emb.zwx.clip_l": torch.zeros(1, 768)}) is None
    assert "paths='self+cross'" in blend_note(nodes, model, hard, lora, "cross")
    g = torch.Generator().manual_seed(3)
    ff = {}
    for name, lin in ComfyHost(model, None, None).unet_lora_targets("attention+feedforward").items():
        if f"{name}.lora_down.weight" not in lora:
            ff[f"{name}.lora_down.weight"] = torch.randn(2, lin.in_features, generator=g)
            ff[f"{name}.lora_up.weight"] = torch.randn(lin.out_features, 2, generator=g)
    assert ff
    te = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 4),
          "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(4, 2)}
    note = blend_note(nodes, model, hard, {**lora, **ff, **te})
    assert f"{len(ff) // 2} UNet weights outside attention" in note and "ff.net" in note
    assert "2 keys for no weight of this UNet" in note and "not the LoRA's model" in note


def test_a_dora_or_a_loha_is_refused_by_name(comfy, tiny_sd15, nodes):  # noqa: F811
    model, clip, _ = tiny_sd15
    hard = encode(comfy, clip, HARD)
    lora = attention_lora(model)
    name = next(k for k in lora if k.endswith(".lora_down.weight")).removesuffix(".lora_down.weight")
    dora = {**lora, f"{name}.dora_scale": torch.ones(lora[f"{name}.lora_up.weight"].shape[0], 1)}
    with pytest.raises(InputError, match="is a DoRA") as e:
        blend_note(nodes, model, hard, dora)
    assert e.value.input_name == "lora_name"
    down, up = lora.pop(f"{name}.lora_down.weight"), lora.pop(f"{name}.lora_up.weight")
    loha = {**lora, f"{name}.hada_w1_a": up, f"{name}.hada_w1_b": down, f"{name}.hada_w2_a": up,
            f"{name}.hada_w2_b": down}
    with pytest.raises(InputError, match="as a loha patch, which is not a pair of low-rank factors"):
        blend_note(nodes, model, hard, loha)


def test_sampling_the_hard_prompt_as_positive_is_warned_about(comfy, tiny_sd15, nodes, caplog):  # noqa: F811
    model, clip, _ = tiny_sd15
    soft, hard = encode(comfy, clip, SOFT), encode(comfy, clip, HARD)
    blended = dual(nodes, model, hard, attention_lora(model), 0.5)
    with caplog.at_level("WARNING"):
        sample(comfy, blended, soft, empty_latent(), clip, steps=1)
    assert not any("positive is the hard prompt" in r.getMessage() for r in caplog.records)
    with caplog.at_level("WARNING"):
        sample(comfy, blended, hard, empty_latent(), clip, steps=1)
    assert any("positive is the hard prompt" in r.getMessage() for r in caplog.records)


def test_a_self_attention_only_lora_needs_both_paths(comfy, tiny_sd15, nodes):  # noqa: F811
    model, clip, _ = tiny_sd15
    hard = encode(comfy, clip, HARD)
    self_only = {k: v for k, v in attention_lora(model).items() if "attn1" in k}
    with pytest.raises(InputError, match="self-attention \\(attn1\\) only") as e:
        blend_note(nodes, model, hard, self_only, "cross")
    assert e.value.input_name == "paths"
    assert blend_note(nodes, model, hard, self_only) is None  # self+cross: all of it is blended


def test_a_model_with_a_lora_already_loaded_is_noted_and_this_same_lora_refused(comfy, tiny_sd15, nodes):  # noqa: F811
    """The LoRA loaded by LoraLoader before the blend patched both paths: a = 0 was not the base model, silently.
    The blend's own LoRA loaded there too (Fast Tune's MODEL output wired in) counted twice at a = 1."""
    model, clip, _ = tiny_sd15
    hard = encode(comfy, clip, HARD)
    lora, other = attention_lora(model), attention_lora(model, seed=9)
    assert blend_note(nodes, model, hard, lora) is None
    note = blend_note(nodes, with_lora(model, other), hard, lora)
    assert note.startswith("note: the MODEL already has weight patches on") and "a = 0 is not the base model" in note
    from comfy.sd import load_lora_for_models
    half = {k: v.half() for k, v in lora.items()}  # as Save LoRA writes it (fp16), loaded by LoraLoader
    for strength, loaded_lora in ((1.0, lora), (0.5, lora), (1.0, half)):
        with torch.inference_mode():
            loaded = load_lora_for_models(model, None, loaded_lora, strength, 0.0)[0]
        with pytest.raises(InputError, match="already carries this LoRA") as e:
            blend_note(nodes, loaded, hard, lora)
        assert e.value.input_name == "model"
    with torch.inference_mode():  # strength 0: LoraLoader loading the LoRA for the CLIP alone
        clip_only = load_lora_for_models(model, None, lora, 0.0, 0.0)[0]
    assert blend_note(nodes, clip_only, hard, lora) is None  # neither refused nor noted: it changes no weight


def test_dual_path_computes_the_hard_prompt_from_the_nearest_word(comfy, tiny_sd15, nodes, caplog):  # noqa: F811
    from comfyui_personalize.nodes.embeddings import (
        clip_with_embeddings,
        hard_tokens,
        init_ids,
        text_encoders,
        token_table,
    )
    model, clip, _ = tiny_sd15
    (key, (_, tok, encoder)), = text_encoders(clip).items()
    dog = init_ids(tok, "dog")
    vector = token_table(encoder)[dog].detach().clone() * 1.7 + 1e-3  # near "dog", another scale
    soft_clip = clip_with_embeddings(clip, {"zwx": {key: vector}})
    tokens, words = hard_tokens(soft_clip, "a photo of embedding:zwx")
    assert words == ["l: dog"]
    ids = lambda t: [[item[0] for item in batch] for batch in t["l"]]  # noqa: E731
    assert ids(tokens) == ids(clip.tokenize("a photo of dog"))
    lora = attention_lora(model)
    auto = run_node(nodes["dual"], model=model, lora_name="none", a_blend=0.0, paths="cross", start_percent=0.0,
                    end_percent=1.0, lora=lora, clip=soft_clip, soft_text="a photo of embedding:zwx").result[0]
    manual = dual(nodes, model, encode(comfy, clip, "a photo of dog"), lora, 0.0, paths="cross")
    soft = encode(comfy, soft_clip, "a photo of embedding:zwx")
    with caplog.at_level("WARNING"):
        torch.testing.assert_close(sample(comfy, auto, soft, empty_latent(), clip, cfg=1.0),
                                   sample(comfy, manual, soft, empty_latent(), clip, cfg=1.0))
    assert "not the prompt in soft_text" not in caplog.text
    # the positive edited and soft_text left behind: the hard path still reads "a photo of dog"
    with caplog.at_level("WARNING"):
        sample(comfy, auto, encode(comfy, soft_clip, "a drawing of embedding:zwx"), empty_latent(), clip, cfg=1.0)
    assert "not the prompt in soft_text" in caplog.text
    with pytest.raises(InputError) as e:
        run_node(nodes["dual"], model=model, lora_name="none", a_blend=0.5, paths="cross", start_percent=0.0,
                 end_percent=1.0, lora=lora, clip=soft_clip, soft_text="a photo of a dog")
    assert e.value.input_name == "soft_text"
    with pytest.raises(InputError) as e:
        run_node(nodes["dual"], model=model, lora_name="none", a_blend=0.5, paths="cross", start_percent=0.0,
                 end_percent=1.0, lora=lora)
    assert e.value.input_name == "hard"
