"""Regularisers of one-image fast personalisation (DATE-style: a word embedding started at real words and a
LoRA, tuned for a few dozen steps): keep the learned word near real words, and the tuned weights near their start.
Everything runs on the device without host reads, so a regularised step can still be a CUDA graph."""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class NearestTokenContrastive:
    """DATE's nearest-neighbour contrastive regulariser for learned token vectors, with a pull that bounds it.

    * contrastive: the cross-entropy of a vector's cosine similarities to every real token of the encoder's table
      (over ``temperature``) with its nearest real token as the target: toward that word, away from the others.
      Cosines are taken about the table's mean: real token tables share a common direction, and "away from all
      the others" would otherwise push the word out along it, off the region real words occupy (a third of a word's
      length on a table as anisotropic as CLIP's can be; at the word about the mean, it stays);
    * pull: the squared distance to that nearest token relative to its length, ``|v - e|^2 / |e|^2``. Cosine
      alone leaves the vector's length free, and Adam lets it grow; a token twice as long as any real one would
      dominate the prompt. The pull is zero at the real word, the contrastive term is not (it also asks the word
      to stand apart from its neighbours).

    The nearest token is chosen again at every step, on the device. ``exclude``: ids never chosen (start, end,
    padding)."""

    def __init__(self, table: torch.Tensor, temperature: float = 0.07, exclude: Iterable[int] = ()):
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.table = table.detach().float()
        self.center = self.table.mean(0)
        self.unit_table = F.normalize(self.table - self.center, dim=-1)  # [V, D], normalised once
        self.temperature = temperature
        self.mask = torch.zeros(table.shape[0], device=table.device)
        banned = sorted(set(exclude))
        if banned:
            self.mask[banned] = -float("inf")

    def to(self, device) -> "NearestTokenContrastive":
        self.table, self.unit_table, self.mask = self.table.to(device), self.unit_table.to(device), self.mask.to(device)
        self.center = self.center.to(device)
        return self

    def logits(self, vectors: torch.Tensor) -> torch.Tensor:
        return F.normalize(vectors.float() - self.center, dim=-1) @ self.unit_table.t() / self.temperature + self.mask

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        logits = self.logits(vectors)
        nearest = logits.detach().argmax(dim=-1)
        word = self.table.index_select(0, nearest)
        pull = (vectors.float() - word).square().sum(-1) / word.square().sum(-1).clamp_min(1e-12)
        return F.cross_entropy(logits, nearest) + pull.mean()


class DistanceToStart:
    """Sum of squared distances of ``params`` from their values when this was made (L2 toward the init): each
    weight is pulled by 2 * weight * (w - w0), weight decay toward the start rather than toward zero."""

    def __init__(self, params: Sequence[nn.Parameter]):
        self.params = list(params)
        self.start = [p.detach().clone() for p in self.params]

    def __call__(self) -> torch.Tensor:
        if not self.params:
            return torch.zeros(())
        moved = torch._foreach_sub([p.float() for p in self.params], [s.float() for s in self.start])
        return torch.stack(torch._foreach_norm(moved)).square().sum()


class FastTuneRegularizer:
    """``nn_weight * sum over encoders of NearestTokenContrastive(vectors) + l2_weight * DistanceToStart``; the
    trainer adds it once per optimiser step."""

    def __init__(self, vectors: Mapping[str, torch.Tensor], contrastive: Mapping[str, NearestTokenContrastive],
                 tuned: Sequence[nn.Parameter], nn_weight: float, l2_weight: float):
        if nn_weight < 0 or l2_weight < 0:
            raise ValueError("regulariser weights must be 0 (off) or positive")
        missing = set(vectors) - set(contrastive)
        if missing:
            raise ValueError(f"no token table for {sorted(missing)}")
        self.vectors, self.contrastive = dict(vectors), dict(contrastive)
        self.distance = DistanceToStart(tuned)
        self.nn_weight, self.l2_weight = nn_weight, l2_weight

    @property
    def active(self) -> bool:
        return bool(self.nn_weight or self.l2_weight)

    def __call__(self) -> torch.Tensor:
        terms = []
        if self.nn_weight:
            terms += [self.nn_weight * self.contrastive[k](v) for k, v in self.vectors.items()]
        if self.l2_weight:
            terms.append(self.l2_weight * self.distance())
        if not terms:  # a host-made zero would be a copy to the device, which a CUDA graph cannot hold
            return next(iter(self.vectors.values())).new_zeros(())
        return torch.stack(terms).sum()
