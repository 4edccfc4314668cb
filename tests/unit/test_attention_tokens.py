"""Word -> context-row lookup: parsing word:weight lists, finding words among the content tokens of 77-token chunks."""
import pytest
import torch

from comfyui_personalize.attention.tokens import (
    PromptTokens,
    parse_word_weights,
    token_weights,
    word_positions,
)
from comfyui_personalize.training.errors import InputError

BOS, EOS, PAD = 100, 101, 0  # PAD 0 is also the id of "!", as with SDXL's CLIP-G
VOCAB = {"a": [1], "photo": [2], "of": [3], "cat": [4], "dog": [5], "red": [6], "hat": [7],
         "bicycle": [8, 9], "motorcycle": [10, 11, 12], "!": [0]}


def ids_of(word):
    return [i for w in word.split() for i in VOCAB[w]]


def prompt(text):
    """Chunks as ComfyUI lays them out: a word that does not fit in the 75 content rows moves to the next chunk."""
    chunks, current = [], []
    for word in text.split():
        if len(current) + len(VOCAB[word]) > 75:
            chunks.append(current)
            current = []
        current = current + VOCAB[word]
    return PromptTokens.from_content(chunks + [current], BOS, EOS, PAD)


def test_parse_word_weights_reads_phrases_negatives_and_skips_blanks():
    text = "red: 2, blue car:-1.5\n\n sky :0 ,, embedding:style:1e-1\n"
    assert parse_word_weights(text) == [("red", 2.0), ("blue car", -1.5), ("sky", 0.0), ("embedding:style", 0.1)]
    assert parse_word_weights("  \n , ") == []


@pytest.mark.parametrize("bad, shown", [("red", "'red' has no weight"), ("red:lots", "'lots' in 'red:lots'"),
                                        (": 2", "no word"), ("red:", "'' in 'red:'"), ("red:nan", "finite")])
def test_parse_errors_name_the_input_the_entry_and_the_right_form(bad, shown):
    with pytest.raises(InputError) as err:
        parse_word_weights(f"cat:1, {bad}", "reweight")
    assert err.value.input_name == "reweight"
    message = str(err.value)
    assert message.startswith("reweight:") and shown in message and "e.g. 'red: 2" in message


def test_layout_length_and_content_rows():
    t = prompt("a photo of a bicycle")
    assert t.length == 77 and t.n_chunks == 1
    assert t.chunks[0][:8] == (BOS, 1, 2, 3, 1, 8, 9, EOS) and t.chunks[0][8:] == (PAD,) * 69
    assert t.content_positions() == [1, 2, 3, 4, 5, 6]
    assert t.content_ids() == [1, 2, 3, 1, 8, 9]
    assert t.ids[6:9] == (9, EOS, PAD) and t.is_content(6) and not t.is_content(7)


def test_malformed_chunks_are_rejected():
    with pytest.raises(ValueError, match="expected 77"):
        PromptTokens.from_chunks([[BOS, 1, EOS]], [[False, True, False]])
    with pytest.raises(ValueError, match="content masks"):
        PromptTokens.from_chunks([[0] * 77, [0] * 77], [[False] * 77])
    with pytest.raises(ValueError, match="at most 75"):
        PromptTokens.from_content([[1] * 76], BOS, EOS, PAD)


def test_find_every_occurrence_and_every_token_of_multi_token_words():
    t = prompt("a cat of a bicycle a bicycle")
    assert t.find(VOCAB["a"]) == [1, 4, 7]
    assert t.find(VOCAB["bicycle"]) == [5, 6, 8, 9]
    assert t.find(ids_of("a bicycle")) == [4, 5, 6, 7, 8, 9]
    assert t.find([9, 1]) == [6, 7]  # token subsequences, wherever they are
    assert t.find(VOCAB["dog"]) == [] and t.find([]) == []
    assert t.find([8, 8]) == []  # the tokens must be consecutive


def test_a_word_is_found_only_where_a_word_starts():
    """"horse" in "a seahorse next to a horse": sea + horse</w> in the compound, so only the standalone horse is the
    word (the compound's tail got the weight, the map and the blend too)."""
    a, sea, horse, next_, to = 1, 2, 3, 4, 5  # sea (2) is the only token that does not end a word
    tokens = PromptTokens.from_chunks([[BOS, a, sea, horse, next_, to, a, horse, EOS] + [PAD] * 68],
                                      [[False] + [True] * 7 + [False] * 69], ends_word=lambda i: i != sea)
    assert tokens.find([horse]) == [7] and tokens.find([sea, horse]) == [2, 3]  # the whole compound is a word
    plain = PromptTokens.from_chunks(tokens.chunks, tokens.content_mask)  # without the marker: every match
    assert plain.find([horse]) == [3, 7]


def test_find_reports_overlapping_occurrences_once_per_row():
    t = prompt("a a a")
    assert t.find([1, 1]) == [1, 2, 3]


def test_find_never_matches_bos_eos_or_padding():
    t = prompt("a cat ! a")  # "!" has the padding's id
    assert t.find([BOS]) == [] and t.find([EOS]) == [] and t.find([EOS, PAD]) == []
    assert t.find([PAD]) == [3]  # only the content "!", none of the 71 padding rows
    assert t.find([1, EOS]) == []  # the last word followed by EOS is not a phrase


def test_find_in_long_prompts_spanning_chunks():
    words = ["a", "cat"] * 37 + ["red", "hat", "dog"]  # 74 tokens, then "red" (75), "hat" and "dog" spill over
    t = prompt(" ".join(words))
    assert t.n_chunks == 2 and t.length == 154
    assert t.chunks[1][:4] == (BOS, 7, 5, EOS)  # chunk 1 starts with its own BOS at row 77
    assert t.find(VOCAB["dog"]) == [77 + 2]
    assert t.find(ids_of("red hat")) == [75, 77 + 1]  # a phrase split over two chunks is still found
    assert t.find(VOCAB["cat"]) == list(range(2, 75, 2))
    assert len(t.find(VOCAB["a"])) == 37 and t.find([EOS]) == []
    three = prompt(" ".join(["bicycle"] * 37 + ["motorcycle"] + ["bicycle"] * 37 + ["dog"]))
    assert three.n_chunks == 3  # chunk 1: motorcycle + 36 bicycles (75 tokens); the last bicycle moves on
    assert three.find(VOCAB["motorcycle"]) == [77 + 1, 77 + 2, 77 + 3]
    assert three.find(VOCAB["dog"]) == [154 + 3]
    assert three.find(ids_of("bicycle dog")) == [154 + 1, 154 + 2, 154 + 3]


def test_word_positions_finds_words_and_phrases():
    t = prompt("a photo of a red hat a cat")
    found = word_positions(t, ["red hat", "a", "cat"], ids_of)
    assert found == {"red hat": [5, 6], "a": [1, 4, 7], "cat": [8]}


def test_word_positions_error_names_the_input_and_the_word_and_lists_found_words():
    t = prompt("a photo of a cat")
    with pytest.raises(InputError) as err:
        word_positions(t, ["cat", "dog"], ids_of, "blend_words", prompt_text="a photo of a cat")
    assert err.value.input_name == "blend_words"
    assert "'dog' is not in the prompt" in str(err.value)
    assert "Words found in the prompt: a, photo, of, cat." in str(err.value)
    with pytest.raises(InputError) as err:  # ComfyUI's weighted words are listed without their weight
        word_positions(t, ["dog"], ids_of, prompt_text="(a photo:1.2) of a (cat:.9)")
    assert "Words found in the prompt: a, photo, of, cat." in str(err.value)
    with pytest.raises(InputError, match="^words: 'red' is not in the prompt"):
        word_positions(t, ["red"], ids_of)
    with pytest.raises(InputError, match="gives no tokens"):
        word_positions(t, [""], lambda w: [])


def test_token_weights():
    t = prompt("a red hat of a cat")
    rows = word_positions(t, ["red hat", "hat", "a"], ids_of)
    w = token_weights(t.length, rows, {"red hat": 2.0, "hat": -1.5, "a": 0.5})
    assert w.dtype == torch.float32 and w.shape == (77,)
    expected = torch.ones(77)
    expected[[1, 5]] = 0.5
    expected[2] = 2.0
    expected[3] = -1.5  # "hat" is listed after "red hat", so its weight wins on the shared row
    assert torch.equal(w, expected)
    with pytest.raises(ValueError, match="outside"):
        token_weights(77, {"x": [77]}, {"x": 2.0})
