"""The DreamBooth identifier: rare, one token in every tokenizer, never a common or known-loaded word."""
import logging
import os
from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from comfyui_personalize.headless import tiny
from comfyui_personalize.training.errors import InputError
from comfyui_personalize.training.identifier import (
    COMMON_WORDS,
    KNOWN_LOADED,
    WordTokenizer,
    candidate_pool,
    class_prompt,
    hf_word_tokenizer,
    identifier_prompt,
    pick_identifier,
    validate_identifier,
)

BASE_WORDS = tiny.WORDS
HOST_TOKENIZER = Path(os.environ.get("COMFYUI_PATH", "/opt/comfyui-host")) / "comfy" / "sd1_tokenizer"

# Word endings that the rule accepts in the tiny vocabulary: each ends three longer words.
FRAGMENTS = ("oxel", "boxel", "foxel", "toxel", "umbix", "rumbix", "zumbix", "dumbix", "ivra", "divra", "kivra",
             "sivra")
# Words that pass the structural rule in the tiny vocabulary, so only COMMON_WORDS keeps them out.
COMMON_FAMILIES = ("other", "another", "mother", "brother", "the", "bathe", "lathe", "tithe")


@pytest.fixture(scope="module")
def clip_l():
    if not (HOST_TOKENIZER / "vocab.json").is_file():
        pytest.skip(f"no CLIP tokenizer files at {HOST_TOKENIZER} (they ship with ComfyUI; CI has them)")
    return hf_word_tokenizer("clip_l", CLIPTokenizer.from_pretrained(str(HOST_TOKENIZER)))


def tiny_tokenizer(folder: Path, monkeypatch, extra_words, name="clip_l") -> WordTokenizer:
    monkeypatch.setattr(tiny, "WORDS", BASE_WORDS + tuple(extra_words))
    tiny.write_tokenizer_files(folder)
    return hf_word_tokenizer(name, CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")))


def test_tiny_vocab_picks_are_single_tokens_deterministic_and_vary(tmp_path, monkeypatch):
    tok = tiny_tokenizer(tmp_path, monkeypatch, FRAGMENTS + COMMON_FAMILIES)
    assert sorted(candidate_pool(tok.vocab)) == ["ivra", "oxel", "umbix"]  # "other", "the" are common words
    picks = [pick_identifier([tok], seed) for seed in range(12)]
    assert picks == [pick_identifier([tok], seed) for seed in range(12)]
    assert set(picks) == {"ivra", "oxel", "umbix"}
    assert all(len(tok.encode(p)) == 1 for p in picks)


def test_pick_needs_one_token_in_every_tokenizer(tmp_path, monkeypatch):
    tok_a = tiny_tokenizer(tmp_path / "a", monkeypatch, FRAGMENTS)
    tok_b = tiny_tokenizer(tmp_path / "b", monkeypatch, [w for w in FRAGMENTS if w != "oxel"], name="clip_g")
    assert len(tok_a.encode("oxel")) == 1 and len(tok_b.encode("oxel")) == 4
    assert "oxel" in {pick_identifier([tok_a], seed) for seed in range(12)}
    assert "oxel" not in {pick_identifier([tok_a, tok_b], seed) for seed in range(12)}

    assert validate_identifier(" oxel ", [tok_a]) == "oxel"
    with pytest.raises(InputError) as e:
        validate_identifier("oxel", [tok_a, tok_b])
    assert e.value.input_name == "identifier"
    assert "4 tokens in clip_g (o | x | e | l)" in str(e.value) and "leave it empty" in str(e.value)


def test_pick_errors_when_no_candidate_is_one_token(tmp_path, monkeypatch):
    tok = tiny_tokenizer(tmp_path, monkeypatch, FRAGMENTS)
    splits_all = WordTokenizer("t5xxl", lambda word: [1, 2], {})
    with pytest.raises(InputError, match=r"one token in every text encoder \(clip_l, t5xxl\)") as e:
        pick_identifier([tok, splits_all])
    assert e.value.input_name == "identifier"


@pytest.mark.parametrize("word", ["", "   ", "ab cd", "ab\tcd", "<|endoftext|>", ",", "1", "<|startoftext|>"])
def test_validate_rejects_empty_several_words_and_non_words(word):
    """The end token (every prompt's padding) and punctuation are one token each: they were accepted."""
    one_token = WordTokenizer("clip_l", lambda w: [7], {})
    with pytest.raises(InputError) as e:
        validate_identifier(word, [one_token])
    assert e.value.input_name == "identifier"


def test_real_clip_picks_are_rare_single_tokens_and_never_common(clip_l):
    vocab = clip_l.vocab
    for word in ("dog", "photo", "the", "sks", "ohwx"):
        assert word + "</w>" in vocab  # they are single tokens, so only the rules keep them out
    pool = candidate_pool(vocab)
    assert len(pool) > 100
    assert not set(pool) & (COMMON_WORDS | KNOWN_LOADED | {"dog", "photo", "the", "sks"})
    assert all(vocab[w + "</w>"] >= 0.6 * len(vocab) for w in pool)  # the rare part of the vocabulary

    picks = [pick_identifier([clip_l], seed) for seed in range(40)]
    assert picks == [pick_identifier([clip_l], seed) for seed in range(40)]
    assert len(set(picks)) >= 20
    for word in picks:
        assert clip_l.pieces(word) == [word]
        assert 3 <= len(word) <= 5 and word.isascii() and word.isalpha()


def test_real_clip_validation(clip_l, caplog):
    with pytest.raises(InputError) as e:
        validate_identifier("zorblaxian", [clip_l])
    pieces = clip_l.pieces("zorblaxian")
    assert len(pieces) > 1 and " | ".join(pieces) in str(e.value)
    assert e.value.input_name == "identifier"

    for word in ("<|endoftext|>", ","):
        assert len(clip_l.pieces(word)) == 1  # one token, yet no word
        with pytest.raises(InputError, match="is not a word"):
            validate_identifier(word, [clip_l])

    with caplog.at_level(logging.WARNING):
        assert validate_identifier("sks", [clip_l]) == "sks"  # allowed, but the user is told
    assert "sks" in caplog.text and "meaning" in caplog.text


def test_prompts_and_empty_class_noun():
    assert identifier_prompt("oxel", " teddy  bear ") == "a photo of oxel teddy bear"
    assert class_prompt("dog") == "a photo of a dog"
    assert class_prompt("apple") == "a photo of an apple"
    for bad in ("", "   "):
        for make in (lambda noun: identifier_prompt("oxel", noun), class_prompt):
            with pytest.raises(InputError) as e:
                make(bad)
            assert e.value.input_name == "class_noun"
