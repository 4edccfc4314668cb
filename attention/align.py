"""Source -> target token mappers for prompt-to-prompt, on context rows (the paper's ``seq_aligner``).

A mapper M [source rows, target rows] says which source tokens' attention each target token takes: the edited
cross-attention of the target is ``A_src @ (M * alpha[None, :])``, with ``1 - alpha`` of the target's own map
(``edits.py``). Word swap pairs the prompts word by word and spreads a replaced word's tokens over its
replacement; refinement aligns the token sequences globally (Needleman-Wunsch) and gives inserted tokens
alpha 0, so they keep their own attention.

Deliberate differences from google/prompt-to-prompt ``seq_aligner.py``:
* Word swap: after the last replaced word the original maps target row j from source row j, dropping the shift
  a replacement with a different token count introduced (so the target's EOS takes a source padding row, or a
  source word's attention). Here every unpaired row keeps the running offset, chunk by chunk.
* Refinement: the original maps the target rows after its EOS from the same source row (n -> n); when the source
  is longer those are source content tokens. Here target padding takes source padding in order (EOS -> EOS,
  first pad -> first pad, ...); target rows left without a source row get alpha 0.
* Several 77-token chunks: the original handles one; here both mappers work on every chunk, and refinement aligns
  the content of all chunks as one sequence.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..training.errors import InputError
from .tokens import CHUNK_LENGTH, PromptTokens

Word = tuple[Sequence[int], Sequence[int]]  # (token ids, context rows) of one space-separated word

# The paper's ScoreParams(gap=0, match=1, mismatch=-1): a substituted token costs more than a gap, so differing
# tokens become an insertion plus a deletion, i.e. inserted target tokens keep their own attention.
GAP, MATCH, MISMATCH = 0, 1, -1
_LEFT, _UP, _DIAG = 1, 2, 3  # traceback moves: consume a target token / a source token / both


def global_align(x: Sequence[int], y: Sequence[int]) -> list[int]:
    """Needleman-Wunsch alignment of token sequences: for each token of ``y``, the index of the ``x`` token
    aligned to it, or -1 where ``y`` inserts a token. Ties are broken as in the paper (left, then up, then
    diagonal), which with repeated tokens aligns to the earliest equal source token."""
    n, k = len(x), len(y)
    score = [[0] * (k + 1) for _ in range(n + 1)]
    move = [[_UP] * (k + 1) for _ in range(n + 1)]
    for j in range(k + 1):
        score[0][j], move[0][j] = j * GAP, _LEFT
    for i in range(1, n + 1):
        score[i][0] = i * GAP
        for j in range(1, k + 1):
            left = score[i][j - 1] + GAP
            up = score[i - 1][j] + GAP
            diag = score[i - 1][j - 1] + (MATCH if x[i - 1] == y[j - 1] else MISMATCH)
            best = max(left, up, diag)
            score[i][j] = best
            move[i][j] = _LEFT if best == left else _UP if best == up else _DIAG
    y_to_x = [-1] * k
    i, j = n, k
    while i > 0 or j > 0:
        step = move[i][j]
        if step == _DIAG:
            i, j = i - 1, j - 1
            y_to_x[j] = i
        elif step == _LEFT:
            j -= 1
        else:
            i -= 1
    return y_to_x


def _check_length(length: int) -> None:
    if length <= 0 or length % CHUNK_LENGTH:
        raise ValueError(f"a context of {length} rows is not a whole number of {CHUNK_LENGTH}-token chunks")


def _word_rows(word: Word, length: int, used: set[int]) -> list[int]:
    """The word's rows, checked: the caller built them, so a mismatch is a bug, not a user error."""
    ids, rows = word
    rows = [int(r) for r in rows]
    if len(ids) != len(rows):
        raise ValueError(f"a word has {len(ids)} token ids but {len(rows)} rows")
    if any(not 0 <= r < length for r in rows) or used.intersection(rows) or len(set(rows)) != len(rows):
        raise ValueError(f"word rows {rows} are outside the context of {length} rows or given twice")
    used.update(rows)
    return rows


def swap_mapper(source_words: Sequence[Word], target_words: Sequence[Word], length: int) -> torch.Tensor:
    """Word swap (``get_replacement_mapper_``): float32 [length, length], rows = source rows, columns = target rows.

    The i-th source word maps onto the i-th target word: token to token when both have as many tokens
    (unchanged words map diagonally), otherwise every source token spreads 1/len(target word) over each target
    token, so each source row still sums to 1. All other rows (BOS, EOS, padding) pair up in order within each
    77-token chunk, keeping the offset earlier length changes introduced. Target rows left over at the end of a
    chunk (when the source's words take more tokens) get an empty column: they receive no source attention,
    as in the paper."""
    _check_length(length)
    if len(source_words) != len(target_words):
        raise InputError("target", f"a word swap needs as many words as the source ({len(source_words)} "
                                   f"in the source, {len(target_words)} in the target); replace words one for "
                                   "one, or use mode 'refine' to add or remove words")
    mapper = torch.zeros(length, length, dtype=torch.float32)
    used_source: set[int] = set()
    used_target: set[int] = set()
    for source_word, target_word in zip(source_words, target_words):
        rows_s = _word_rows(source_word, length, used_source)
        rows_t = _word_rows(target_word, length, used_target)
        if not rows_s or not rows_t:
            continue  # nothing to carry over; the rows stay out of the in-order pairing below
        if len(rows_s) == len(rows_t):
            mapper[rows_s, rows_t] = 1.0
        else:
            mapper[torch.tensor(rows_s)[:, None], torch.tensor(rows_t)[None, :]] = 1.0 / len(rows_t)
    for start in range(0, length, CHUNK_LENGTH):
        # Chunk by chunk, so a chunk's BOS always meets the other prompt's BOS of the same chunk.
        chunk = range(start, start + CHUNK_LENGTH)
        rest_s = [r for r in chunk if r not in used_source]
        rest_t = [r for r in chunk if r not in used_target]
        for i, j in zip(rest_s, rest_t):
            mapper[i, j] = 1.0
    return mapper


def _rows(tokens: PromptTokens) -> tuple[list[int], list[list[int]]]:
    """(content rows of every chunk, in order; per chunk the rows after its content: EOS, padding)."""
    content, tails = [], []
    for chunk, mask in enumerate(tokens.content_mask):
        start = chunk * CHUNK_LENGTH
        rows = [start + p for p, f in enumerate(mask) if f]
        end = (rows[-1] + 1) if rows else start + 1  # after the BOS of an empty chunk
        content += rows
        tails.append(list(range(end, start + CHUNK_LENGTH)))
    return content, tails


def refine_mapper(source: PromptTokens, target: PromptTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """Refinement (``get_mapper``): (mapper float32 [Ls, Lt] of 0/1, alphas float32 [Lt]).

    The content tokens of all chunks are aligned globally as one sequence (gap 0, match 1, mismatch -1), so words
    that an insertion pushes into the next chunk still meet their source tokens; ``mapper[w, n] = 1`` iff target row
    n is aligned to source row w, and ``alphas[n] = 0`` where the target inserts a token (it keeps its own
    attention). Each chunk's BOS takes the source's BOS of that chunk, and the rows after a chunk's content (EOS,
    padding) that chunk's in order; target rows left without a source row get alpha 0."""
    if source.n_chunks != target.n_chunks:
        raise InputError("target", f"the source prompt tokenizes to {source.n_chunks} chunks of 77 tokens and "
                                   f"the target to {target.n_chunks}; make the prompts similar in length "
                                   "(shorten the longer one or lengthen the shorter one)")
    mapper = torch.zeros(source.length, target.length, dtype=torch.float32)
    alphas = torch.ones(target.length, dtype=torch.float32)
    (content_s, tails_s), (content_t, tails_t) = _rows(source), _rows(target)
    y_to_x = global_align([source.ids[r] for r in content_s], [target.ids[r] for r in content_t])
    for n, w in enumerate(y_to_x):
        if w < 0:
            alphas[content_t[n]] = 0.0
        else:
            mapper[content_s[w], content_t[n]] = 1.0
    for chunk, (tail_s, tail_t) in enumerate(zip(tails_s, tails_t)):
        mapper[chunk * CHUNK_LENGTH, chunk * CHUNK_LENGTH] = 1.0  # BOS
        for k, row_t in enumerate(tail_t):
            if k < len(tail_s):
                mapper[tail_s[k], row_t] = 1.0
            else:
                alphas[row_t] = 0.0
    return mapper, alphas


def auto_mapper(source: PromptTokens, target: PromptTokens, source_words: Sequence[Word],
                target_words: Sequence[Word]) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(mapper, alphas, "swap" | "refine"): a word swap when the prompts have as many words (the paper's
    choice for replacements), a refinement otherwise (words added or removed)."""
    if len(source_words) == len(target_words):
        if source.n_chunks != target.n_chunks:
            raise InputError("target", f"the source prompt tokenizes to {source.n_chunks} chunks of 77 tokens "
                                       f"and the target to {target.n_chunks}; make the prompts similar in length")
        return (swap_mapper(source_words, target_words, target.length),
                torch.ones(target.length, dtype=torch.float32), "swap")
    mapper, alphas = refine_mapper(source, target)
    return mapper, alphas, "refine"
