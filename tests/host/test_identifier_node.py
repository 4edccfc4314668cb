"""Personalize Identifier on ComfyUI's real tokenizers: SD1 (clip_l) and SDXL (clip_g + clip_l)."""
import types

import pytest
from test_train_lora import run_node

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def identifier_node(comfy):
    from comfyui_personalize.nodes.identifier import PersonalizeIdentifier
    return PersonalizeIdentifier


@pytest.fixture(scope="module")
def sdxl_clip(comfy):
    """Only the tokenizer of an SDXL CLIP is used: ComfyUI's SDXLTokenizer needs its files, no weights."""
    import comfy.sdxl_clip
    return types.SimpleNamespace(tokenizer=comfy.sdxl_clip.SDXLTokenizer())


def prompt_token_ids(sd_tokenizer, text):
    """The token ids ComfyUI encodes for a prompt (start and end tokens and padding dropped)."""
    ids = [t for t, _ in sd_tokenizer.tokenize_with_weights(text)[0]]
    return [t for t in ids[1:] if t not in (sd_tokenizer.end_token, sd_tokenizer.pad_token)]


def test_sd15_node_picks_a_single_token_word_and_builds_prompts(tiny_sd15, identifier_node):
    from comfyui_personalize.training.identifier import COMMON_WORDS, KNOWN_LOADED

    _, clip, _ = tiny_sd15
    out = run_node(identifier_node, clip=clip, class_noun="dog", identifier="", seed=3)
    word, instance, class_text = out.result
    assert instance == f"a photo of {word} dog" and class_text == "a photo of a dog"
    assert word not in COMMON_WORDS | KNOWN_LOADED
    # one token exactly as ComfyUI's CLIPTextEncode tokenizes the instance prompt
    clip_l = clip.tokenizer.clip_l
    assert len(prompt_token_ids(clip_l, word)) == 1
    assert prompt_token_ids(clip_l, instance) == prompt_token_ids(clip_l, "a photo of") + \
        prompt_token_ids(clip_l, word) + prompt_token_ids(clip_l, "dog")
    assert word in out.ui.as_dict()["text"][0] and "clip_l" in out.ui.as_dict()["text"][0]

    again = run_node(identifier_node, clip=clip, class_noun="dog", identifier="", seed=3).result[0]
    others = {run_node(identifier_node, clip=clip, class_noun="dog", identifier="", seed=s).result[0]
              for s in range(8)}
    assert again == word and len(others) > 1


def test_sd15_user_identifiers(tiny_sd15, identifier_node):
    from comfyui_personalize.training.errors import InputError

    _, clip, _ = tiny_sd15
    out = run_node(identifier_node, clip=clip, class_noun=" teddy bear ", identifier=" sks ", seed=0)
    assert out.result == ("sks", "a photo of sks teddy bear", "a photo of a teddy bear")

    with pytest.raises(InputError) as e:
        run_node(identifier_node, clip=clip, class_noun="dog", identifier="zorblaxian", seed=0)
    assert e.value.input_name == "identifier" and "tokens in clip_l" in str(e.value)
    with pytest.raises(InputError) as e:
        run_node(identifier_node, clip=clip, class_noun="  ", identifier="", seed=0)
    assert e.value.input_name == "class_noun"


def test_sdxl_pick_is_one_token_in_both_encoders(sdxl_clip, identifier_node):
    from comfyui_personalize.nodes.identifier import clip_word_tokenizers
    from comfyui_personalize.training.errors import InputError

    assert [t.name for t in clip_word_tokenizers(sdxl_clip)] == ["clip_g", "clip_l"]
    for seed in range(5):
        word, instance, _ = run_node(identifier_node, clip=sdxl_clip, class_noun="backpack", identifier="",
                                     seed=seed).result
        for encoder in (sdxl_clip.tokenizer.clip_g, sdxl_clip.tokenizer.clip_l):
            assert len(prompt_token_ids(encoder, word)) == 1
        assert instance == f"a photo of {word} backpack"

    with pytest.raises(InputError) as e:
        run_node(identifier_node, clip=sdxl_clip, class_noun="dog", identifier="zorblaxian", seed=0)
    assert e.value.input_name == "identifier" and "clip_g" in str(e.value)


def test_sd2_tokenizer_is_found_generically(comfy):
    from comfy.text_encoders.sd2_clip import SD2Tokenizer

    from comfyui_personalize.nodes.identifier import clip_word_tokenizers

    tokenizers = clip_word_tokenizers(types.SimpleNamespace(tokenizer=SD2Tokenizer()))
    assert [t.name for t in tokenizers] == ["clip_h"]
    assert tokenizers[0].pieces("dog") == ["dog"]
