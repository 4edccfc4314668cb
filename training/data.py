"""Checking and shaping what users feed a trainer: image batches and captions."""
from __future__ import annotations

import torch

from .errors import InputError

MIN_SIDE = 32


def prepare_images(images: torch.Tensor, input_name: str = "images", multiple: int = 8) -> torch.Tensor:
    """ComfyUI IMAGE [N, H, W, C] in 0..1 -> [N, H', W', 3]: grey to RGB, alpha dropped, centre-cropped to a
    multiple of ``multiple`` (the VAE's downscale)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise InputError(input_name, "expected an IMAGE batch [N, H, W, C]; connect a Load Image node")
    n, h, w, c = images.shape
    if n == 0:
        raise InputError(input_name, "the batch is empty; connect at least one image")
    if c not in (1, 3, 4):
        raise InputError(input_name, f"{c} channels; expected 1 (grey), 3 (RGB) or 4 (RGBA)")
    if min(h, w) < MIN_SIDE:
        raise InputError(input_name, f"{w}x{h} is too small; use images of at least {MIN_SIDE} px a side")
    if not torch.isfinite(images).all():
        raise InputError(input_name, "contains NaN or infinite pixels")
    images = images[..., :3] if c == 4 else images.expand(-1, -1, -1, 3) if c == 1 else images
    h2, w2 = h - h % multiple, w - w % multiple
    top, left = (h - h2) // 2, (w - w2) // 2
    return images[:, top:top + h2, left:left + w2, :].float()


def expand_captions(text: str, count: int, input_name: str = "caption") -> list[str]:
    """One line for every image, or a single line for all of them."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines:
        raise InputError(input_name, "is empty; write one caption for all images or one line per image")
    if len(lines) == 1:
        return lines * count
    if len(lines) != count:
        raise InputError(input_name, f"has {len(lines)} lines for {count} images; "
                                     "give one line per image, or a single line for all")
    return lines
