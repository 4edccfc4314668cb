"""The encoded training set a trainer loops over, and the seeded plan of which samples each step uses.

Images of one aspect-ratio bucket share a latent size and are batched together. Everything that does not
change during training (latents, mirrored latents, caption conditionings, class images) is encoded once;
the per-step choices (which images, mirrored or not, caption dropped or not) are drawn from seeded
generators, so a run is reproducible and the CUDA-graph path draws them on the device."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from .task import Conditioning

Encode = Callable[[Sequence[str], tuple[int, int]], Conditioning]  # captions, pixel size (SDXL) -> conditioning


class PromptEncoder(Protocol):
    prompts: list[str]

    def __call__(self, size: tuple[int, int]) -> Conditioning: ...


@dataclass
class LatentBucket:
    """One latent size. ``latents`` [n, C, h, w] with ``captions`` (one per row) at pixel ``size``; ``flipped``:
    the mirrored images' latents (same rows) or None; ``class_latents``: prior-preservation class images at
    this size. ``cond``/``empty_cond``/``class_cond`` are the cached conditionings of the captions, of "" and
    of the class prompt (filled by ``TrainingData.cache_conditioning`` when the text side does not train).
    ``micro``/``flipped_micro``/``class_micro``: SDXL's size/crop embeddings per row ([rows, A], the tail of y),
    or None where every row takes the bucket's own (original size = crop target, no crop)."""

    latents: torch.Tensor
    captions: list[str]
    size: tuple[int, int]
    flipped: torch.Tensor | None = None
    class_latents: torch.Tensor | None = None
    cond: Conditioning | None = None
    empty_cond: Conditioning | None = None
    class_cond: Conditioning | None = None
    micro: torch.Tensor | None = None
    flipped_micro: torch.Tensor | None = None
    class_micro: torch.Tensor | None = None

    def __post_init__(self):
        if len(self.captions) != self.latents.shape[0]:
            raise ValueError("one caption per latent row")

    def to(self, device: torch.device) -> "LatentBucket":
        """A copy on ``device`` made of normal tensors (ones made under ComfyUI's inference mode cannot take
        part in autograd)."""
        def move(t):
            return None if t is None else t.to(device, torch.float32).clone()

        def move_cond(c):
            return None if c is None else c.to(device).clone()

        return LatentBucket(move(self.latents), list(self.captions), self.size, move(self.flipped),
                            move(self.class_latents), move_cond(self.cond), move_cond(self.empty_cond),
                            move_cond(self.class_cond), move(self.micro), move(self.flipped_micro),
                            move(self.class_micro))


@dataclass
class TrainingData:
    """What ``trainer.train`` consumes. ``encode`` turns captions into conditioning; the trainer calls it every
    step (with gradients) unless ``cache_conditioning`` filled the buckets. ``prior``: None, "class_images"
    (class half from ``class_latents``) or "prior_prediction" (class half = the subject latents with the class
    prompt, target = the frozen model's prediction); ``prior_weight`` is DreamBooth's lambda."""

    buckets: list[LatentBucket]
    encode: Encode
    caption_dropout: float = 0.0
    prior: str | None = None
    prior_weight: float = 1.0
    class_prompt: str = ""
    # Optional: encodes every prompt of ``prompts()`` with device work only (rows in its ``prompts`` order), so a
    # step that trains the text side can be a CUDA graph. Used instead of ``encode`` while training when set.
    prompt_encoder: PromptEncoder | None = None

    def __post_init__(self):
        if self.prior not in (None, "class_images", "prior_prediction"):
            raise ValueError(f"unknown prior mode {self.prior!r}")
        if self.prior == "class_images" and any(b.class_latents is None for b in self.buckets):
            raise ValueError("prior 'class_images' needs class latents in every bucket")

    @classmethod
    def single(cls, latents: torch.Tensor, captions: Sequence[str], encode: Encode, **options) -> "TrainingData":
        """One bucket: every image at the latents' size (the VAE's 8x downscale)."""
        size = (latents.shape[-2] * 8, latents.shape[-1] * 8)
        return cls([LatentBucket(latents, list(captions), size)], encode, **options)

    @classmethod
    def encoded(cls, latents: torch.Tensor, cond: Conditioning) -> "TrainingData":
        """One bucket with its conditioning already encoded (benchmarks, headless use)."""
        def no_encoder(captions, size):
            raise RuntimeError("this training data was given pre-encoded conditioning only")

        data = cls.single(latents, [""] * latents.shape[0], no_encoder)
        data.buckets[0].cond = cond
        return data

    @torch.no_grad()
    def cache_conditioning(self) -> "TrainingData":
        """Encode every caption once (valid while the text side does not train)."""
        for b in self.buckets:
            b.cond = self.encode(b.captions, b.size)
            if self.caption_dropout > 0:
                b.empty_cond = self.encode([""], b.size)
            if self.prior:
                b.class_cond = self.encode([self.class_prompt], b.size)
        return self

    def prompts(self) -> list[str]:
        """Every distinct prompt a step may encode: the captions, "" for caption dropout, the class prompt."""
        prompts = [c for b in self.buckets for c in b.captions]
        prompts += ([""] if self.caption_dropout > 0 else []) + ([self.class_prompt] if self.prior else [])
        return list(dict.fromkeys(prompts))

    @property
    def cached(self) -> bool:
        return all(b.cond is not None for b in self.buckets)

    def __len__(self) -> int:
        return sum(b.latents.shape[0] for b in self.buckets)


class BucketBatchSampler:
    """Epochs of seeded permutations: each bucket's rows are shuffled and cut into batches, and the batches of
    all buckets are shuffled together (kohya's bucketed epochs), so every image is seen once per epoch. A
    bucket smaller than the batch is cycled to fill it."""

    def __init__(self, bucket_sizes: Sequence[int], batch_size: int, seed: int):
        self.sizes, self.batch_size = list(bucket_sizes), batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.queue: list[tuple[int, list[int]]] = []

    def _epoch(self) -> list[tuple[int, list[int]]]:
        batches = []
        for b, n in enumerate(self.sizes):
            order = torch.randperm(n, generator=self.generator).tolist()
            while len(order) % self.batch_size:
                order += order[: self.batch_size - len(order) % self.batch_size]
            batches += [(b, order[i:i + self.batch_size]) for i in range(0, len(order), self.batch_size)]
        shuffle = torch.randperm(len(batches), generator=self.generator).tolist()
        return [batches[i] for i in shuffle]

    def next(self) -> tuple[int, list[int]]:
        if not self.queue:
            self.queue = self._epoch()
        return self.queue.pop(0)


def class_plan(n_steps: int, batch_size: int, n_class: int, seed: int) -> torch.Tensor:
    """[n_steps, batch] class-image rows: seeded permutations, so every class image is used before any repeats."""
    g = torch.Generator().manual_seed(seed + 7919)
    rows, need = [], n_steps * batch_size
    while sum(len(r) for r in rows) < need:
        rows.append(torch.randperm(n_class, generator=g))
    return torch.cat(rows)[:need].view(n_steps, batch_size)
