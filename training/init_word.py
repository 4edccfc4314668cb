"""The init word picked from the images: of several candidate words, the one with which the model itself denoises
the subject images best, i.e. the word it already sees in them. This is the diffusion model used as a zero-shot
classifier (Li et al. 2023, "Your Diffusion Model is Secretly a Zero-Shot Classifier": the class whose prompt
gives the lowest denoising error), where DATE's trained encoder would predict the word; no weights beyond the
user's model are needed."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from .batches import LatentBucket
from .errors import InputError
from .schedule import NoiseSchedule
from .task import Conditioning

log = logging.getLogger(__name__)

# Timesteps per image: evenly spaced over the schedule, each with its own fixed noise, shared by every candidate
# (paired, so the candidates' errors differ by the word alone, not by the draw).
SAMPLES = 8


def candidate_words(init_word: str) -> list[str]:
    """'dog, cat, teddy bear' -> ['dog', 'cat', 'teddy bear']; one word -> [that word]."""
    words = [w.strip() for w in init_word.replace("\n", ",").split(",") if w.strip()]
    if not words:
        raise InputError("init_word", "is empty; give a word close to the subject (e.g. 'dog'), or several "
                                      "separated by commas to pick the one the model sees in the images")
    if len(set(words)) != len(words):
        raise InputError("init_word", f"names a word twice ({init_word!r}); list each candidate once")
    return words


def timesteps(n: int, num_timesteps: int) -> torch.Tensor:
    """``n`` timesteps at the centres of ``n`` equal parts of [0, num_timesteps)."""
    return ((torch.arange(n, dtype=torch.float64) + 0.5) * num_timesteps / n).long()


@torch.no_grad()
def denoising_errors(words: Sequence[str], buckets: Sequence[LatentBucket],
                     caption_with: Callable[[str, str], str],
                     encode: Callable[[list[str], tuple[int, int]], Conditioning],
                     predict: Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor],
                     schedule: NoiseSchedule, device: torch.device, seed: int, samples: int = SAMPLES,
                     chunk: int = 8, on_word: Callable[[], None] | None = None) -> dict[str, float]:
    """Mean squared error of the model's prediction (its own target: eps or v) over every image of ``buckets``
    at ``samples`` timesteps, with each caption's learned word written as the candidate
    (``caption_with(caption, word)``), ``chunk`` rows per model call. Lower is better. ``on_word``: called before
    each candidate (to cancel)."""
    generator = torch.Generator().manual_seed(seed)
    draws = []  # per bucket: (t, x_t, target, caption rows), the same for every candidate
    for bucket in buckets:
        n = bucket.latents.shape[0]
        x0 = bucket.latents.to(device, torch.float32).repeat_interleave(samples, 0)
        t = timesteps(samples, schedule.num_timesteps).repeat(n).to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        draws.append((t, schedule.add_noise(x0, noise, t), schedule.target(x0, noise, t),
                      torch.arange(n).repeat_interleave(samples)))
    errors = {}
    for word in words:
        if on_word is not None:
            on_word()
        total, count = 0.0, 0
        for bucket, (t, x_t, target, rows) in zip(buckets, draws):
            cond = encode([caption_with(c, word) for c in bucket.captions], bucket.size)
            cond = cond.with_y_tail(bucket.micro)  # SDXL: each image's own size/crop
            for i in range(0, len(rows), chunk):
                part = slice(i, i + chunk)
                pred = predict(x_t[part], t[part], cond.select(rows[part])).float()
                total += (pred - target[part]).square().mean(dim=(1, 2, 3)).sum().item()
            count += len(rows)
        errors[word] = total / count
    return errors


def pick_init_word(words: Sequence[str], errors: dict[str, float]) -> str:
    """The candidate with the lowest error (the first listed on a tie); the ranking is logged."""
    ranked = sorted(words, key=lambda w: (errors[w], words.index(w)))
    log.info("init_word: the model denoises the images best with %r (%s)", ranked[0],
             ", ".join(f"{w} {errors[w]:.4f}" for w in ranked))
    return ranked[0]
