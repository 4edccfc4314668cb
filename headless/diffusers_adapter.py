"""The core's host adapter for diffusers/transformers modules (tests, benchmarks, headless use).

Module paths of diffusers' UNet2DConditionModel are the names kohya uses for SD1.x/2.x LoRA files, and
transformers' CLIPTextModel paths are kohya's text-encoder names, so this adapter maps paths 1:1.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..training.lora import TEXT_ENCODER_TARGETS, UNET_TARGET_PRESETS, find_linear_targets
from ..training.schedule import NoiseSchedule
from ..training.task import Conditioning, DiffusionTask


def sd_schedule(prediction: str = "eps", steps: int = 1000) -> NoiseSchedule:
    """Stable Diffusion's "scaled linear" betas (0.00085 -> 0.012)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, steps, dtype=torch.float64) ** 2
    return NoiseSchedule(torch.cumprod(1.0 - betas, 0).float(), prediction)


def kohya_names(paths_to_modules: dict[str, nn.Linear], prefix: str) -> dict[str, nn.Linear]:
    return {f"{prefix}_{path.replace('.', '_')}": m for path, m in paths_to_modules.items()}


class DiffusersHost:
    def __init__(self, unet: nn.Module, text_encoder: nn.Module, tokenizer, vae: nn.Module,
                 prediction: str = "eps", device: str | torch.device = "cpu"):
        self.unet, self.text_encoder, self.tokenizer, self.vae = unet, text_encoder, tokenizer, vae
        self.device = torch.device(device)
        self.schedule = sd_schedule(prediction)
        self.latent_scale = float(getattr(getattr(vae, "config", None), "scaling_factor", 0.18215))

    def task(self) -> DiffusionTask:
        u = self.unet
        blocks: Sequence[nn.Module] = [*u.down_blocks, u.mid_block, *u.up_blocks]
        return DiffusionTask(self.predict, self.schedule, self.device, next(u.parameters()).dtype, blocks,
                             [u, self.text_encoder])

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.unet(x_t, t, encoder_hidden_states=cond.context).sample

    def unet_lora_targets(self, preset: str = "attention") -> dict[str, nn.Linear]:
        return kohya_names(find_linear_targets(self.unet, UNET_TARGET_PRESETS[preset]), "lora_unet")

    def text_encoder_lora_targets(self) -> dict[str, nn.Linear]:
        return kohya_names(find_linear_targets(self.text_encoder, TEXT_ENCODER_TARGETS), "lora_te")

    def encode_text(self, captions: Sequence[str]) -> Conditioning:
        ids = self.tokenizer(list(captions), padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        return Conditioning(self.text_encoder(ids).last_hidden_state)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[N, H, W, 3] in 0..1 (ComfyUI's IMAGE layout) -> scaled latents [N, 4, H/8, W/8]."""
        x = images.permute(0, 3, 1, 2).to(self.device) * 2 - 1
        return self.vae.encode(x).latent_dist.mean * self.latent_scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.vae.decode(latents / self.latent_scale).sample
        return ((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu()

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], size: tuple[int, int], steps: int = 20, cfg: float = 5.0,
               seed: int = 0) -> torch.Tensor:
        """Deterministic DDIM sampling with classifier-free guidance; returns [N, H, W, 3]."""
        from diffusers import DDIMScheduler

        sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              prediction_type="epsilon" if self.schedule.prediction == "eps" else "v_prediction",
                              clip_sample=False, set_alpha_to_one=False)
        sched.set_timesteps(steps)
        cond = self.encode_text(prompts).context
        uncond = self.encode_text([""] * len(prompts)).context
        g = torch.Generator().manual_seed(seed)
        x = torch.randn((len(prompts), 4, size[0] // 8, size[1] // 8), generator=g).to(self.device)
        for t in sched.timesteps:
            out = self.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            out_u, out_c = out.chunk(2)
            x = sched.step(out_u + cfg * (out_c - out_u), t, x).prev_sample
        return self.decode(x)
