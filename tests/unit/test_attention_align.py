"""Prompt-to-prompt token alignment: word swap and refinement mappers on context rows.

Expected matrices were worked by hand and checked against google/prompt-to-prompt's seq_aligner.py (run with a
toy tokenizer): they agree everywhere except the rows the module docstring of attention/align.py lists."""
import pytest
import torch

from comfyui_personalize.attention.align import auto_mapper, global_align, refine_mapper, swap_mapper
from comfyui_personalize.attention.tokens import PromptTokens
from comfyui_personalize.training.errors import InputError

BOS, EOS = 100, 101  # padding repeats EOS, as SD1's CLIP tokenizer in ComfyUI does
VOCAB = {"a": [1], "photo": [2], "of": [3], "cat": [4], "dog": [5], "riding": [6], "bicycle": [7, 8],
         "motorcycle": [9, 10, 11], "fluffy": [12, 13], "and": [14]}


def prompt(text):
    """Chunks as ComfyUI lays them out: a word that does not fit in the 75 content rows moves to the next chunk."""
    chunks, current = [], []
    for word in text.split():
        if len(current) + len(VOCAB[word]) > 75:
            chunks.append(current)
            current = []
        current = current + VOCAB[word]
    return PromptTokens.from_content(chunks + [current], BOS, EOS, EOS)


def words_of(text):
    """(token ids, context rows) of each space-separated word, as the node derives them."""
    rows = prompt(text).content_positions()
    out = []
    for word in text.split():
        n = len(VOCAB[word])
        out.append((VOCAB[word], rows[:n]))
        rows = rows[n:]
    return out


def swap(source, target):
    return swap_mapper(words_of(source), words_of(target), prompt(source).length)


def from_pairs(pairs, length=77, weight=1.0):
    m = torch.zeros(length, length)
    for i, j in pairs:
        m[i, j] = weight
    return m


def test_global_align_hand_worked():
    # B a cat E -> B a fluffy(2 tokens) cat E: the inserted tokens have no source token
    assert global_align([BOS, 1, 4, EOS], [BOS, 1, 12, 13, 4, EOS]) == [0, 1, -1, -1, 2, 3]
    assert global_align([1, 2, 3], [1, 2, 3]) == [0, 1, 2]
    # A substitution scores -1 but a deletion plus an insertion 0: the new token is treated as inserted.
    assert global_align([1, 2, 3], [1, 9, 3]) == [0, -1, 2]
    assert global_align([1, 2], [3, 4]) == [-1, -1]
    # The paper's tie-breaking (left, then up, then diagonal) aligns to the earliest equal token.
    assert global_align([1, 1], [1]) == [0]
    assert global_align([1], [1, 1]) == [0, -1]
    assert global_align([], [1, 2]) == [-1, -1] and global_align([1, 2], []) == []


def test_swap_with_same_token_counts_is_the_identity():
    m = swap("a photo of a cat riding a bicycle", "a photo of a dog riding a bicycle")
    assert torch.equal(m, torch.eye(77))  # the paper's mapper for this pair is the identity as well


def test_swap_spreads_a_word_over_a_longer_replacement_and_keeps_the_offset():
    # source: BOS a photo of a cat riding a bicy cle EOS pad...   (EOS at row 10)
    # target: BOS a photo of a dog riding a mot orcy cle EOS ... (EOS at row 11)
    m = swap("a photo of a cat riding a bicycle", "a photo of a dog riding a motorcycle")
    expected = from_pairs([(i, i) for i in range(8)] + [(i, i + 1) for i in range(10, 76)])
    expected[8:10, 8:11] = 1 / 3  # each source token spreads evenly over the target word's tokens
    assert torch.equal(m, expected)
    assert m[10, 11] == 1  # target EOS takes the source EOS (the paper takes source row 11, a padding row)
    assert torch.allclose(m[:76].sum(1), torch.ones(76))  # source attention is carried over, none duplicated
    assert m[76].sum() == 0  # the last source padding row has no target row left


def test_swap_to_a_shorter_word_leaves_the_last_target_rows_empty():
    # source: BOS a photo of a mot orcy cle EOS (row 8); target: BOS a photo of a dog EOS (row 6)
    m = swap("a photo of a motorcycle", "a photo of a dog")
    expected = from_pairs([(i, i) for i in range(5)] + [(i + 2, i) for i in range(6, 75)])
    expected[5:8, 5] = 1.0  # 1 / len(target word): the three source tokens all feed "dog"
    assert torch.equal(m, expected)
    assert m[:, 75:].sum() == 0  # as in the paper, the last target padding rows receive nothing


def test_swap_equals_the_paper_when_the_total_length_is_unchanged():
    # cat (1 token) -> fluffy (2), bicycle (2) -> dog (1): no offset after the last word, so no quirk applies
    m = swap("a cat riding a bicycle", "a fluffy riding a dog")
    expected = from_pairs([(0, 0), (1, 1), (3, 4), (4, 5), (5, 6), (6, 6)] + [(i, i) for i in range(7, 77)])
    expected[2, 2:4] = 0.5
    assert torch.equal(m, expected)


def test_swap_across_chunks_pairs_words_that_moved_to_the_next_chunk():
    source = " ".join(["a", "cat"] * 37 + ["dog", "a", "bicycle"])  # chunk 0 full (75 tokens), EOS at 76
    target = " ".join(["a", "motorcycle"] + ["a", "cat"] * 36 + ["dog", "a", "bicycle"])
    # Target: the 3-token word pushes its last "cat" (and everything after) into chunk 1.
    assert prompt(source).chunks[1][:5] == (BOS, 1, 7, 8, EOS)
    assert prompt(target).chunks[1][:7] == (BOS, 4, 5, 1, 7, 8, EOS)
    m = swap(source, target)
    pairs = [(0, 0), (1, 1)] + [(i, i + 2) for i in range(3, 74)]  # chunk 0 after the longer word: offset 2
    pairs += [(74, 78), (75, 79), (78, 80), (79, 81), (80, 82)]  # cat, dog, a, bicycle moved into chunk 1
    pairs += [(76, 76), (77, 77)]  # chunk 0's EOS and chunk 1's BOS stay in their chunks
    pairs += [(i, i + 2) for i in range(81, 152)]  # chunk 1's EOS and padding keep the new offset
    expected = from_pairs(pairs, 154)
    expected[2, 2:5] = 1 / 3
    assert torch.equal(m, expected)


def test_swap_needs_as_many_words():
    with pytest.raises(InputError) as err:
        swap_mapper(words_of("a photo of a cat"), words_of("a photo of a fluffy cat"), 77)
    assert err.value.input_name == "target" and "'refine'" in str(err.value)


def test_swap_rejects_rows_the_caller_got_wrong():
    with pytest.raises(ValueError, match="token ids"):
        swap_mapper([([1, 2], [1])], [([1], [1])], 77)
    with pytest.raises(ValueError, match="given twice"):
        swap_mapper([([1], [1]), ([2], [1])], [([1], [1]), ([2], [2])], 77)
    with pytest.raises(ValueError, match="whole number"):
        swap_mapper([], [], 80)


def test_refine_gives_inserted_tokens_alpha_zero_and_maps_the_rest():
    # source: BOS a photo of a cat EOS (row 6); target: BOS a photo of a flu ffy cat EOS (row 8)
    m, alphas = refine_mapper(prompt("a photo of a cat"), prompt("a photo of a fluffy cat"))
    expected_alphas = torch.ones(77)
    expected_alphas[[5, 6]] = 0.0
    assert torch.equal(alphas, expected_alphas)
    pairs = [(i, i) for i in range(5)] + [(5, 7)] + [(6 + k, 8 + k) for k in range(69)]  # cat, then EOS, pads
    assert torch.equal(m, from_pairs(pairs))
    # The convention the attention code relies on: A_src @ (M * alpha) puts source "cat" on target "cat".
    a_src = torch.rand(3, 77)
    edited = a_src @ (m * alphas[None, :])
    assert torch.equal(edited[:, 7], a_src[:, 5]) and edited[:, 5:7].abs().sum() == 0


def test_refine_removing_a_word_never_maps_source_content_onto_padding():
    # source: BOS a photo of a flu ffy cat EOS (row 8); target: BOS a photo of a cat EOS (row 6)
    m, alphas = refine_mapper(prompt("a photo of a fluffy cat"), prompt("a photo of a cat"))
    pairs = [(i, i) for i in range(5)] + [(7, 5)] + [(8 + k, 6 + k) for k in range(69)]
    assert torch.equal(m, from_pairs(pairs))
    assert m[5:7].sum() == 0  # the removed word's attention goes nowhere
    expected_alphas = torch.ones(77)
    expected_alphas[[75, 76]] = 0.0  # no source padding row left for them: they keep their own attention
    assert torch.equal(alphas, expected_alphas)


def test_refine_treats_a_substituted_word_as_inserted():
    m, alphas = refine_mapper(prompt("a photo of a cat"), prompt("a photo of a dog"))
    assert alphas[5] == 0 and alphas.sum() == 76 and m[:, 5].sum() == 0 and m[5].sum() == 0


def test_identical_prompts_give_the_exact_identity():
    for text in ("a photo of a cat riding a bicycle", "", " ".join(["a", "fluffy", "cat"] * 30)):
        t = prompt(text)
        m, alphas = refine_mapper(t, t)
        assert torch.equal(m, torch.eye(t.length)) and torch.equal(alphas, torch.ones(t.length))
        assert torch.equal(swap(text, text), torch.eye(t.length))


def test_refine_long_prompts_chunk_by_chunk():
    head = " ".join(["a", "photo"] * 37)  # 74 tokens: the next two words start chunk 1 after "of"
    source, target = prompt(f"{head} of a cat"), prompt(f"{head} of a fluffy cat")
    assert source.n_chunks == target.n_chunks == 2
    m, alphas = refine_mapper(source, target)
    assert torch.equal(m[:77, :77], torch.eye(77)) and m[:77, 77:].sum() == 0 and m[77:, :77].sum() == 0
    assert alphas[:77].eq(1).all()
    # chunk 1: BOS a flu ffy cat EOS (target) against BOS a cat EOS (source)
    assert alphas[77 + 2] == alphas[77 + 3] == 0 and alphas.sum() == 154 - 2
    assert m[77 + 2, 77 + 4] == 1 and m[77 + 3, 77 + 5] == 1  # cat -> cat, EOS -> EOS


def test_refine_aligns_words_an_insertion_pushed_into_the_next_chunk():
    """Aligned chunk by chunk, the words pushed over the border by "fluffy" lost their source maps (alpha 0)."""
    tail = " ".join(["of", "a", "dog", "and"] * 4)
    head = " ".join(["a", "photo"] * 36)  # 72 tokens
    source, target = prompt(f"{head} of a cat {tail}"), prompt(f"{head} of a fluffy cat {tail}")
    assert source.n_chunks == target.n_chunks == 2
    m, alphas = refine_mapper(source, target)
    # target: "fluffy" (2 tokens) does not fit after "... of a" (74 rows), so chunk 1 starts "fluffy cat of a dog";
    # source: chunk 0 ends "... of a cat" (75 rows), chunk 1 starts "of a dog"
    s_rows, t_rows = source.content_positions(), target.content_positions()
    inserted = [t_rows[74], t_rows[75]]  # "fluffy"
    assert inserted == [78, 79] and alphas[78] == alphas[79] == 0
    assert alphas[76] == 0  # the target's chunk 0 has one padding row more than the source's
    assert alphas.sum() == 154 - 3  # every other target row keeps a source row, the pushed words included
    for i, t in enumerate(t_rows[:74] + t_rows[76:]):
        assert m[s_rows[i], t] == 1  # each content token takes its own source token, across the border
    assert m[0, 0] == m[77, 77] == 1  # each chunk's BOS


def test_refine_needs_the_same_number_of_chunks():
    short, long = prompt("a photo of a cat"), prompt(" ".join(["a", "cat"] * 40))
    with pytest.raises(InputError) as err:
        refine_mapper(short, long)
    assert err.value.input_name == "target" and "similar in length" in str(err.value)


def test_auto_mapper_swaps_when_word_counts_match_and_refines_otherwise():
    pairs = [("a photo of a cat riding a bicycle", "a photo of a dog riding a motorcycle"),
             ("a photo of a cat", "a photo of a fluffy cat")]
    for source, target in pairs:
        s, t = prompt(source), prompt(target)
        m, alphas, mode = auto_mapper(s, t, words_of(source), words_of(target))
        if mode == "swap":
            assert source.count(" ") == target.count(" ")
            assert torch.equal(m, swap(source, target)) and torch.equal(alphas, torch.ones(77))
        else:
            assert mode == "refine"
            ref_m, ref_alphas = refine_mapper(s, t)
            assert torch.equal(m, ref_m) and torch.equal(alphas, ref_alphas)
    assert [auto_mapper(prompt(s), prompt(t), words_of(s), words_of(t))[2] for s, t in pairs] == ["swap", "refine"]
