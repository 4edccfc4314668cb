"""Nearest real tokens of learned vectors: the "hard prompt" of a learned word, and the start point of fast
personalisation (a word embedding initialised at real words). Cosine similarity in the encoder's own token
table, so the answer does not depend on the vectors' scale."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F


@torch.no_grad()
def nearest_tokens(vectors: torch.Tensor, table: torch.Tensor, exclude: Iterable[int] = (),
                   chunk: int = 8192) -> list[int]:
    """For each row of ``vectors`` [n, D], the id of the most similar row of ``table`` [V, D] (cosine), skipping
    the ids in ``exclude`` (start/end/padding tokens). Runs on the table's device in float32, ``chunk`` rows of
    the table at a time (an SDXL clip_g table is 49408 x 1280)."""
    if vectors.dim() != 2 or table.dim() != 2 or vectors.shape[1] != table.shape[1]:
        raise ValueError(f"vectors [n, D] and table [V, D] must share D; got {tuple(vectors.shape)} and "
                         f"{tuple(table.shape)}")
    queries = F.normalize(vectors.to(table.device, torch.float32), dim=-1)
    banned = torch.tensor(sorted(set(exclude)), dtype=torch.long, device=table.device)
    best = torch.full((vectors.shape[0],), -float("inf"), device=table.device)
    best_id = torch.zeros(vectors.shape[0], dtype=torch.long, device=table.device)
    for start in range(0, table.shape[0], chunk):
        sims = queries @ F.normalize(table[start:start + chunk].float(), dim=-1).t()  # [n, chunk]
        local = banned[(banned >= start) & (banned < start + sims.shape[1])] - start
        sims[:, local] = -float("inf")
        value, index = sims.max(dim=1)
        better = value > best
        best = torch.where(better, value, best)
        best_id = torch.where(better, index + start, best_id)
    return best_id.tolist()
