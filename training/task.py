"""What a host hands the core: a denoiser call, its noise schedule and its conditioning."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from .schedule import NoiseSchedule


@dataclass(frozen=True)
class Conditioning:
    """Cross-attention context [B, L, D] and, for SDXL-style models, the ADM vector y [B, A]. ``hard``: per row,
    the same prompt with its learned word replaced by a real one, for a model that blends the two (the Dual-Path
    blend); a row whose prompt has no learned word is its own hard prompt."""

    context: torch.Tensor
    y: torch.Tensor | None = None
    hard: "Conditioning | None" = None

    def __len__(self) -> int:
        return self.context.shape[0]

    def _each(self, f) -> "Conditioning":
        """f applied to every tensor, the hard prompts' too."""
        return Conditioning(f(self.context), None if self.y is None else f(self.y),
                            None if self.hard is None else self.hard._each(f))

    def select(self, index: torch.Tensor) -> "Conditioning":
        return self._each(lambda t: t[index.to(t.device)])

    def to(self, device: torch.device | str) -> "Conditioning":
        return self._each(lambda t: t.to(device))

    def clone(self) -> "Conditioning":
        """Fresh tensors: ones made under ComfyUI's inference mode cannot take part in autograd."""
        return self._each(torch.Tensor.clone)

    def with_hard(self, hard: "Conditioning | None") -> "Conditioning":
        if hard is not None and (len(hard) != len(self) or hard.context.shape[1:] != self.context.shape[1:]):
            raise ValueError(f"hard prompts {tuple(hard.context.shape)} do not pair with {tuple(self.context.shape)}")
        return Conditioning(self.context, self.y, hard)

    def plain(self) -> "Conditioning":
        """Without hard prompts."""
        return Conditioning(self.context, self.y)

    def expand(self, n: int) -> "Conditioning":
        """The one conditioning repeated for a batch of ``n``."""
        if len(self) != 1:
            raise ValueError(f"expand needs a single conditioning, got {len(self)}")
        return self._each(lambda t: t.expand(n, *t.shape[1:]))

    def with_y_tail(self, tail: torch.Tensor | None) -> "Conditioning":
        """y with its last ``tail.shape[-1]`` values replaced per sample (SDXL's size/crop embeddings follow the
        pooled text vector); unchanged for None."""
        if tail is None:
            return self
        head = self.y[:, :self.y.shape[-1] - tail.shape[-1]]
        hard = None if self.hard is None else self.hard.with_y_tail(tail)
        return Conditioning(self.context, torch.cat([head, tail.to(head.device, head.dtype)], dim=-1), hard)

    def where(self, mask: torch.Tensor, other: "Conditioning") -> "Conditioning":
        """Per sample: ``other`` where ``mask`` [B] is true, else self (caption dropout)."""
        a, b = Conditioning.cat([self, other]).split(len(self))
        ctx = torch.where(mask.view(-1, 1, 1), b.context, a.context)
        y = None if a.y is None else torch.where(mask.view(-1, 1), b.y, a.y)
        return Conditioning(ctx, y, None if a.hard is None else a.hard.where(mask, b.hard))

    def split(self, n: int) -> tuple["Conditioning", "Conditioning"]:
        """The first ``n`` items and the rest."""
        return self._each(lambda t: t[:n]), self._each(lambda t: t[n:])

    @staticmethod
    def cat(items: Sequence["Conditioning"]) -> "Conditioning":
        """Stack per-item conditionings; contexts of 77*k tokens are repeated to a common length, as ComfyUI
        does when it batches prompts (attention over a sequence repeated n times equals attention over it once)."""
        length = math.lcm(*(c.context.shape[1] for c in items))
        ctx = torch.cat([c.context.repeat(1, length // c.context.shape[1], 1) for c in items])
        ys = [c.y for c in items]
        if any(y is None for y in ys) and not all(y is None for y in ys):
            raise ValueError("either every conditioning has a y vector or none has")
        hard = None
        if any(c.hard is not None for c in items):  # a prompt without a learned word is its own hard prompt
            hard = Conditioning.cat([c.plain() if c.hard is None else c.hard for c in items])
        return Conditioning(ctx, None if ys[0] is None else torch.cat(ys), hard)


@dataclass
class DiffusionTask:
    """``predict(x_t, t, cond)`` returns the raw model output (eps or v, per ``schedule.prediction``) for
    integer timesteps ``t``. ``checkpoint_blocks`` are the modules gradient checkpointing may wrap.
    ``frozen_modules`` are the host's networks: none of their parameters gets a gradient unless it is trained."""

    predict: Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]
    schedule: NoiseSchedule
    device: torch.device
    weight_dtype: torch.dtype = torch.float32
    checkpoint_blocks: Sequence[nn.Module] = field(default_factory=tuple)
    frozen_modules: Sequence[nn.Module] = field(default_factory=tuple)
