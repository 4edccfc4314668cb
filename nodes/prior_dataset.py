"""Personalize Prior-Preservation Dataset: the class images for DreamBooth's prior-preservation loss, generated
with the connected model exactly as KSampler would make them and cached on disk; or a folder of the user's
class images; or no images at all (the frozen model's own prediction is the class target)."""
from __future__ import annotations

import inspect
import logging
import math
from pathlib import Path

import comfy.k_diffusion.sampling as k_diffusion_sampling
import comfy.model_management as mm
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import torch
import torch.nn.functional as F
from comfy_api.latest import io, ui

from ..training.buckets import assign_buckets
from ..training.datasets import InstanceDataset, PriorPreservation
from ..training.errors import InputError
from ..training.identifier import class_prompt as default_class_prompt
from ..training.image_folder import load_image_folder
from ..training.prior_cache import ClassImageCache, cache_key, image_to_pil, tensor_fingerprint
from .comfy_adapter import native_resolution
from .dataset import folder_fingerprint, resolve_folder
from .prior_fingerprint import model_fingerprints
from .types import Dataset, Prior

log = logging.getLogger(__name__)

MODES = ("generate", "folder", "prior_prediction")
CACHE_FOLDER = "personalize_class_images"
CACHE_FORMAT = 1  # bump when the generation path changes, so old caches are not reused
PREVIEW_COUNT = 4
PREVIEW_SIZE = 512
# Samplers that do not draw from the noise_sampler/seed themselves, outside k-diffusion's sample_* functions.
_NOISE_FREE_SAMPLERS = ("ddim", "uni_pc", "uni_pc_bh2")


def resolve_prompt(class_noun: str, class_prompt: str) -> str:
    """The written prompt, else the Identifier node's class prompt ("an" before a vowel), so the two agree."""
    if class_prompt.strip():
        return class_prompt.strip()
    if not class_noun.strip():
        raise InputError("class_noun", "is empty; name the class of your subject (e.g. 'dog', 'man', 'car') "
                                       "or write a class_prompt")
    return default_class_prompt(class_noun)


def batchable(sampler_name: str) -> bool:
    """True when each image depends only on its own initial noise, so images can be sampled in batches and
    image i is still what KSampler makes with seed + i. Ancestral/SDE samplers draw extra noise for the whole
    batch from one seed, and dpm_adaptive's step-size control looks at the whole batch: those run one image
    at a time. An unknown (custom) sampler counts as stochastic."""
    if sampler_name in _NOISE_FREE_SAMPLERS:
        return True
    function = getattr(k_diffusion_sampling, f"sample_{sampler_name}", None)
    return function is not None and "noise_sampler" not in inspect.signature(function).parameters


# ---- generation: the same calls as CLIPTextEncode -> EmptyLatentImage -> KSampler -> VAEDecode

class _ImageProgress:
    """One bar over all images in sampling-step units (so it moves during a batch), with the newest image as
    preview. In the server the bar's hook also raises on Cancel, so Cancel stops within a batch."""

    def __init__(self, total_images: int, done: int, steps: int, node_id: str | None):
        self.steps = steps
        self.bar = comfy.utils.ProgressBar(total_images * steps, node_id=node_id)
        self.bar.update_absolute(done * steps)

    def step_callback(self, done: int, batch: int):
        def callback(step, _x0, _x, total_steps):
            self.bar.update_absolute(done * self.steps + round(batch * self.steps * (step + 1) / total_steps))
        return callback

    def images_done(self, done: int, newest: torch.Tensor) -> None:
        self.bar.update_absolute(done * self.steps, preview=("JPEG", image_to_pil(newest), PREVIEW_SIZE))


def encode_prompt(clip, text: str):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))  # CLIPTextEncode.encode


def _conditioning_tensors(**conditionings) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for every context and pooled output of CONDITIONING lists, for a fingerprint."""
    return [(f"{kind}.{i}.{part}", tensor) for kind, conditioning in conditionings.items()
            for i, (context, extra) in enumerate(conditioning)
            for part, tensor in (("context", context), ("pooled", extra.get("pooled_output")))
            if torch.is_tensor(tensor)]


def sample_images(model, vae, positive, negative, first: int, count: int, s: dict, callback=None) -> torch.Tensor:
    """Images first .. first+count-1; image i from KSampler's noise for seed + i (batch of one)."""
    h, w = s["height"] // 8, s["width"] // 8
    one = comfy.sample.fix_empty_latent_channels(model, torch.zeros([1, 4, h, w], device=mm.intermediate_device()))
    noise = torch.cat([comfy.sample.prepare_noise(one, s["seed"] + i) for i in range(first, first + count)])
    latent = one.repeat(count, *([1] * (one.dim() - 1)))
    samples = comfy.sample.sample(model, noise, s["steps"], s["cfg"], s["sampler_name"], s["scheduler"], positive,
                                  negative, latent, denoise=1.0, callback=callback,
                                  disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=s["seed"] + first)
    images = vae.decode(samples)
    if images.dim() == 5:  # VAEDecode combines video-style batches
        images = images.reshape(-1, *images.shape[-3:])
    return images


def generate_class_images(model, clip, vae, prompt: str, negative_prompt: str, settings: dict, count: int,
                          batch_size: int, node_id: str | None) -> tuple[list[torch.Tensor], str]:
    fingerprints = model_fingerprints(model, clip, vae)
    # the prompts as encoded: an embedding:NAME file retrained under the same name changes them, not the text
    positive, negative = encode_prompt(clip, prompt), encode_prompt(clip, negative_prompt)
    fingerprints["conditioning"] = tensor_fingerprint(_conditioning_tensors(positive=positive, negative=negative))
    key = cache_key({"format": CACHE_FORMAT, **fingerprints, "prompt": prompt,
                     "negative_prompt": negative_prompt, **settings})
    cache = ClassImageCache(Path(folder_paths.get_output_directory()) / CACHE_FOLDER, key, label=prompt)
    cached = len(cache.existing())
    to_make = max(0, count - cached)
    if to_make:
        cache.write_settings({"prompt": prompt, "negative_prompt": negative_prompt, **settings,
                              "fingerprints": fingerprints})
        step = batch_size if batchable(settings["sampler_name"]) else 1
        progress = _ImageProgress(count, cached, settings["steps"], node_id)
        done = cached
        while done < count:
            mm.throw_exception_if_processing_interrupted()  # Cancel: finished images stay on disk for next run
            n = min(step, count - done)
            images = sample_images(model, vae, positive, negative, done, n, settings,
                                   progress.step_callback(done, n))
            for j in range(n):
                cache.save(done + j, images[j])
            done += n
            progress.images_done(done, images[-1])
    message = (f"generated {to_make}, loaded {min(cached, count)} from cache at {cache.folder}"
               if cached else f"generated {to_make} class images in {cache.folder}")
    log.info("class images for %r: %s", prompt, message)
    return cache.load(count), message


# ---- the node

def preview_batch(images: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Up to PREVIEW_COUNT images as one IMAGE batch at the first image's size; another shape is fitted inside it
    at its own aspect ratio, on black."""
    if not images:
        return torch.zeros(1, 64, 64, 3)
    h, w = images[0].shape[:2]
    out = []
    for img in images[:PREVIEW_COUNT]:
        if img.shape[:2] != (h, w):
            scale = min(h / img.shape[0], w / img.shape[1])
            fh, fw = max(1, round(img.shape[0] * scale)), max(1, round(img.shape[1] * scale))
            small = F.interpolate(img.movedim(-1, 0)[None], size=(fh, fw), mode="bilinear", antialias=True)[0]
            top, left = (h - fh) // 2, (w - fw) // 2
            canvas = img.new_zeros(h, w, 3)  # black around it
            canvas[top:top + fh, left:left + fw] = small.movedim(0, -1)
            img = canvas
        out.append(img)
    return torch.stack(out).clamp(0, 1)


def round_robin(sets: list[tuple]) -> list[torch.Tensor]:
    """The images of several buckets interleaved, so a preview of the first few shows every bucket."""
    longest = max((len(images) for _, images in sets), default=0)
    return [images[i] for i in range(longest) for _, images in sets if i < len(images)]


def bucket_seed(seed: int, size: tuple[int, int]) -> int:
    """The first seed of a bucket's class images: the node's seed for a square bucket (what generating without a
    dataset at that size makes, so that cache is shared), else an offset fixed by the size alone. A count or
    another bucket changing does not move it, so a rerun finds what is cached."""
    h, w = size
    return seed if h == w else (seed + ((h // 8) * 1024 + w // 8) * 10_000) % 2**63


SAMPLING_TOOLTIP = "generate mode: as KSampler's; the class images should look like what the model makes."
SIZE_TOOLTIP = ("generate mode. 0: the model's native size (SD1.x and SD2 base 512, SD2 768-v 768, SDXL 1024). "
                "Class images are scaled to the training resolution, so make them at least that large: 512-px "
                "class images in SDXL's 1024 buckets train the class blurry.")


def bucket_sizes(dataset, width: int, height: int) -> list[tuple[int, int]]:
    """(height, width) of every aspect-ratio bucket the trainers will make of ``dataset``."""
    if not isinstance(dataset, InstanceDataset):
        raise InputError("dataset", "connect a Personalize Instance Dataset node")
    if width or height:
        raise InputError("width" if width else "height", "leave width and height at 0 with a dataset connected (the "
                         "class images are made at its buckets' sizes), or disconnect dataset to choose one size")
    return list(assign_buckets([tuple(im.shape[:2]) for im in dataset.images], dataset.resolution,
                               enabled=dataset.bucketing))


def _check_settings(num_class_images, prior_loss_weight, width, height, steps, cfg, sampler_name, scheduler,
                    batch_size) -> None:
    if num_class_images < 1:
        raise InputError("num_class_images", f"must be at least 1, got {num_class_images}; DreamBooth uses "
                                             "about 200 per subject image (diffusers' default is 100)")
    if not prior_loss_weight > 0:
        raise InputError("prior_loss_weight", f"must be positive, got {prior_loss_weight}")
    for name, value in (("width", width), ("height", height)):
        if value != 0 and (value < 64 or value % 8):
            raise InputError(name, f"must be 0 (the model's native size) or a multiple of 8 of at least 64, "
                                   f"got {value}")
    if steps < 1:
        raise InputError("steps", f"must be at least 1, got {steps}")
    if not 0 <= cfg < math.inf:  # also refuses NaN, and inf (a linked value) that no cache key can hold
        raise InputError("cfg", f"must be a finite number of at least 0, got {cfg}")
    if sampler_name not in comfy.samplers.KSampler.SAMPLERS:
        raise InputError("sampler_name", f"unknown sampler {sampler_name!r}")
    if scheduler not in comfy.samplers.KSampler.SCHEDULERS:
        raise InputError("scheduler", f"unknown scheduler {scheduler!r}")
    if batch_size < 1:
        raise InputError("batch_size", f"must be at least 1, got {batch_size}")


class PersonalizePriorDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PersonalizePriorDataset",
            display_name="Personalize Prior-Preservation Dataset",
            category="personalize/training",
            description="Class images for DreamBooth prior preservation: generated with the connected model "
                        "(cached on disk under output/personalize_class_images, so reruns are instant and a "
                        "cancelled run resumes), taken from a folder, or none (prior_prediction: the frozen "
                        "model's own prediction on the class prompt is the target).",
            inputs=[
                io.Combo.Input("mode", options=list(MODES), default="generate",
                               tooltip="generate: sample class images with this model. folder: use your own "
                                       "class images. prior_prediction: no images; the frozen model's "
                                       "prediction for the class prompt is the target (ai-toolkit DOP, "
                                       "OneTrainer prior prediction)."),
                io.String.Input("class_noun", default="dog",
                                tooltip="The class of your subject, e.g. dog, man, woman, car."),
                io.String.Input("class_prompt", default="",
                                tooltip="Empty: 'a photo of a/an {class_noun}'. Also the trainers' caption for the "
                                        "class images."),
                io.String.Input("negative_prompt", default="", multiline=True,
                                tooltip="generate mode: the negative prompt of the class images."),
                io.Int.Input("num_class_images", default=100, min=1, max=10000,
                             tooltip="generate mode. The DreamBooth paper uses about 200 per subject image; "
                                     "diffusers' default is 100. More than cached generates only the missing "
                                     "ones; fewer uses the first N."),
                io.Float.Input("prior_loss_weight", default=1.0, min=0.01, max=10.0, step=0.05,
                               tooltip="DreamBooth's lambda: weight of the class loss (kohya/diffusers default 1)."),
                io.Int.Input("width", default=0, min=0, max=4096, step=8, tooltip=SIZE_TOOLTIP),
                io.Int.Input("height", default=0, min=0, max=4096, step=8, tooltip=SIZE_TOOLTIP),
                io.Int.Input("steps", default=30, min=1, max=1000, tooltip=SAMPLING_TOOLTIP),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip=SAMPLING_TOOLTIP),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="dpmpp_2m",
                               tooltip=SAMPLING_TOOLTIP),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="karras",
                               tooltip=SAMPLING_TOOLTIP),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=False,
                             tooltip="Image i uses seed + i (as KSampler with that seed). Fixed, so reruns "
                                     "hit the cache."),
                io.Int.Input("batch_size", default=4, min=1, max=64,
                             tooltip="Images sampled together (not part of the cache key). Ancestral/SDE "
                                     "samplers run one at a time so each image depends only on its seed."),
                io.String.Input("folder", default="",
                                tooltip="folder mode: a folder of class images, relative to ComfyUI's input "
                                        "folder or absolute. All its images are used."),
                io.Model.Input("model", optional=True, tooltip="generate mode: the model you will train."),
                io.Clip.Input("clip", optional=True, tooltip="generate mode: its CLIP."),
                io.Vae.Input("vae", optional=True, tooltip="generate mode: its VAE."),
                Dataset.Input("dataset", optional=True,
                              tooltip="generate mode: the Instance Dataset you will train on. Class images are then "
                                      "made at each of its aspect-ratio buckets' sizes (num_class_images split "
                                      "between them), so none is cropped or upscaled to fit a portrait or "
                                      "landscape bucket. Leave width/height at 0."),
            ],
            outputs=[
                Prior.Output(display_name="prior"),
                io.Image.Output(display_name="preview", tooltip=f"Up to {PREVIEW_COUNT} of the class images."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, mode="generate", folder="", **_kwargs):
        """Folder mode re-runs when the folder's files change; the other modes depend on their inputs only."""
        return folder_fingerprint(folder) if mode == "folder" else ""

    @classmethod
    def execute(cls, mode, class_noun, class_prompt, negative_prompt, num_class_images, prior_loss_weight, width,
                height, steps, cfg, sampler_name, scheduler, seed, batch_size, folder, model=None, clip=None,
                vae=None, dataset=None) -> io.NodeOutput:
        if mode not in MODES:
            raise InputError("mode", f"must be one of {MODES}, got {mode!r}")
        prompt = resolve_prompt(class_noun, class_prompt)
        _check_settings(num_class_images, prior_loss_weight, width, height, steps, cfg, sampler_name, scheduler,
                        batch_size)
        if mode == "prior_prediction":
            prior = PriorPreservation("prior_prediction", prompt, prior_loss_weight)
            message = (f"prior_prediction: no class images needed; the frozen model's prediction for {prompt!r} "
                       "is the class target")
            log.info(message)
            return io.NodeOutput(prior, preview_batch(()), ui=ui.PreviewText(message))
        if mode == "folder":
            path = resolve_folder(folder)
            # the trainer's resolution is not known here: 1536 covers SDXL's 1024 buckets (a 12 MP photo: 1/4)
            images = [image for image, _caption in load_image_folder(path, "folder", max_short_side=1536)]
            message = f"loaded {len(images)} class images from {path}"
            log.info(message)
            if dataset is not None:
                log.warning("Prior-Preservation Dataset: folder mode uses the folder's images as they are; the dataset "
                            "input is for generate mode")
        else:
            for name, value in (("model", model), ("clip", clip), ("vae", vae)):
                if value is None:
                    raise InputError(name, f"generate mode needs the {name} input connected (the checkpoint you "
                                           "will train); or choose mode folder or prior_prediction")
            native = native_resolution(model)
            sizes = bucket_sizes(dataset, width, height) if dataset is not None else [(height or native,
                                                                                         width or native)]
            per, sets, messages = math.ceil(num_class_images / len(sizes)), [], []  # without a dataset: all
            for h, w in sizes:  # each bucket its own seeds: other images, not the same ones reshaped
                settings = {"width": w, "height": h, "steps": steps, "cfg": float(cfg), "sampler_name": sampler_name,
                            "scheduler": scheduler, "seed": bucket_seed(seed, (h, w))}
                made, text = generate_class_images(model, clip, vae, prompt, negative_prompt, settings, per,
                                                   batch_size, cls.hidden.unique_id)
                sets.append(((h, w), tuple(made)))
                messages.append(f"{w}x{h}: {text}" if dataset is not None else text)
            images, message = [im for _, made in sets for im in made], "\n".join(messages)
            if dataset is not None:
                prior = PriorPreservation("class_images", prompt, prior_loss_weight, tuple(images), tuple(sets))
                return io.NodeOutput(prior, preview_batch(round_robin(sets)), ui=ui.PreviewText(message))
        prior = PriorPreservation("class_images", prompt, prior_loss_weight, tuple(images))
        return io.NodeOutput(prior, preview_batch(images), ui=ui.PreviewText(message))


NODES = [PersonalizePriorDataset]
