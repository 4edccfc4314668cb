"""Which rows of the cross-attention context belong to which words of the prompt.

The host tokenizes a prompt into chunks of 77 tokens ([BOS, up to 75 content tokens, EOS, padding]); the
context has 77 rows per chunk, so a token's row is chunk * 77 + position. Words are found by tokenizing each
word alone and matching its token ids among the content tokens (never BOS, EOS or padding).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from ..training.errors import InputError


@dataclass(frozen=True)
class PromptTokens:
    ids: tuple[int, ...]  # every row's token id, chunk after chunk
    content: tuple[bool, ...]  # whether the row is a prompt token (not BOS/EOS/padding)

    @classmethod
    def from_chunks(cls, chunks: Sequence[Sequence[int]], content: Sequence[Sequence[bool]]) -> "PromptTokens":
        return cls(tuple(i for c in chunks for i in c), tuple(bool(f) for c in content for f in c))

    @property
    def length(self) -> int:
        return len(self.ids)

    def content_positions(self) -> list[int]:
        return [i for i, c in enumerate(self.content) if c]

    def content_ids(self) -> list[int]:
        return [self.ids[i] for i in self.content_positions()]

    def find(self, word_ids: Sequence[int]) -> list[int]:
        """Rows of every occurrence of the token sequence ``word_ids`` among the content tokens."""
        n = len(word_ids)
        if n == 0:
            return []
        pos, ids = self.content_positions(), self.content_ids()
        rows = []
        for i in range(len(ids) - n + 1):
            if ids[i:i + n] == list(word_ids):
                rows += pos[i:i + n]
        return rows


def parse_word_weights(text: str, input_name: str = "words") -> list[tuple[str, float]]:
    """``word:weight`` entries separated by commas or new lines; a phrase may hold spaces; weights may be < 0."""
    out = []
    for entry in re.split(r"[,\n]", text or ""):
        entry = entry.strip()
        if not entry:
            continue
        word, sep, number = entry.rpartition(":")
        try:
            weight = float(number) if sep else None
        except ValueError:
            weight = None
        if weight is None or not word.strip() or weight != weight:
            raise InputError(input_name, f"'{entry}' is not word:weight; write e.g. 'red:2, blue car:-1'")
        out.append((word.strip(), weight))
    return out


def word_positions(prompt: PromptTokens, words: Sequence[str], tokenize_word: Callable[[str], list[int]],
                   input_name: str = "words") -> dict[str, list[int]]:
    """Rows of each word or phrase (all occurrences); a word that is not in the prompt is an error naming it."""
    found = {}
    for word in words:
        rows = prompt.find(tokenize_word(word))
        if not rows:
            raise InputError(input_name, f"'{word}' is not in the prompt; use a word exactly as it is written there")
        found[word] = rows
    return found


def token_weights(length: int, positions: Mapping[str, Sequence[int]], weights: Mapping[str, float]) -> torch.Tensor:
    """A weight per context row: the word's weight on its rows, 1 elsewhere."""
    w = torch.ones(length)
    for word, rows in positions.items():
        w[list(rows)] = float(weights[word])
    return w
