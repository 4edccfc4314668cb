"""Reading a folder of training images, each with an optional same-named .txt caption (kohya's layout)."""
from __future__ import annotations

import logging
import os

import numpy as np
import torch
from PIL import Image, ImageOps

from .buckets import resize_image, shrunk_size
from .errors import InputError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# Photos in formats Pillow cannot read without plugins: named in a warning instead of skipped unseen
UNREAD_PHOTO_EXTENSIONS = (".heic", ".heif", ".avif", ".jxl", ".psd", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf")
MIN_SIDE = 64
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> float32 RGB [H, W, 3] in 0..1. Transparent pixels are composited on white: the colour a
    file stores under alpha 0 is arbitrary (often black) and would otherwise be learned as part of the subject."""
    if image.mode == "F":  # floating point (TIFF): its range is the file's own; convert("RGB") made it black
        raise ValueError("a floating-point image; save it as an 8- or 16-bit PNG, JPEG or TIFF")
    if image.mode in _SIXTEEN_BIT_MODES:  # 16-bit grey: convert("RGB") would clip it to 8 bits at 255
        grey = np.asarray(image, dtype=np.float32) / 65535.0
        return np.repeat(np.clip(grey, 0.0, 1.0)[..., None], 3, axis=-1)
    if image.mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in image.info:  # (has_transparency_data,
        # which Pillow < 10.1 lacks)
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def _read_image(path: str, input_name: str, max_short_side: int | None) -> torch.Tensor:
    name = os.path.basename(path)
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)  # phones store portrait photos sideways plus a rotation tag
            array = _to_rgb_array(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise InputError(input_name, f"cannot read {name}: {err}; replace or remove that file") from err
    height, width = array.shape[:2]
    if min(height, width) < MIN_SIDE:
        raise InputError(input_name, f"{name} is {width}x{height} px; use images of at least {MIN_SIDE} px a side")
    image = torch.from_numpy(np.ascontiguousarray(array))
    if max_short_side and min(height, width) > max_short_side:
        # kept whole, a 12 MP phone photo is 140 MB of float32; training crops it to its bucket anyway
        image = resize_image(image, shrunk_size(height, width, max_short_side)).contiguous()
    return image


def caption_path_of(image_path: str) -> str:
    """An image's caption file: ``<stem>.txt`` beside it."""
    return os.path.splitext(image_path)[0] + ".txt"


def _read_caption(image_path: str, input_name: str) -> str | None:
    """The text of ``<stem>.txt`` next to the image, whitespace (newlines too) collapsed to single spaces;
    None when there is no such file or it is blank, so the node's caption template applies. UTF-8 (with or without
    a byte-order mark) or UTF-16 with its mark (Windows Notepad's "Unicode"); anything else is refused: read as
    UTF-8 it trained on replacement characters."""
    caption_path = caption_path_of(image_path)
    if not os.path.isfile(caption_path):
        return None
    with open(caption_path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-16") if raw.startswith((b"\xff\xfe", b"\xfe\xff")) else raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(input_name, f"{os.path.basename(caption_path)} is not UTF-8 text ({err.reason}); save it "
                                     "as UTF-8") from err
    text = " ".join(text.split())
    return text or None


def image_names(folder: str) -> list[str]:
    """The images ``load_image_folder`` reads: files directly in ``folder`` with an image extension, not hidden
    (macOS copies carry ._name metadata files), sorted by name."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_file()
                  and entry.name.lower().endswith(IMAGE_EXTENSIONS) and not entry.name.startswith("."))


def training_files(folder: str) -> list[tuple[str, int, int]]:
    """(name, mtime in ns, size) of every file a load reads (the images and their caption files): what changes
    what is trained, and nothing else (a .DS_Store or a notes file does not)."""
    files = []
    for name in image_names(folder):
        image_path = os.path.join(folder, name)
        for path in (image_path, caption_path_of(image_path)):
            if os.path.isfile(path):
                stat = os.stat(path)
                files.append((os.path.basename(path), stat.st_mtime_ns, stat.st_size))
    return files


def load_image_folder(path, input_name: str = "folder", max_short_side: int | None = None
                      ) -> list[tuple[torch.Tensor, str | None]]:
    """Every image directly in ``path`` (not sub-folders, not hidden files such as macOS's ``._*``), sorted by file
    name, as (float RGB [H, W, 3] in 0..1, caption from the same-named .txt file or None); an image whose shorter
    side exceeds ``max_short_side`` is scaled down to it (antialiased). Raises InputError naming ``input_name``
    when the folder is missing or has no images, or an image is unreadable or smaller than 64 px a side."""
    folder = os.fspath(path)
    if not os.path.exists(folder):
        raise InputError(input_name, f"{folder} does not exist; give a folder of images")
    if not os.path.isdir(folder):
        raise InputError(input_name, f"{folder} is not a folder; give the folder that holds the images")
    names = image_names(folder)
    if not names:
        raise InputError(input_name, f"{folder} has no images; put {', '.join(IMAGE_EXTENSIONS)} files "
                                     "directly in it (sub-folders are not read)")
    unread = sorted(entry.name for entry in os.scandir(folder)
                    if entry.name.lower().endswith(UNREAD_PHOTO_EXTENSIONS) and not entry.name.startswith("."))
    if unread:
        log.warning("%s: %d images in a format that cannot be read are left out (%s); convert them to PNG or JPEG",
                    folder, len(unread), ", ".join(unread[:5]) + (", ..." if len(unread) > 5 else ""))
    items = []
    for name in names:
        image_path = os.path.join(folder, name)
        items.append((_read_image(image_path, input_name, max_short_side), _read_caption(image_path, input_name)))
    log.info("loaded %d images from %s (%d with caption files)", len(items), folder,
             sum(caption is not None for _, caption in items))
    return items
