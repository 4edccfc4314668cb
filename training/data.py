"""Checking and shaping what users feed a trainer: image batches, captions, and the encoded training set."""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

from .batches import Encode, LatentBucket, TrainingData
from .buckets import UPSCALE_WARNING, assign_buckets, fit_image, placement, shrunk_size
from .datasets import InstanceDataset, PriorPreservation
from .errors import InputError

MIN_SIDE = 32
log = logging.getLogger(__name__)


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


# SDXL's size/crop part of y for each image: [(original h, original w, crop top, crop left)], bucket size -> [n, A]
MicroConditioning = Callable[[Sequence[tuple[int, int, int, int]], tuple[int, int]], torch.Tensor]


def _warn_upscaled(images: Sequence[torch.Tensor], size: tuple[int, int], what: str, advice: str) -> None:
    scales = [max(size[0] / im.shape[0], size[1] / im.shape[1]) for im in images]
    upscaled = [s for s in scales if s >= UPSCALE_WARNING]
    if upscaled:
        log.warning("%d %s upscaled up to %.1fx to fill a %dx%d bucket: they train blurry; %s", len(upscaled), what,
                    max(upscaled), size[1], size[0], advice)


def build_training_data(dataset: InstanceDataset, prior: PriorPreservation | None,
                        encode_images: Callable[[torch.Tensor], torch.Tensor], encode: Encode,
                        chunk: int = 8, micro_conditioning: MicroConditioning | None = None) -> TrainingData:
    """Bucket the subject images by aspect ratio, fit each to its bucket and encode it once (mirrored too when
    ``dataset.flip``); class images are fitted and encoded at every bucket size, so a class batch always
    matches the subject batch it is trained with. ``micro_conditioning`` (SDXL): each row's size/crop
    embeddings, as diffusers' and SGM's SDXL training give them: the image's original size and its crop offset in
    the scaled image (mirrored for the flipped rows). An image larger than the training needs counts at the size
    the folder loader keeps (shorter side = ``dataset.resolution``), so a photo reads the same from a folder or
    from an IMAGE batch."""
    def encode_all(images: list[torch.Tensor], size: tuple[int, int], mirror: bool = False) -> torch.Tensor:
        out = []
        for i in range(0, len(images), chunk):
            pixels = torch.stack([fit_image(im, size) for im in images[i:i + chunk]])
            out.append(encode_images(pixels.flip(2) if mirror else pixels))
        return torch.cat(out)

    def micro(images: list[torch.Tensor], size: tuple[int, int], mirror: bool = False) -> torch.Tensor | None:
        if micro_conditioning is None:
            return None
        rows = []
        for im in images:
            height, width = im.shape[:2]
            _, new_w, top, left = placement(height, width, size)
            original = shrunk_size(height, width, dataset.resolution)  # as the folder loader keeps it
            rows.append((*original, top, new_w - left - size[1] if mirror else left))
        return micro_conditioning(rows, size)

    groups = assign_buckets([tuple(im.shape[:2]) for im in dataset.images], dataset.resolution,
                            enabled=dataset.bucketing)
    class_sets = None
    if prior is not None and prior.mode == "class_images":
        class_sets = prior.for_buckets(list(groups))
        if prior.by_bucket and any(class_sets[size] is prior.images for size in groups):
            log.warning("the class images were made for other subject buckets (%s) than this dataset's (%s); each is "
                        "fitted to every bucket: connect this dataset to the Prior-Preservation Dataset",
                        ", ".join(f"{w}x{h}" for (h, w), _ in prior.by_bucket),
                        ", ".join(f"{w}x{h}" for h, w in groups))
    buckets = []
    for size, ids in groups.items():
        class_images = list(class_sets[size]) if class_sets else None
        images = [dataset.images[i] for i in ids]
        _warn_upscaled(images, size, "subject images", "use larger photos or a lower resolution")
        if class_images:
            _warn_upscaled(class_images, size, "class images", "make them at the training resolution (the "
                                                              "Prior-Preservation Dataset's width/height)")
        buckets.append(LatentBucket(
            encode_all(images, size), [dataset.captions[i] for i in ids], size,
            flipped=encode_all(images, size, mirror=True) if dataset.flip else None,
            class_latents=encode_all(class_images, size) if class_images else None,
            micro=micro(images, size), flipped_micro=micro(images, size, mirror=True) if dataset.flip else None,
            class_micro=micro(class_images, size) if class_images else None))
    return TrainingData(buckets, encode, dataset.caption_dropout, prior.mode if prior else None,
                        prior.weight if prior else 1.0, prior.class_prompt if prior else "")
