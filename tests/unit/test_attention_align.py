"""Token lookup and the paper's source -> target mappers (word swap, refinement)."""
import pytest
import torch

from comfyui_personalize.attention.align import global_align, refine_mapper, swap_mapper
from comfyui_personalize.attention.tokens import PromptTokens, parse_word_weights, token_weights, word_positions
from comfyui_personalize.training.errors import InputError

BOS, EOS = 100, 101
VOCAB = {"a": [1], "photo": [2], "of": [3], "cat": [4], "dog": [5], "riding": [6], "bicycle": [7, 8],
         "motorcycle": [9, 10, 11], "fluffy": [12, 13], "red": [14]}


def tokens(text, chunk_words=None):
    """Chunks of 77 rows as ComfyUI's tokenizer lays them out (chunk_words: words per chunk, for long prompts)."""
    words = text.split()
    groups = [words] if chunk_words is None else [words[i:i + chunk_words] for i in range(0, len(words), chunk_words)]
    ids, content = [], []
    for g in groups:
        body = [t for w in g for t in VOCAB[w]]
        row = [BOS] + body + [EOS] * (76 - len(body))
        ids.append(row)
        content.append([False] + [True] * len(body) + [False] * (76 - len(body)))
    return PromptTokens.from_chunks(ids, content)


def words_of(text, toks):
    out, pos = [], toks.content_positions()
    for w in text.split():
        n = len(VOCAB[w])
        out.append((VOCAB[w], pos[:n]))
        pos = pos[n:]
    return out


def test_parse_word_weights_and_errors():
    assert parse_word_weights("red: 2, blue car:-1.5\nsky:0") == [("red", 2.0), ("blue car", -1.5), ("sky", 0.0)]
    for bad in ("red", "red:lots", ":2"):
        with pytest.raises(InputError) as e:
            parse_word_weights(bad, "reweight")
        assert e.value.input_name == "reweight"


def test_find_every_occurrence_never_eos_and_across_chunks():
    t = tokens("a photo of a cat riding a bicycle")
    assert t.find([1]) == [1, 4, 7] and t.find([7, 8]) == [8, 9] and t.find([EOS]) == []
    long = tokens("a cat riding a bicycle a dog", chunk_words=4)  # second chunk starts at row 77
    assert long.length == 154 and long.find([5]) == [77 + 4]
    rows = word_positions(long, ["bicycle"], lambda w: VOCAB[w])
    assert rows == {"bicycle": [77 + 1, 77 + 2]}
    w = token_weights(long.length, rows, {"bicycle": 3.0})
    assert w[78] == w[79] == 3.0 and w.sum() == 154 + 4
    with pytest.raises(InputError, match="'red' is not in the prompt"):
        word_positions(long, ["red"], lambda w: VOCAB[w])


def test_swap_mapper_like_the_paper():
    src, tgt = "a photo of a cat riding a bicycle", "a photo of a dog riding a motorcycle"
    ts, tt = tokens(src), tokens(tgt)
    m = swap_mapper(words_of(src, ts), words_of(tgt, tt), 77)
    for i in range(0, 8):  # BOS .. "a": one to one, "cat" -> "dog" too (one token each)
        assert m[i, i] == 1 and m[i].sum() == 1
    # "bicycle" (rows 8, 9) spreads over "motorcycle" (rows 8, 9, 10) with 1/3 each
    assert torch.allclose(m[8:10, 8:11], torch.full((2, 3), 1 / 3))
    # after the longer word, rows keep the shift: source EOS row 10 -> target row 11, and so on
    assert m[10, 11] == 1 and m[11, 12] == 1
    with pytest.raises(InputError, match="refine"):
        swap_mapper(words_of(src, ts), words_of("a photo of a cat", tokens("a photo of a cat")), 77)


def test_identical_prompts_map_to_the_identity():
    t = tokens("a photo of a cat")
    m, alphas = refine_mapper(t, t)
    assert torch.equal(m, torch.eye(77)) and torch.equal(alphas, torch.ones(77))
    assert torch.equal(swap_mapper(words_of("a photo of a cat", t), words_of("a photo of a cat", t), 77),
                       torch.eye(77))


def test_refine_mapper_gives_inserted_tokens_alpha_zero():
    src, tgt = tokens("a photo of a cat"), tokens("a photo of a fluffy cat")
    m, alphas = refine_mapper(src, tgt)
    assert alphas[5] == alphas[6] == 0 and alphas[:5].eq(1).all() and alphas[7:].eq(1).all()
    assert m[:, 5].sum() == m[:, 6].sum() == 0
    assert m[5, 7] == 1  # target "cat" (row 7) takes source "cat" (row 5)
    assert m[6, 8] == 1  # the EOS after the content aligns too
    assert all(m[j, j] == 1 for j in range(10, 77))  # padding maps to itself


def test_global_align_hand_worked():
    # x = [A, B, C], y = [A, X, B, C]: X is inserted, the rest match in order
    assert global_align([1, 2, 3], [1, 9, 2, 3]) == [0, -1, 1, 2]
    assert global_align([1, 2, 3], [1, 2, 3]) == [0, 1, 2]
    assert global_align([1, 2], [3, 4]) == [-1, -1]  # gaps (0) beat mismatches (-1)
