"""Which rows of the cross-attention context belong to which words of a prompt.

The host tokenizes a prompt into chunks of 77 tokens ([BOS, up to 75 content tokens, EOS, padding]) and the
cross-attention context has 77 rows per chunk, so a token's row is ``chunk * 77 + position``. Words are found by
tokenizing each word alone and matching its token ids among the content tokens only: BOS, EOS and padding are
never matched, even where their ids equal a content token's (SDXL's CLIP-G pads with id 0, which is "!").
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from ..training.errors import InputError

CHUNK_LENGTH = 77  # CLIP's context length; ComfyUI concatenates one block of this many rows per chunk
_WEIGHT_EXAMPLE = "write e.g. 'red: 2, blue car: -1.5' (word or phrase, colon, number; entries separated by commas)"
_MAX_LISTED_WORDS = 30  # keeps error messages for long prompts readable


@dataclass(frozen=True)
class PromptTokens:
    """A tokenized prompt: ``chunks[c][p]`` is the id at context row ``c * 77 + p`` and ``content_mask[c][p]``
    says whether that row is a prompt token (False for BOS, EOS and padding). Textual-inversion vectors have
    no id; the node side gives each vector a negative id made from its values."""

    chunks: tuple[tuple[int, ...], ...]
    content_mask: tuple[tuple[bool, ...], ...]
    # per content token (in order): whether it starts a word, i.e. the token before it ends one; None = every
    # token may start a match. "horse" must not be found in "seahorse" (sea + horse</w>).
    starts_word: tuple[bool, ...] | None = None

    def __post_init__(self):
        # Malformed tokens are a bug in the caller, not a user error: fail loudly before rows get misplaced.
        if not self.chunks:
            raise ValueError("a prompt has at least one chunk")
        if len(self.content_mask) != len(self.chunks):
            raise ValueError(f"{len(self.chunks)} chunks but {len(self.content_mask)} content masks")
        for c, (ids, mask) in enumerate(zip(self.chunks, self.content_mask)):
            if len(ids) != CHUNK_LENGTH or len(mask) != CHUNK_LENGTH:
                raise ValueError(f"chunk {c} has {len(ids)} ids and {len(mask)} mask entries, "
                                 f"expected {CHUNK_LENGTH} of each")

    @classmethod
    def from_chunks(cls, chunks: Sequence[Sequence[int]], content_mask: Sequence[Sequence[bool]],
                    ends_word: Callable[[int], bool] | None = None) -> PromptTokens:
        """From per-chunk ids and content flags as the host emits them (ComfyUI: word id != 0 means content);
        ``ends_word(id)``: whether a token ends a word (CLIP's BPE: its vocabulary entry ends with ``</w>``), so
        that a word is only found where a word starts."""
        tokens = cls(tuple(tuple(int(i) for i in c) for c in chunks),
                     tuple(tuple(bool(f) for f in m) for m in content_mask))
        if ends_word is None:
            return tokens
        ids = tokens.content_ids()
        starts = tuple(k == 0 or ends_word(ids[k - 1]) for k in range(len(ids)))
        return cls(tokens.chunks, tokens.content_mask, starts)

    @classmethod
    def from_content(cls, contents: Sequence[Sequence[int]], bos: int, eos: int, pad: int) -> PromptTokens:
        """Lays out each chunk's content ids as CLIP does: BOS, content, EOS, padding to 77 rows."""
        chunks, masks = [], []
        for c, content in enumerate(contents):
            room = CHUNK_LENGTH - 2
            if len(content) > room:
                raise ValueError(f"chunk {c} has {len(content)} content tokens, at most {room} fit")
            pad_count = room - len(content)
            chunks.append([bos, *content, eos] + [pad] * pad_count)
            masks.append([False] + [True] * len(content) + [False] * (1 + pad_count))
        return cls.from_chunks(chunks, masks)

    @property
    def n_chunks(self) -> int:
        return len(self.chunks)

    @property
    def length(self) -> int:
        """Rows of the cross-attention context: 77 per chunk."""
        return CHUNK_LENGTH * len(self.chunks)

    @property
    def ids(self) -> tuple[int, ...]:
        """Every row's id, chunk after chunk (index = context row)."""
        return tuple(i for chunk in self.chunks for i in chunk)

    def is_content(self, row: int) -> bool:
        return self.content_mask[row // CHUNK_LENGTH][row % CHUNK_LENGTH]

    def content_positions(self) -> list[int]:
        """Context rows of the content tokens, in order."""
        return [c * CHUNK_LENGTH + p for c, mask in enumerate(self.content_mask) for p, f in enumerate(mask) if f]

    def content_ids(self) -> list[int]:
        return [self.chunks[r // CHUNK_LENGTH][r % CHUNK_LENGTH] for r in self.content_positions()]

    def find(self, word_ids: Sequence[int]) -> list[int]:
        """Rows of every token of every occurrence of ``word_ids`` among the content tokens, sorted.

        Content is searched as one sequence, so a phrase whose words the host split over two chunks is found.
        Overlapping occurrences are all reported (each row once)."""
        needle = [int(i) for i in word_ids]
        if not needle:
            return []
        rows, ids = self.content_positions(), self.content_ids()
        found: set[int] = set()
        for start in range(len(ids) - len(needle) + 1):
            if ids[start:start + len(needle)] == needle and (self.starts_word is None or self.starts_word[start]):
                found.update(rows[start:start + len(needle)])
        return sorted(found)


def parse_word_weights(text: str, input_name: str = "words") -> list[tuple[str, float]]:
    """``word or phrase:weight`` entries separated by commas or new lines; weights may be negative.

    The last colon separates the weight, so a phrase may contain colons (``embedding:name:2``). A word given twice
    is refused: one of its weights would be dropped."""
    parsed, seen = [], {}
    for entry in re.split(r"[,\n]", text or ""):
        entry = entry.strip()
        if not entry:
            continue
        word, colon, number = entry.rpartition(":")
        word = word.strip()
        if not colon:
            raise InputError(input_name, f"'{entry}' has no weight; {_WEIGHT_EXAMPLE}")
        if not word:
            raise InputError(input_name, f"'{entry}' has a weight but no word; {_WEIGHT_EXAMPLE}")
        try:
            weight = float(number)
        except ValueError:
            raise InputError(input_name, f"'{number.strip()}' in '{entry}' is not a number; {_WEIGHT_EXAMPLE}") \
                from None
        if not math.isfinite(weight):  # float() accepts 'nan' and 'inf', which would poison the attention maps
            raise InputError(input_name, f"the weight in '{entry}' must be a finite number; {_WEIGHT_EXAMPLE}")
        key = " ".join(word.lower().split())  # CLIP lowercases: "Red" and "red" are one word
        if key in seen:  # the later weight would silently win
            raise InputError(input_name, f"'{word}' is given twice ({seen[key]:g} and {weight:g}); give each word once")
        seen[key] = weight
        parsed.append((word, weight))
    return parsed


def _understood_words(prompt: PromptTokens, prompt_text: str, tokenize_word: Callable[[str], list[int]]) -> str:
    """The words of ``prompt_text`` that can be located, to show the user what a lookup can match."""
    plain = re.sub(r":\s*[-+]?(\d+\.?\d*|\.\d+)\s*\)", ")", prompt_text)  # "(red:1.3)" -> "(red)"
    words = [w for w in re.split(r"[\s,()\[\]{}]+", plain) if w][:_MAX_LISTED_WORDS]
    located = [w for w in dict.fromkeys(words) if prompt.find(tokenize_word(w))]
    return ", ".join(located) if located else "none"


def word_positions(prompt: PromptTokens, words: Sequence[str], tokenize_word: Callable[[str], list[int]],
                   input_name: str = "words", prompt_text: str = "") -> dict[str, list[int]]:
    """Context rows of each word or phrase (all its occurrences, all its tokens).

    ``tokenize_word`` returns a word's content ids without BOS/EOS, tokenized alone as the prompt's words are.
    Give ``prompt_text`` to list, in the error, which of the prompt's words can be found."""
    found = {}
    for word in words:
        ids = tokenize_word(word)
        if not ids:
            raise InputError(input_name, f"'{word}' gives no tokens; write a word that appears in the prompt")
        rows = prompt.find(ids)
        if not rows:
            hint = ""
            if prompt_text:
                hint = f" Words found in the prompt: {_understood_words(prompt, prompt_text, tokenize_word)}."
            raise InputError(input_name, f"'{word}' is not in the prompt; write it exactly as it is spelled "
                                         f"there.{hint}")
        found[word] = rows
    return found


def token_weights(length: int, positions: Mapping[str, Sequence[int]], weights: Mapping[str, float]) -> torch.Tensor:
    """float32 [length]: each word's weight on its rows, 1.0 elsewhere. Where words share rows ("red" and
    "red hat") the word listed last wins, so users can refine a phrase's weight word by word."""
    out = torch.ones(length, dtype=torch.float32)
    for word, rows in positions.items():
        rows = list(rows)
        if any(not 0 <= r < length for r in rows):
            raise ValueError(f"rows of '{word}' fall outside a context of {length} rows: {rows}")
        out[rows] = float(weights[word])
    return out
