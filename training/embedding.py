"""Textual Inversion: new token vectors learned for each text encoder, nothing else trained.

The vectors live outside the encoder's embedding table (the host feeds them in where the prompt names
them), so every existing row stays bit-identical by construction. The file format is the one ComfyUI and
A1111 load: ``{"clip_l": [n, 768]}``, SDXL ``{"clip_l": [n, 768], "clip_g": [n, 1280]}``."""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch
from torch import nn

from .errors import InputError

_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


def check_token_name(token: str, input_name: str = "token") -> str:
    """The name prompts use (``embedding:NAME``): letters, digits, ``_`` and ``-`` only."""
    token = (token or "").strip()
    if not _NAME.match(token):
        raise InputError(input_name, f"{token!r} cannot name an embedding; use letters, digits, _ or - "
                                     "(e.g. the Identifier node's word)")
    return token


def initial_vectors(table: torch.Tensor, init_ids: Sequence[int], num_vectors: int,
                    input_name: str = "init_word") -> torch.Tensor:
    """[num_vectors, D] copied from the init word's token rows, repeated when the word has fewer tokens than
    vectors (A1111's scheme); the start point is the init word's meaning."""
    if not init_ids:
        raise InputError(input_name, "is empty; give a word close to the subject, e.g. 'dog' or 'painting'")
    if num_vectors < 1:
        raise InputError("num_vectors", f"must be at least 1, got {num_vectors}")
    rows = [init_ids[i % len(init_ids)] for i in range(num_vectors)]
    return table[rows].detach().float().clone()


class TextualInversion(nn.Module):
    """One learned [n, D] matrix per text-encoder key (``clip_l``, ``clip_g``, ``clip_h``)."""

    def __init__(self, token: str, vectors: Mapping[str, torch.Tensor]):
        super().__init__()
        self.token = check_token_name(token)
        if not vectors:
            raise ValueError("no text encoder to learn vectors for")
        counts = {v.shape[0] for v in vectors.values()}
        if len(counts) != 1:
            raise ValueError(f"every encoder needs the same number of vectors, got {counts}")
        self.vectors = nn.ParameterDict({k: nn.Parameter(v.detach().float().clone()) for k, v in vectors.items()})

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.vectors.items()}

    def load_file_tensors(self, tensors: Mapping[str, torch.Tensor], input_name: str = "resume_from") -> None:
        """Continue from a saved embedding with the same encoders and vector count."""
        for key, param in self.vectors.items():
            if key not in tensors:
                raise InputError(input_name, f"the embedding has no {key!r} vectors (it has {sorted(tensors)})")
            if tuple(tensors[key].shape) != tuple(param.shape):
                raise InputError(input_name, f"{key} is {tuple(tensors[key].shape)}, this run trains "
                                             f"{tuple(param.shape)}; use the same num_vectors")
            with torch.no_grad():
                param.copy_(tensors[key])


def with_embedding_syntax(caption: str, token: str, required: bool = True) -> str:
    """Replace the bare token word in a caption by ``embedding:token`` (the prompt syntax ComfyUI resolves to
    the vectors); one already written ``embedding:token`` stays. A caption without the token trains nothing, so
    it is refused (``required``; else returned as it is)."""
    pattern = re.compile(r"(?<![\w:])" + re.escape(token) + r"(?![\w])")
    if not pattern.search(caption):
        if not required or re.search(r"(?<![\w:])embedding:" + re.escape(token) + r"(?![\w])", caption):
            return caption
        raise InputError("token", f"caption {caption!r} does not contain {token!r}; put the token (or "
                                  "{identifier}) in every caption")

    def spaced(match: re.Match) -> str:
        # ComfyUI reads "embedding:NAME" only after a space or line start and up to the next space (trailing
        # commas aside): "zwx." or ",zwx" would name no embedding and the word would be dropped. The spaces change
        # no CLIP token: its tokenizer splits punctuation off a word anyway.
        before = "" if match.start() == 0 or caption[match.start() - 1].isspace() else " "
        after = "" if match.end() == len(caption) or caption[match.end()].isspace() else " "
        return f"{before}embedding:{token}{after}"

    return pattern.sub(spaced, caption)


class TrainedEmbedding(dict):
    """``{encoder key: [n, D]}`` plus the token name and metadata, what Save Embedding writes."""

    def __init__(self, token: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None):
        super().__init__(tensors)
        self.token = token
        self.metadata = dict(metadata or {})
