"""The official ImageReward preprocessing, bit-for-bit, for ComfyUI IMAGE batches.

The official pipeline takes PIL images: ``Resize(224, BICUBIC)`` (short side), ``CenterCrop(224)``,
``.convert("RGB")``, ``ToTensor``, ``Normalize(CLIP mean/std)``. A ComfyUI IMAGE reaches it as the file
SaveImage writes, i.e. ``np.clip(255. * image, 0, 255).astype(np.uint8)`` (truncation, not rounding), as an
L/RGB/RGBA picture. This module does exactly that with PIL itself (same size arithmetic as torchvision, same
PIL calls), then ToTensor/Normalize batched in torch with the same element-wise operations.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from ..training.errors import InputError
from .model import IMAGE_SIZE

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def resized_size(width: int, height: int, size: int = IMAGE_SIZE) -> tuple[int, int]:
    """torchvision ``Resize(size)`` on a PIL image: short side -> size, long side truncated (not rounded)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def center_crop_box(width: int, height: int, size: int = IMAGE_SIZE) -> tuple[int, int, int, int]:
    """torchvision ``CenterCrop``: offsets use Python's round (ties to even)."""
    left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    return left, top, left + size, top + size


def to_uint8(image: np.ndarray, scratch: np.ndarray | None = None) -> np.ndarray:
    """What ComfyUI's SaveImage writes: ``np.clip(255. * image, 0, 255).astype(np.uint8)`` (float32 math,
    truncation). ``scratch``: a float32 buffer of the image's shape to reuse (fewer page faults)."""
    scratch = np.multiply(image, np.float32(255.0), out=scratch)
    np.clip(scratch, 0, 255, out=scratch)
    return scratch.astype(np.uint8)


def official_crop(pixels: np.ndarray) -> np.ndarray:
    """One uint8 [H,W,C] image through the official PIL steps -> uint8 [224,224,3]."""
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    size = resized_size(*image.size)
    if size != image.size:  # torchvision returns the image untouched at the target size
        image = image.resize(size, Image.BICUBIC)  # RGBA: PIL resizes with premultiplied alpha, as official
    image = image.crop(center_crop_box(*image.size)).convert("RGB")
    return np.asarray(image)


def image_notes(images: torch.Tensor) -> list[str]:
    """Checks the batch (InputError for bad shapes/channels/NaN) and says what the conversion will change."""
    _check(images)
    count, height, width, channels = images.shape
    which = "the image has" if count == 1 else f"the {count} images have"
    notes = []
    if channels == 4:
        notes.append(f"{which} an alpha channel: dropped, as the official pipeline's .convert('RGB') does "
                     "(PIL resizes RGBA with premultiplied alpha first, like the official)")
    if channels == 1:
        notes.append(f"{which} one channel: replicated to RGB (grayscale), as .convert('RGB') does")
    if min(height, width) < IMAGE_SIZE:
        notes.append(f"{which} {width}x{height} px, smaller than {IMAGE_SIZE} on the short side: upsampled "
                     "(bicubic) as the official pipeline does; scores of upscaled images are less reliable")
    return notes


def _check(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise InputError("images", "expected a ComfyUI IMAGE batch [batch, height, width, channels]")
    if images.shape[0] == 0:
        raise InputError("images", "the batch is empty")
    if images.shape[-1] not in _MODES:
        raise InputError("images", f"has {images.shape[-1]} channels; use 1 (gray), 3 (RGB) or 4 (RGBA) channels")
    if images.shape[1] == 0 or images.shape[2] == 0:
        raise InputError("images", f"has no pixels (size {images.shape[2]}x{images.shape[1]})")
    bad = (~torch.isfinite(images).flatten(1).all(1)).nonzero().flatten().tolist()  # no sum: fp16 overflows
    if bad:
        raise InputError("images", f"image {', '.join(map(str, bad[:10]))} contains NaN or infinite values")


def preprocess(images: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """ComfyUI IMAGE [B,H,W,C] (float 0..1, C = 1, 3 or 4) -> ([B,3,224,224] float32 CLIP-normalised, notes).

    The PIL part runs per image on CPU threads (PIL and NumPy release the GIL); the tensor part is batched."""
    notes = image_notes(images)
    images = images.detach().to("cpu", torch.float32)
    arrays = images.numpy()
    crops = np.empty((len(arrays), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    per_thread = threading.local()  # one float buffer per worker thread for this call

    def one(index: int) -> None:
        if not hasattr(per_thread, "scratch"):
            per_thread.scratch = np.empty(arrays.shape[1:], np.float32)
        crops[index] = official_crop(to_uint8(arrays[index], per_thread.scratch))

    workers = min(len(arrays), os.cpu_count() or 1, 16)
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(one, range(len(arrays))))
    else:
        for index in range(len(arrays)):
            one(index)
    pixels = torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous()
    # ToTensor then Normalize, the same element-wise ops in the same order (so the same float32 bits).
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return pixels.to(torch.float32).div(255).sub(mean).div(std), notes
