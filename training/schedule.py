"""The discrete DDPM noise schedule and the training targets of each parameterisation."""
from __future__ import annotations

from dataclasses import dataclass

import torch

PREDICTIONS = ("eps", "v")


@dataclass(frozen=True)
class NoiseSchedule:
    """``alphas_cumprod[t]`` for t in [0, T); ``prediction`` is what the model outputs ("eps" or "v")."""

    alphas_cumprod: torch.Tensor
    prediction: str = "eps"

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")

    @classmethod
    def from_sigmas(cls, sigmas: torch.Tensor, prediction: str) -> "NoiseSchedule":
        """ComfyUI stores sigma_t = sqrt((1 - abar_t) / abar_t); invert it."""
        sigmas = sigmas.double()
        return cls((1.0 / (1.0 + sigmas**2)).float(), prediction)

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def _coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self.alphas_cumprod.to(like.device)[t].float()
        shape = (-1,) + (1,) * (like.dim() - 1)
        return abar.sqrt().view(shape), (1.0 - abar).sqrt().view(shape)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        a, s = self._coefficients(t, x0)
        return a * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model should output: eps, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0."""
        if self.prediction == "eps":
            return noise
        a, s = self._coefficients(t, x0)
        return a * noise - s * x0
