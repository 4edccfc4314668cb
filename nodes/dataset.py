"""Personalize Instance Dataset: the subject's images (an IMAGE batch and/or a folder) with finished captions,
as the one dataset every trainer takes."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Sequence

import folder_paths
import torch
from comfy_api.latest import io, ui

from ..training.buckets import assign_buckets
from ..training.data import expand_captions, prepare_images
from ..training.datasets import InstanceDataset
from ..training.errors import InputError
from ..training.image_folder import MIN_SIDE, load_image_folder, training_files
from .types import Dataset

log = logging.getLogger(__name__)

# placeholder -> the input that fills it
PLACEHOLDERS = {"{identifier}": "identifier", "{class}": "class_noun"}


def fill_placeholders(caption: str, identifier: str, class_noun: str) -> str:
    """Replace {identifier} and {class}; other braces are left alone (captions are not format strings)."""
    values = {"identifier": identifier.strip(), "class_noun": class_noun.strip()}
    for placeholder, input_name in PLACEHOLDERS.items():
        if placeholder in caption:
            if not values[input_name]:
                raise InputError(input_name, f"is empty but the caption {caption!r} uses {placeholder}; "
                                             f"fill {input_name} or remove {placeholder} from the caption")
            caption = caption.replace(placeholder, values[input_name])
    return " ".join(caption.split())


def _batch_to_images(images: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """IMAGE [N, H, W, C] -> N RGB [H, W, 3]; alpha composited on white, as folder images are. ``mask`` is Load
    Image's MASK (1 = transparent): Load Image drops a PNG's alpha from its IMAGE, leaving whatever colour the file
    stores under it (often black)."""
    if isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[-1] == 4:
        alpha = images[..., 3:]
        images = images[..., :3] * alpha + (1.0 - alpha)
    batch = prepare_images(images, "images", multiple=1)  # checks shape, channels, NaNs; grey -> RGB
    if mask is not None and bool(mask.any()):  # Load Image gives an all-zero 64x64 mask for a file without alpha
        mask = mask.reshape(-1, *mask.shape[-2:]).to(batch.dtype)
        if mask.shape[0] not in (1, batch.shape[0]) or mask.shape[1:] != batch.shape[1:3]:
            raise InputError("mask", f"is {mask.shape[0]}x{mask.shape[2]}x{mask.shape[1]} (count x width x "
                                     f"height), the images {batch.shape[0]}x{batch.shape[2]}x{batch.shape[1]}; "
                                     "connect the MASK that Load Image gives with these images")
        batch = batch * (1.0 - mask[..., None]) + mask[..., None]
    if min(batch.shape[1:3]) < MIN_SIDE:
        raise InputError("images", f"{batch.shape[2]}x{batch.shape[1]} is too small; use images of at least "
                                   f"{MIN_SIDE} px a side")
    # clone: own storage, not views that keep the upstream node's cached batch alive or let a trainer alter it.
    return [image.clone() for image in batch]


def resolve_folder(folder: str) -> Path:
    """A folder under ComfyUI's input directory, or an absolute path (a local tool reading the user's own files:
    allowed on purpose, read-only); a relative path may not climb out of the input directory."""
    if not folder.strip():
        raise InputError("folder", "is empty; give a folder of images (relative to ComfyUI's input folder, or an "
                                   "absolute path)")
    path = Path(folder.strip()).expanduser()
    if path.is_absolute():
        return path
    # lexical, so a folder the user linked into the input folder from another disk is still inside it
    root = Path(os.path.normpath(os.path.abspath(folder_paths.get_input_directory())))
    joined = Path(os.path.normpath(root / path))
    if joined != root and root not in joined.parents:
        raise InputError("folder", f"{folder!r} leaves the input folder {root}; give an absolute path instead")
    return joined


def folder_fingerprint(folder: str):
    """What ComfyUI compares to decide whether a folder input changed: the folder's files (name, time, size), so
    adding, replacing or re-captioning an image re-runs the node and what trains on it."""
    try:
        return training_files(os.fspath(resolve_folder(folder)))
    except (InputError, OSError):
        return float("nan")  # never equal to itself: run and report the problem


def identifier_note(captions: Sequence[str], identifier: str, input_name: str = "caption") -> str | None:
    """DreamBooth binds the subject to the identifier through the captions: none with it is an error (the model
    would learn the subject without a word for it); some without it is worth a note. Found as CLIP finds it: any
    case, bounded by anything but a letter ("SKS dog", "sks_dog", "sks2" all hold the token)."""
    identifier = identifier.strip()
    if not identifier:
        return None
    word = re.compile(rf"(?<![^\W\d_]){re.escape(identifier)}(?![^\W\d_])", re.IGNORECASE)
    missing = [i for i, caption in enumerate(captions) if not word.search(caption)]
    if len(missing) == len(captions):
        raise InputError(input_name, f"no caption contains the identifier {identifier!r} (first: {captions[0]!r}); "
                                     "write {identifier} in the caption template and in the .txt caption files, or "
                                     "clear identifier to train without one")
    if missing:
        return (f"note: {len(missing)} of {len(captions)} captions do not contain {identifier!r} (image "
                f"{', '.join(map(str, missing[:10]))}{', ...' if len(missing) > 10 else ''})")
    return None


def _summary(dataset: InstanceDataset) -> str:
    sizes = [tuple(image.shape[:2]) for image in dataset.images]
    buckets = assign_buckets(sizes, dataset.resolution, enabled=dataset.bucketing)
    listed = ", ".join(f"{w}x{h}: {len(indices)}" for (h, w), indices in buckets.items())
    return (f"{len(dataset)} images at resolution {dataset.resolution}\n"
            f"buckets (width x height: images): {listed}\n"
            f"first caption: {dataset.captions[0]}")


class PersonalizeInstanceDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PersonalizeInstanceDataset",
            display_name="Personalize Instance Dataset",
            category="personalize/training",
            description="The subject photos with their captions, for every Personalize trainer. Images may "
                        "differ in size: they are trained in aspect-ratio buckets of about resolution^2 pixels.",
            inputs=[
                io.Image.Input("images", optional=True, tooltip="A batch of subject photos."),
                io.String.Input("folder", default="",
                                tooltip="A folder of images (png, jpg, webp, bmp, tif, gif), each with an "
                                        "optional same-named UTF-8 .txt caption. Relative to ComfyUI's input "
                                        "folder, or absolute. Used after the batch when both are given."),
                io.String.Input("caption", multiline=True, default="a photo of {identifier} {class}",
                                tooltip="One line for all images or one line per image; a folder image's .txt "
                                        "file wins. {identifier} and {class} are filled from the inputs below."),
                io.String.Input("identifier", default="", tooltip="The rare token for the subject, e.g. sks."),
                io.String.Input("class_noun", default="", tooltip="The subject's class, e.g. dog."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=64,
                             tooltip="Training side length; buckets keep about resolution^2 pixels."),
                io.Boolean.Input("bucketing", default=True,
                                 tooltip="Keep each image's aspect ratio; off: centre-crop all to a square."),
                io.Boolean.Input("flip", default=False,
                                 tooltip="Also train on mirrored images; off for asymmetric subjects or text."),
                io.Float.Input("caption_dropout", default=0.0, min=0.0, max=0.9, step=0.05,
                               tooltip="Share of samples trained with an empty caption."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Load Image's MASK for the images: transparent parts become white, as in a "
                                      "folder (Load Image's IMAGE drops a PNG's transparency, leaving what the "
                                      "file stores under it, often black)."),
            ],
            outputs=[Dataset.Output(display_name="dataset")],
        )

    @classmethod
    def fingerprint_inputs(cls, folder="", **_kwargs):
        """A folder is read again when its files change (the inputs alone would keep the cached dataset)."""
        return folder_fingerprint(folder) if (folder or "").strip() else ""

    @classmethod
    def execute(cls, caption, identifier, class_noun, resolution, bucketing, flip, caption_dropout,
                images=None, folder="", mask=None) -> io.NodeOutput:
        folder = (folder or "").strip()
        if images is None and not folder:
            raise InputError("images", "nothing to train on; connect images or set folder to a folder of images")
        # ComfyUI runs nodes under inference_mode, and tensors made there can neither be saved for backward nor
        # changed in place later; trainers use these images outside inference mode, so make normal tensors.
        with torch.inference_mode(False):
            pictures = _batch_to_images(images, mask) if images is not None else []
            file_captions: list[str | None] = [None] * len(pictures)
            if folder:
                # the shorter side at most the resolution: no bucket's shorter side is larger
                for image, text in load_image_folder(resolve_folder(folder), "folder", max_short_side=resolution):
                    pictures.append(image)  # made here, outside inference mode: already a normal tensor
                    file_captions.append(text)
        if all(text is not None for text in file_captions):
            templates = file_captions  # every image has its own caption file: the template is not used
        else:
            templates = expand_captions(caption, len(pictures), "caption")
        captions = [fill_placeholders(own if own is not None else template, identifier, class_noun)
                    for own, template in zip(file_captions, templates)]
        dataset = InstanceDataset(images=tuple(pictures), captions=tuple(captions), resolution=resolution,
                                  bucketing=bucketing, flip=flip, caption_dropout=caption_dropout)
        note = identifier_note(captions, identifier, "caption" if templates is not file_captions else "identifier")
        if note:
            log.warning("instance dataset: %s", note)
        summary = _summary(dataset) + (f"\n{note}" if note else "")
        log.info("instance dataset: %s", summary.replace("\n", "; "))
        return io.NodeOutput(dataset, ui=ui.PreviewText(summary))


NODES = [PersonalizeInstanceDataset]
