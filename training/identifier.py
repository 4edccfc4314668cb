"""The DreamBooth identifier: a rare word that is exactly one token in every text encoder of the model.

DreamBooth (Ruiz et al., CVPR 2023, "Rare-token Identifiers") binds the subject to a rare-token identifier:
look up rare tokens in the tokenizer's vocabulary and decode them to short strings, so that the word brings
little meaning of its own that fine-tuning would have to overwrite ("sks" shows the failure: it is a rifle,
and the rifle leaks in).

No word list can be downloaded, so the vocabulary is its own frequency source. Rule for CLIP's byte-level BPE
(``vocab.json``; a token that ends a word ends with ``</w>``), applied to the word-final tokens:

* rare: BPE ids follow merge order, which roughly follows corpus frequency (low id = frequent), so only ids in
  the upper 40% of the vocabulary count (id >= 0.6 * size: >= 29645 of CLIP's 49408);
* short and typeable: 3-5 ASCII letters with a vowel and a consonant, no letter three times in a row
  (drops acronyms such as "hsbc" and interjections such as "aaah");
* a piece of other words, not a word or a name: the string ends at least 3 longer word-final tokens
  (CLIP picks look like "onomy", "ished", "ayers"), and it starts with a vowel or with two consonants that
  start at most one frequent word (frequent = the lowest 30% of ids), which drops words like "rove" or "hens";
* not in COMMON_WORDS (prompt words and real words these statistics let through) nor KNOWN_LOADED;
* exactly one token in every tokenizer given (SDXL: CLIP-L and CLIP-G), tokenized as the host tokenizes a word.
"""
from __future__ import annotations

import logging
import random
import re
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Mapping, Sequence

from .errors import InputError

log = logging.getLogger(__name__)

WORD_END = "</w>"
RARE_FROM = 0.6  # fraction of the vocabulary size where "rare" ids start
FREQUENT_BELOW = 0.3  # ids below this fraction are the "frequent words" the start rule compares with
MIN_ENDING_OF = 3  # a candidate must end at least this many longer word-final tokens
MIN_LETTERS, MAX_LETTERS = 3, 5
VOWELS = frozenset("aeiou")

# Identifiers with a meaning of their own or overused by the community: a model may already know them.
KNOWN_LOADED = frozenset({
    "sks",  # the SKS rifle; also diffusers' DreamBooth example identifier, so heavily reused
    "ohwx", "zwx", "xyz", "tok",  # kohya/A1111 tutorial and textual-inversion placeholder identifiers
    # names, brands and slang that pass the rules on CLIP's vocabulary
    "rca", "oled", "eton", "alton", "orton", "ewing", "erick", "egan", "etta", "omas", "ahn", "avs", "uck",
})

# Words the pick must never return: prompt words and class nouns (for vocabularies too small for the
# statistics above to say much), then the real words that pass the rules on CLIP's vocabulary.
COMMON_WORDS = frozenset("""
a an the of and or with in on at to by for from about after again also only over under into other every
photo picture image style art painting drawing render portrait face
dog cat person man woman boy girl child toy car house red blue green black white
arson ides apse eon ands ahaha ahah ural oat amine asp atty owed owing urn eels airy awn alder ember erm oof
arma ester anis
""".split())


@dataclass(frozen=True)
class WordTokenizer:
    """One text encoder's tokenizer: ``encode(word)`` gives the word's token ids without start/end tokens."""

    name: str
    encode: Callable[[str], Sequence[int]]
    vocab: Mapping[str, int]

    @cached_property
    def candidates(self) -> list[str]:
        """candidate_pool(vocab), computed once per tokenizer (it scans the whole vocabulary)."""
        return candidate_pool(self.vocab)

    def pieces(self, word: str) -> list[str]:
        by_id = {i: token for token, i in self.vocab.items()}
        return [by_id.get(i, f"<{i}>").removesuffix(WORD_END) for i in self.encode(word)]


def hf_word_tokenizer(name: str, hf_tokenizer, tokens_start: int = 1, adds_end_token: bool = True) -> WordTokenizer:
    """Wrap a transformers tokenizer the way ComfyUI's SDTokenizer tokenizes one word of a prompt."""
    end = -1 if adds_end_token else None

    def encode(word: str) -> list[int]:
        return list(hf_tokenizer(word)["input_ids"][tokens_start:end])

    return WordTokenizer(name, encode, hf_tokenizer.get_vocab())


def candidate_pool(vocab: Mapping[str, int]) -> list[str]:
    """Rare word-final tokens that read as nonsense (the rule in the module docstring), frequent first."""
    size = len(vocab)
    words = {t[: -len(WORD_END)]: i for t, i in vocab.items() if t.endswith(WORD_END)}
    letter_words = {w: i for w, i in words.items() if re.fullmatch(r"[a-z]+", w)}
    ending_count = Counter(w[k:] for w in letter_words for k in range(1, len(w)))
    frequent_starts = Counter(w[:2] for w, i in letter_words.items() if i < FREQUENT_BELOW * size and len(w) > 1)

    def reads_as_nonsense(w: str) -> bool:
        starts_oddly = w[0] in VOWELS or (w[1] not in VOWELS and frequent_starts[w[:2]] <= 1)
        return (bool(VOWELS & set(w)) and not set(w) <= VOWELS and not re.search(r"(.)\1\1", w)
                and ending_count[w] >= MIN_ENDING_OF and starts_oddly)

    pool = [w for w, i in letter_words.items()
            if i >= RARE_FROM * size and MIN_LETTERS <= len(w) <= MAX_LETTERS
            and w not in COMMON_WORDS and w not in KNOWN_LOADED and reads_as_nonsense(w)]
    return sorted(pool, key=letter_words.__getitem__)


def _token_counts(word: str, tokenizers: Sequence[WordTokenizer]) -> dict[str, int]:
    return {t.name: len(t.encode(word)) for t in tokenizers}


def pick_identifier(tokenizers: Sequence[WordTokenizer], seed: int = 0) -> str:
    """A rare word that is one token in every tokenizer; the same seed gives the same word."""
    if not tokenizers:
        raise InputError("clip", "has no text tokenizer to pick an identifier for")
    # Candidates come from a CLIP-style vocabulary (word-final tokens); the others only have to agree.
    source = next((t for t in tokenizers if any(k.endswith(WORD_END) for k in t.vocab)), tokenizers[0])
    pool = list(source.candidates)
    random.Random(seed).shuffle(pool)
    for word in pool:  # tokenize lazily: usually the first candidate already fits
        if all(n == 1 for n in _token_counts(word, tokenizers).values()):
            log.info("picked identifier %r (seed %d, %d candidates)", word, seed, len(pool))
            return word
    names = ", ".join(t.name for t in tokenizers)
    raise InputError("identifier", f"no rare word is one token in every text encoder ({names}); "
                                   "type an identifier that is one token in all of them")


def validate_identifier(word: str, tokenizers: Sequence[WordTokenizer]) -> str:
    """The user's identifier, stripped, if it is one word and one token in every tokenizer."""
    word = (word or "").strip()
    if not word:
        raise InputError("identifier", "is empty; type a rare word, or leave it empty to have one picked")
    if re.search(r"\s", word):
        raise InputError("identifier", f"{word!r} has spaces; an identifier is one word "
                                       "(leave it empty to have one picked)")
    if not word.isalnum() or not any(ch.isalpha() for ch in word):
        # "<|endoftext|>" is one token, the very one ComfyUI pads every prompt with; "," is in most prompts
        raise InputError("identifier", f"{word!r} is not a word; an identifier is letters (and digits) only, "
                                       "or leave it empty to have one picked")
    for t in tokenizers:
        pieces = t.pieces(word)
        if len(pieces) != 1:
            raise InputError("identifier", f"{word!r} is {len(pieces)} tokens in {t.name} "
                                           f"({' | '.join(pieces)}), so the subject would be spread over several "
                                           "words; type a word that is one token, or leave it empty to have one "
                                           "picked")
    if word.lower() in KNOWN_LOADED:
        log.warning("identifier %r already has a meaning or is widely used; the model may mix it in", word)
    elif word.lower() in COMMON_WORDS:
        log.warning("identifier %r is a common word; its meaning will leak into the subject", word)
    return word


def _class_noun(class_noun: str) -> str:
    noun = " ".join((class_noun or "").split())
    if not noun:
        raise InputError("class_noun", "is empty; name what the subject is, e.g. dog, person, backpack")
    return noun


def identifier_prompt(identifier: str, class_noun: str) -> str:
    """The instance prompt: "a photo of {identifier} {class_noun}"."""
    return f"a photo of {identifier} {_class_noun(class_noun)}"


def class_prompt(class_noun: str) -> str:
    """The prior-preservation prompt: "a photo of a {class_noun}" ("an" before a vowel)."""
    noun = _class_noun(class_noun)
    article = "an" if noun[0].lower() in VOWELS else "a"
    return f"a photo of {article} {noun}"
