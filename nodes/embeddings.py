"""Learned embeddings inside ComfyUI's CLIP: which text encoders a CLIP has, their token tables, and a CLIP
clone whose prompts resolve ``embedding:NAME`` to vectors held in memory.

The clone goes through the same code path as an embedding file in ``models/embeddings`` (SDTokenizer puts
the vectors into the token list, SDClipModel splices them into the input embeddings), so training through it
and loading the saved file give the same conditioning."""
from __future__ import annotations

import copy
import functools
from typing import Mapping

import torch
from comfy.sd1_clip import SDTokenizer

from ..training.errors import InputError
from ..training.identifier import hf_word_tokenizer
from ..training.nearest_tokens import nearest_tokens


def text_encoders(clip) -> dict[str, tuple[str, SDTokenizer, torch.nn.Module]]:
    """{embedding key (clip_l, clip_g, clip_h): (attribute name, tokenizer, encoder)} of a CLIP."""
    if clip is None:
        raise InputError("clip", "connect the CLIP that belongs to this checkpoint")
    found = {}
    for attr, tok in vars(clip.tokenizer).items():
        encoder = getattr(clip.cond_stage_model, attr, None)
        if isinstance(tok, SDTokenizer) and encoder is not None:
            found[tok.embedding_key] = (attr, tok, encoder)
    if not found:
        raise InputError("clip", f"{type(clip.tokenizer).__name__} has no CLIP text encoder to learn a token for")
    return found


def token_table(encoder: torch.nn.Module) -> torch.Tensor:
    return encoder.transformer.get_input_embeddings().weight


def init_ids(tokenizer: SDTokenizer, word: str) -> list[int]:
    return hf_word_tokenizer("", tokenizer.tokenizer, tokenizer.tokens_start, tokenizer.tokenizer_adds_end_token
                             ).encode(word.strip()) if word.strip() else []


def _lookup(original, vectors: Mapping[str, torch.Tensor], embedding_name: str):
    """SDTokenizer._try_get_embedding, answering our names from memory (same trailing-comma handling)."""
    split = embedding_name.split()
    name, leftover = split[0], " ".join(split[1:])
    if name in vectors:
        return vectors[name], leftover
    stripped = name.strip(",")
    if stripped in vectors:
        return vectors[stripped], f"{name[len(stripped):]} {leftover}"
    return original(embedding_name)


def clip_with_embeddings(clip, embeddings: Mapping[str, Mapping[str, torch.Tensor]]):
    """A clone of ``clip`` whose tokenizer resolves ``embedding:<name>`` for each ``{name: {key: [n, D]}}``
    before looking in models/embeddings. The input CLIP and its tokenizer are left as they are."""
    out = clip.clone()
    out.tokenizer = copy.copy(clip.tokenizer)  # clone() shares the tokenizer object
    for key, (attr, tok, _) in text_encoders(clip).items():
        mine = copy.copy(tok)
        if mine.embedding_directory is None:  # SDTokenizer only parses embedding: when it has a folder
            mine.embedding_directory = []
        table = {name: vecs[key] for name, vecs in embeddings.items() if key in vecs}
        mine._try_get_embedding = functools.partial(_lookup, SDTokenizer._try_get_embedding.__get__(mine), table)
        setattr(out.tokenizer, attr, mine)
    return out


def reads_embedding(clip, text: str) -> bool:
    """Whether every text encoder of ``clip`` gets at least one embedding vector from ``text`` (ComfyUI's tokenizer
    hands vectors over as tensors, words as ids): an "embedding:NAME" it cannot read is dropped with a log warning."""
    tokens = clip.tokenize(text)
    return all(any(not isinstance(t[0], int) for chunk in chunks for t in chunk) for chunks in tokens.values())


def hard_tokens(clip, text: str, input_name: str = "soft_text") -> tuple[dict, list[str]]:
    """``clip.tokenize(text)`` with every learned vector (``embedding:NAME``) replaced by its nearest real token
    in the same encoder's table: the "hard prompt" of the same length. Also returns the chosen words."""
    tokens = clip.tokenize(text)
    encoders = {attr.removeprefix("clip_"): (tok, enc) for attr, tok, enc in text_encoders(clip).values()}
    chosen = []
    for name, batches in tokens.items():
        if name not in encoders:
            continue
        tok, encoder = encoders[name]
        slots = [(b, i) for b, batch in enumerate(batches) for i, item in enumerate(batch)
                 if isinstance(item[0], torch.Tensor)]
        if not slots:
            continue
        vectors = torch.stack([batches[b][i][0] for b, i in slots])
        special = {t for t in (tok.start_token, tok.end_token, tok.pad_token) if t is not None}
        ids = nearest_tokens(vectors, token_table(encoder), exclude=special)
        for (b, i), token_id in zip(slots, ids):
            batches[b][i] = (token_id,) + tuple(batches[b][i][1:])
        vocab = getattr(tok, "inv_vocab", {})
        chosen.append(f"{name}: " + " ".join(vocab.get(t, str(t)).removesuffix("</w>") for t in ids))
    if not chosen:
        raise InputError(input_name, "has no learned token (write it as embedding:NAME, the way the soft prompt "
                                     "names it), so there is no word to replace; or connect the hard prompt")
    return tokens, chosen
