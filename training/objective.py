"""The pieces of the training objective that trainers choose between: loss weighting over timesteps, offset
noise, the timestep range, DreamBooth's prior-preservation sum, and the learning-rate schedule.

Everything is written in torch ops on device tensors, so a step that uses them can be replayed as a CUDA graph
(no value comes back to the host)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import InputError

LR_SCHEDULES = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class Objective:
    """``min_snr_gamma`` > 0 weights each sample by min(SNR, gamma) / SNR (eps) or / (SNR + 1) (v), Hang et al.
    2023, "5 is recommended"; ``noise_offset`` adds offset * N(0, 1) per sample and channel (Guttenberg 2023,
    "around 0.1"); timesteps are drawn uniformly from [timestep_min, timestep_max]."""

    min_snr_gamma: float = 0.0
    noise_offset: float = 0.0
    timestep_min: int = 0
    timestep_max: int = 999

    def validate(self, num_timesteps: int = 1000) -> None:
        if not self.min_snr_gamma >= 0:  # NaN too: it made the loss NaN
            raise InputError("min_snr_gamma", f"must be 0 (off) or positive, got {self.min_snr_gamma}")
        if not 0 <= self.noise_offset <= 1:
            raise InputError("noise_offset", f"must be in [0, 1], got {self.noise_offset}")
        if not 0 <= self.timestep_min <= self.timestep_max < num_timesteps:
            raise InputError("timestep_range", f"needs 0 <= min <= max < {num_timesteps}, got "
                                               f"{self.timestep_min}..{self.timestep_max}")

    def timesteps(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        return torch.randint(self.timestep_min, self.timestep_max + 1, (n,), generator=generator, device=device)

    def noise(self, shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        noise = torch.randn(shape, generator=generator, device=device)
        if self.noise_offset > 0:
            offset = torch.randn((shape[0], shape[1], 1, 1), generator=generator, device=device)
            noise = noise + self.noise_offset * offset
        return noise

    def sample_weights(self, alphas_cumprod_t: torch.Tensor, prediction: str) -> torch.Tensor:
        """Per-sample loss weight at each sample's timestep (ones when min-SNR is off)."""
        if self.min_snr_gamma <= 0:
            return torch.ones_like(alphas_cumprod_t)
        snr = alphas_cumprod_t / (1.0 - alphas_cumprod_t)
        clipped = snr.clamp(max=self.min_snr_gamma)
        return clipped / (snr + 1.0) if prediction == "v" else clipped / snr


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).square().mean(dim=tuple(range(1, pred.dim())))


def prior_preservation_loss(per_sample: torch.Tensor, weights: torch.Tensor, n_instance: int,
                            prior_weight: float) -> torch.Tensor:
    """mean(w * instance loss) + lambda * mean(w * class loss): the batch holds the subject samples first and the
    class samples after them. Both terms carry their samples' weights (min-SNR), as in DreamBooth's Eq. 2, where
    both share w_t, and in kohya's trainer; diffusers leaves the class term unweighted, which with min-SNR on a
    v-prediction model makes lambda = 1 act as about 3.4 (the instance weights average ~0.3)."""
    loss = (per_sample[:n_instance] * weights[:n_instance]).mean()
    if per_sample.shape[0] > n_instance:
        loss = loss + prior_weight * (per_sample[n_instance:] * weights[n_instance:]).mean()
    return loss


def lr_factor(step: torch.Tensor, total_steps: int, schedule: str, warmup_steps: int) -> torch.Tensor:
    """The learning-rate multiplier for 0-based ``step`` (a tensor, so it can live on the device): linear
    warm-up over ``warmup_steps``, then constant, cosine to 0 or linear to 0 over the remaining steps."""
    if schedule not in LR_SCHEDULES:
        raise InputError("lr_schedule", f"must be one of {LR_SCHEDULES}, got {schedule!r}")
    s = step.float()
    warm = ((s + 1) / warmup_steps).clamp(max=1.0) if warmup_steps > 0 else torch.ones_like(s)
    progress = ((s - warmup_steps) / max(total_steps - warmup_steps, 1)).clamp(0.0, 1.0)
    if schedule == "cosine":
        decay = 0.5 * (1.0 + torch.cos(math.pi * progress))
    elif schedule == "linear":
        decay = 1.0 - progress
    else:
        decay = torch.ones_like(s)
    return warm * decay
