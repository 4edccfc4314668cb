"""Kohya-style aspect-ratio buckets: each image trains at the multiple-of-``step`` size whose aspect ratio is
closest to its own, with about ``resolution``**2 pixels, instead of being squashed or cropped to a square."""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F

from .errors import InputError

# Kohya's defaults at 512 (min_bucket_reso 256, max_bucket_reso 1024): no side beyond twice the resolution, so a
# panorama does not become a 64-px-high strip the model learns nothing from.
MAX_SIDE_FACTOR = 2
UPSCALE_WARNING = 2.0  # build_training_data warns once per image set from this scale on


@lru_cache(maxsize=32)
def _candidate_buckets(resolution: int, step: int) -> tuple[tuple[int, int], ...]:
    """Every (height, width): width a multiple of ``step``, height the largest multiple of ``step`` within the
    area ``resolution``**2, both sides at most MAX_SIDE_FACTOR * resolution."""
    if step <= 0 or resolution < step or resolution % step:
        raise InputError("resolution", f"must be a positive multiple of {step}, got {resolution}")
    max_side, area = MAX_SIDE_FACTOR * resolution, resolution * resolution
    buckets = []
    for width in range(step, max_side + 1, step):
        height = min(max_side, area // width // step * step)
        if height >= step:
            buckets.append((height, width))
    return tuple(buckets)


def bucket_size(height: int, width: int, resolution: int, step: int = 64) -> tuple[int, int]:
    """The (height, width) bucket for an image of ``height`` x ``width``: both multiples of ``step``, area at most
    ``resolution``**2, aspect ratio closest (in log space, so 2:1 and 1:2 are equally far from 1:1) to the
    image's; ties go to the larger area. A square image gives (resolution, resolution)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    target = math.log(width / height)

    def distance(bucket: tuple[int, int]) -> tuple[float, int]:
        h, w = bucket
        return abs(math.log(w / h) - target), -h * w

    return min(_candidate_buckets(resolution, step), key=distance)


def assign_buckets(sizes: Sequence[tuple[int, int]], resolution: int, step: int = 64,
                   enabled: bool = True) -> dict[tuple[int, int], list[int]]:
    """Image indices per bucket (height, width), buckets in sorted order and indices ascending, so the same
    dataset always batches the same way. ``enabled=False`` puts every image into (resolution, resolution)."""
    if not enabled:
        _candidate_buckets(resolution, step)  # same resolution check as the enabled path
        return {(resolution, resolution): list(range(len(sizes)))} if sizes else {}
    groups: dict[tuple[int, int], list[int]] = {}
    for index, (height, width) in enumerate(sizes):
        groups.setdefault(bucket_size(height, width, resolution, step), []).append(index)
    return {bucket: groups[bucket] for bucket in sorted(groups)}


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Float RGB [H, W, 3] -> [h, w, 3], bicubic with antialiasing (downscaling averages, no aliasing)."""
    channels_first = image.permute(2, 0, 1).unsqueeze(0).float()
    resized = F.interpolate(channels_first, size=size, mode="bicubic", antialias=True, align_corners=False)
    return resized.squeeze(0).permute(1, 2, 0).clamp(0.0, 1.0)  # bicubic overshoots at hard edges


def shrunk_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(height, width) with the shorter side scaled down to ``short_side`` (aspect kept), or as it is when it is
    not longer: the size an image larger than training needs is kept at."""
    if min(height, width) <= short_side:
        return height, width
    scale = short_side / min(height, width)
    return max(short_side, round(height * scale)), max(short_side, round(width * scale))


def placement(height: int, width: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Where ``fit_image`` puts a [height, width] image in ``size``: (scaled height, scaled width, crop top, crop
    left), the crop in the scaled image's pixels (SDXL's crop conditioning is in these)."""
    target_h, target_w = size
    if (height, width) == (target_h, target_w):
        return height, width, 0, 0
    scale = max(target_h / height, target_w / width)
    # max() guards rounding down below the target on the side that should match it exactly.
    new_h, new_w = max(target_h, round(height * scale)), max(target_w, round(width * scale))
    return new_h, new_w, (new_h - target_h) // 2, (new_w - target_w) // 2


def fit_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Float RGB [H, W, 3] -> [h, w, 3]: scaled (antialiased) so it covers ``size`` with its aspect ratio kept,
    then centre-cropped. Returns ``image`` itself when it already has that size."""
    target_h, target_w = size
    height, width = image.shape[:2]
    if (height, width) == (target_h, target_w):
        return image
    new_h, new_w, top, left = placement(height, width, size)
    if (new_h, new_w) != (height, width):
        image = resize_image(image, (new_h, new_w))
    return image[top:top + target_h, left:left + target_w, :].contiguous()
