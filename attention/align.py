"""Source -> target token mappers for prompt-to-prompt (the paper's ``seq_aligner``, on context rows).

A mapper M [source rows, target rows] says which source tokens' attention a target token takes:
the edited map is A_src @ M (see ``edits.py``). Word swap spreads a replaced word's tokens over its
replacement; refinement aligns the token sequences globally (Needleman-Wunsch, gap 0, match 1, mismatch -1)
and gives inserted tokens alpha 0, so they keep their own attention.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..training.errors import InputError
from .tokens import PromptTokens

Word = tuple[Sequence[int], Sequence[int]]  # (token ids, context rows) of one space-separated word
_LEFT, _UP, _DIAG = 1, 2, 3


def swap_mapper(source: Sequence[Word], target: Sequence[Word], length: int) -> torch.Tensor:
    """Word swap (``get_replacement_mapper_``): the prompts have the same number of words; a word with as many
    tokens as its replacement maps token to token, otherwise each source token spreads 1/len(target tokens)
    over the replacement. All other rows (BOS, EOS, padding) pair up in order, keeping the offset a length
    change introduces. (The original maps the rows after the last replaced word to themselves, j -> j, even
    when a length change shifted them; we keep the shift.)"""
    if len(source) != len(target):
        raise InputError("target", f"a word swap needs the same number of words ({len(source)} in the source, "
                                   f"{len(target)} in the target); use mode 'refine' to add or remove words")
    m = torch.zeros(length, length)
    used_src, used_tgt = set(), set()
    for (_, rows_s), (_, rows_t) in zip(source, target):
        if len(rows_s) == len(rows_t):
            m[list(rows_s), list(rows_t)] = 1.0
        else:
            m[torch.tensor(rows_s)[:, None], torch.tensor(rows_t)[None, :]] = 1.0 / len(rows_t)
        used_src.update(rows_s)
        used_tgt.update(rows_t)
    rest_s = [i for i in range(length) if i not in used_src]
    rest_t = [j for j in range(length) if j not in used_tgt]
    for i, j in zip(rest_s, rest_t):
        m[i, j] = 1.0
    return m


def global_align(x: Sequence[int], y: Sequence[int]) -> list[int]:
    """For each token of ``y``, the index of the ``x`` token aligned to it, or -1 (inserted). Scores and
    tie-breaking as the paper's ``global_align``: gap 0, match 1, mismatch -1; left, then up, then diagonal."""
    n, k = len(x), len(y)
    score = [[0] * (k + 1) for _ in range(n + 1)]
    trace = [[_UP] * (k + 1) for _ in range(n + 1)]
    trace[0] = [_LEFT] * (k + 1)
    for i in range(1, n + 1):
        for j in range(1, k + 1):
            left, up = score[i][j - 1], score[i - 1][j]
            diag = score[i - 1][j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            best = max(left, up, diag)
            score[i][j] = best
            trace[i][j] = _LEFT if best == left else _UP if best == up else _DIAG
    mapped = [-1] * k
    i, j = n, k
    while i > 0 or j > 0:
        step = trace[i][j]
        if step == _DIAG:
            i, j = i - 1, j - 1
            mapped[j] = i
        elif step == _LEFT:
            j -= 1
        else:
            i -= 1
    return mapped


def _chunk_rows(tokens: PromptTokens, chunk: int) -> list[int]:
    """The rows of one 77-chunk that take part in the alignment: BOS, the content and the EOS after it."""
    rows = range(chunk * 77, (chunk + 1) * 77)
    content = [r for r in rows if tokens.content[r]]
    last = content[-1] + 1 if content else rows[0] + 1
    return list(range(rows[0], min(last + 1, rows[-1] + 1)))


def refine_mapper(source: PromptTokens, target: PromptTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """(mapper [Ls, Lt] of 0/1, alphas [Lt]): refinement (``get_mapper``) chunk by chunk. Rows after each
    chunk's EOS (padding) map to themselves with alpha 1."""
    if source.length != target.length:
        raise InputError("target", "the source and target prompts tokenize to a different number of 77-token "
                                   "chunks; make their lengths similar")
    length = target.length
    m, alphas = torch.zeros(length, length), torch.ones(length)
    covered = set()
    for chunk in range(length // 77):
        rows_s, rows_t = _chunk_rows(source, chunk), _chunk_rows(target, chunk)
        aligned = global_align([source.ids[r] for r in rows_s], [target.ids[r] for r in rows_t])
        for j, i in enumerate(aligned):
            if i >= 0:
                m[rows_s[i], rows_t[j]] = 1.0
            else:
                alphas[rows_t[j]] = 0.0
        covered.update(rows_t)
    for j in range(length):
        if j not in covered:
            m[j, j] = 1.0
    return m, alphas
