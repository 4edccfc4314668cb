"""The on-disk cache of generated class images for prior preservation.

One folder per generation setting (model fingerprint, prompts, sampler settings...): ``00000.png``, ``00001.png``, ...
plus ``settings.json`` saying what made them. Images are written one by one, atomically, so a cancelled run keeps
every finished image and the next run only generates the missing ones."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch
from PIL import Image

from .files import write_atomic

SETTINGS_FILE = "settings.json"
# Values read from each tensor by tensor_fingerprint (evenly spaced over the flattened tensor).
SAMPLES_PER_TENSOR = 256


def cache_key(settings: Mapping[str, object]) -> str:
    """SHA-256 of the settings as canonical JSON: same settings, same key, whatever the dict order or process."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _sample_bytes(tensor: torch.Tensor) -> bytes:
    n = tensor.numel()
    if n == 0 or tensor.device.type == "meta":
        return b""
    index = torch.linspace(0, n - 1, min(n, SAMPLES_PER_TENSOR), dtype=torch.float64).round().long()
    try:
        sample = tensor.detach().reshape(-1)[index.to(tensor.device)].cpu()
    except RuntimeError:
        # A Parameter that ComfyUI moved between devices under inference mode can refuse views ("inference
        # tensors do not track version counter"); a full copy reads it (slower, so only as the fallback).
        sample = tensor.data.to("cpu", copy=True).reshape(-1)[index]
    try:
        return sample.numpy().tobytes()
    except TypeError:  # bfloat16 / float8 have no numpy dtype; float32 holds them exactly
        return sample.float().numpy().tobytes()


@torch.no_grad()
def tensor_fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A cheap fingerprint of a set of weights: each tensor's name, shape, dtype and 256 values evenly spaced
    over it. Hashing every byte of a 2-5 GB UNet takes seconds on each run (and a copy to the CPU when it sits
    on the GPU); this reads a few hundred KB. The trade-off: an edit confined to values between the sampled
    positions goes unnoticed. Whole-tensor changes (another checkpoint, a merged LoRA, a fine-tune) change
    practically every value, so the samples catch them."""
    h = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        h.update(_sample_bytes(tensor))
    return h.hexdigest()


def slugify(text: str, max_length: int = 48) -> str:
    """A folder-name-safe short form of a prompt: "a photo of a dog" -> "a_photo_of_a_dog"."""
    slug = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:max_length].rstrip("_")
    return slug or "class"


def image_to_pil(image: torch.Tensor) -> Image.Image:
    """Float RGB [H, W, 3] in 0..1 -> 8-bit PIL image (rounded, so a PNG round trip is within 0.5/255)."""
    if image.dim() != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {tuple(image.shape)}")
    array = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(array, "RGB")


class ClassImageCache:
    """The images generated for one cache key, in ``root/<slug of label>_<key[:16]>/``. 16 hex digits (64 bits)
    make an accidental clash between two settings negligible; ``settings.json`` keeps the full key."""

    def __init__(self, root: Path, key: str, label: str = ""):
        if not re.fullmatch(r"[0-9a-f]{16,}", key):
            raise ValueError(f"cache key must be a hex digest, got {key!r}")
        self.key = key
        self.folder = Path(root) / f"{slugify(label)}_{key[:16]}"

    def path(self, index: int) -> Path:
        return self.folder / f"{index:05d}.png"

    def existing(self) -> list[Path]:
        """The contiguous run 00000.png, 00001.png, ... already written (an image after a gap is not counted:
        generation resumes at the first missing index and overwrites it)."""
        found = []
        while self.path(len(found)).is_file():
            found.append(self.path(len(found)))
        return found

    def save(self, index: int, image: torch.Tensor) -> Path:
        path = self.path(index)
        pil = image_to_pil(image)
        write_atomic(path, lambda tmp: pil.save(tmp, format="PNG", compress_level=4), inputs=None)
        return path

    def load(self, count: int) -> list[torch.Tensor]:
        """The first ``count`` images as float RGB [H, W, 3] in 0..1."""
        paths = self.existing()
        if len(paths) < count:
            raise FileNotFoundError(f"{self.folder} holds {len(paths)} images, {count} requested")
        images = []
        for path in paths[:count]:
            with Image.open(path) as pil:
                array = np.asarray(pil.convert("RGB"), dtype=np.uint8)
            images.append(torch.from_numpy(array.copy()).float().div_(255))
        return images

    def write_settings(self, settings: Mapping[str, object]) -> Path:
        """``settings.json``: what generated these images, for people browsing the folder."""
        path = self.folder / SETTINGS_FILE
        text = json.dumps({"key": self.key, **settings}, indent=2, sort_keys=True, allow_nan=False)
        write_atomic(path, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"), inputs=None)
        return path

    def read_settings(self) -> dict | None:
        path = self.folder / SETTINGS_FILE
        if not path.is_file():
            return None
        return json.loads(path.read_text(encoding="utf-8"))
