"""What every trainer node does around the core loop: encode the dataset on the host, attach what trains,
show progress (bar, loss events, preview samples), save every N steps, and hand back the losses."""
from __future__ import annotations

import dataclasses
import logging
from contextlib import ExitStack, nullcontext
from typing import Callable, ContextManager, Sequence

import comfy.sample
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..training.data import build_training_data
from ..training.datasets import InstanceDataset, PriorPreservation
from ..training.errors import InputError, TrainingDiverged
from ..training.files import resolve_output_path, save_safetensors_atomic
from ..training.objective import LR_SCHEDULES
from ..training.optimizers import OPTIMIZERS
from ..training.options import TrainOptions
from ..training.trainer import DTYPES, TrainConfig, train
from .comfy_adapter import ComfyHost
from .progress import TrainingProgress
from .types import Dataset, Options, Prior
from .upstream_patches import patches_training_leaves_out

log = logging.getLogger(__name__)
PREVIEW_STEPS, PREVIEW_CFG = 20, 6.0


# Tooltips of inputs several trainers show (one text for one meaning).
RANK_TOOLTIP = ("LoRA rank: the size of each low-rank update. 4-16 suits a subject or a style; higher holds more "
                "detail and makes a larger file.")
ALPHA_TOOLTIP = "Scale = alpha / rank. alpha = rank gives scale 1."
TARGETS_TOOLTIP = ("Which UNet layers get a LoRA: attention (q, k, v, out of every attention layer), "
                   "attention+feedforward (also the MLPs: more capacity) or cross-attention only (the text's layers).")
NAME_TOOLTIP = "File name without extension; it cannot contain folders (use subfolder)."
IF_EXISTS_TOOLTIP = "increment: name_00001...; overwrite: replace the file; error: refuse."


def common_inputs(learning_rate: float, steps: int = 500) -> list:
    """The inputs every trainer shows, in the same order."""
    return [
        io.Model.Input("model"),
        io.Clip.Input("clip"),
        io.Vae.Input("vae"),
        Dataset.Input("dataset", tooltip="From Personalize Instance Dataset."),
        Prior.Input("prior", optional=True, tooltip="From Personalize Prior-Preservation Dataset (DreamBooth's "
                                                    "class-specific prior preservation)."),
        Options.Input("options", optional=True, tooltip="From Personalize Training Options (schedule, min-SNR, "
                                                        "EMA, previews, saves every N steps)."),
        io.Int.Input("steps", default=steps, min=1, max=100000,
                     tooltip="Optimiser steps (each sees batch_size x gradient_accumulation images)."),
        io.Float.Input("learning_rate", default=learning_rate, min=1e-8, max=1.0, step=1e-7, round=False,
                       tooltip="AdamW's learning rate (the default suits this trainer; the schedule is on "
                               "Personalize Training Options)."),
        io.Int.Input("batch_size", default=1, min=1, max=64,
                     tooltip="Subject images per step (with prior preservation, as many class images again)."),
        io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=True,
                     tooltip="Fixes the noise, timesteps, image order and LoRA start: a seed reproduces a run."),
        io.Combo.Input("dtype", options=list(DTYPES), default="auto",
                       tooltip="auto: the weights' own dtype on GPU (fp16 with loss scaling), fp32 on CPU."),
        io.Boolean.Input("gradient_checkpointing", default=False, tooltip="Less memory, about 25% slower."),
    ]


def save_intermediate(kind: str, stem: str, tensors: dict, metadata: dict) -> str:
    """A result so far, as ``models/<kind>/personalize_checkpoints/<stem>.safetensors`` (never overwriting);
    returns the path."""
    folder = folder_paths.get_folder_paths(kind)[0]
    path = resolve_output_path(folder, "personalize_checkpoints", stem, ".safetensors", "increment")
    save_safetensors_atomic(tensors, path, metadata, inputs=None)  # the trainers have no folder or name input
    return str(path)


class TrainingSession:
    """One trainer run on a ComfyUI MODEL/CLIP/VAE. ``text_trains``: captions are encoded every step with
    gradients (text-encoder LoRA, embeddings); otherwise they are encoded once."""

    def __init__(self, model, clip, vae, dataset: InstanceDataset, prior: PriorPreservation | None,
                 options: TrainOptions | None, cfg_args: dict, node_id: str | None):
        if not isinstance(dataset, InstanceDataset):
            raise InputError("dataset", "connect a Personalize Instance Dataset node")
        if prior is not None and not isinstance(prior, PriorPreservation):
            raise InputError("prior", "connect a Personalize Prior-Preservation Dataset node")
        self.options = options or TrainOptions()
        self.cfg: TrainConfig = self.options.config(**cfg_args)
        self.dataset, self.prior, self.node_id = dataset, prior, node_id
        self.host = ComfyHost(model, clip, vae)
        left_out = patches_training_leaves_out(model)
        if left_out:
            log.warning("model: carries %s from upstream nodes; training calls the UNet without them, so what it "
                        "learns fits the model as a LoRA loader elsewhere sees it, while the previews and the "
                        "returned MODEL keep them. To train and preview alike, connect the model from before those "
                        "nodes and apply them after the trainer", ", ".join(left_out))
        self.size = (dataset.resolution, dataset.resolution)

    def data(self, text_trains: bool):
        host = self.host
        with torch.no_grad():  # the VAE's and CLIP's weights were made in inference mode; nothing trains here
            data = build_training_data(self.dataset, self.prior, host.encode_images, host.encode_text,
                                       micro_conditioning=host.micro_conditioning if host.family == "sdxl" else None)
            if not text_trains:
                data.cache_conditioning()
        host.load_for_training(text_trains)
        if text_trains:
            with torch.no_grad():
                data.prompt_encoder = host.device_prompt_encoder(data.prompts(), data.buckets[0].size)
        return data

    def schedule_metadata(self) -> dict:
        """What a saved LoRA's kohya metadata says of the schedule and the class images."""
        images = len(self.prior.images) if self.prior is not None else 0
        return {"lr_scheduler": self.options.lr_schedule, "num_reg_images": images,
                "optimizer": self.options.optimizer}

    def run(self, data, params: Sequence, attach: Sequence[ContextManager], text_trains: bool,
            frozen: Callable[[], ContextManager] | None = None, save: Callable[[int], str] | None = None,
            channels_last: bool = True, nhwc_inputs: bool = False, previews: bool = True,
            regularizer: Callable[[], torch.Tensor] | None = None,
            preview: Callable[[], ContextManager] | None = None) -> list[float]:
        """Train with ``attach`` entered (adapter hooks, swapped weights); ``save(step)`` every save_every.
        ``channels_last`` swaps the host's conv weights for NHWC copies on CUDA; a trainer that brings its own
        NHWC weights asks for ``nhwc_inputs`` only. ``previews``: whether preview samples are possible;
        ``preview()``: entered around each (the blend's adapters hooked plainly)."""
        host, opts, cfg = self.host, self.options, self.cfg
        progress = TrainingProgress(cfg.steps, self.node_id)
        prompt = opts.sample_prompt or data.buckets[0].captions[0]
        sample_every = opts.sample_every if previews else 0
        if opts.sample_every and not previews:
            log.warning("preview samples are not available for this trainer; training without them")
        if sample_every:
            # Sampling goes through ComfyUI's loader, which may move weights to make room; a CUDA graph would
            # keep reading the old addresses, so the steps run eagerly.
            cfg = dataclasses.replace(cfg, cuda_graph=False)

        if save is not None and opts.save_every:  # a save never writes weights whose loss went NaN unseen
            cfg = dataclasses.replace(cfg, check_every=opts.save_every)

        saved: list[str] = []  # what the saves every N steps wrote

        def on_step(step: int, losses: list[float]) -> None:
            image = None
            if sample_every and (step % sample_every == 0 or step == cfg.steps):
                with preview() if preview is not None else nullcontext():
                    image = self.sample(prompt, data.buckets[0].size, seed=cfg.seed)
            progress(step, losses, image)
            if save is not None and opts.save_every and step % opts.save_every == 0 and step < cfg.steps:
                saved.append(save(step))

        with ExitStack() as stack:
            for ctx in attach:
                stack.enter_context(ctx)
            if text_trains:
                stack.enter_context(host.text_encoder_autograd())
            if host.model.load_device.type == "cuda" and channels_last:
                stack.enter_context(host.channels_last())
            elif nhwc_inputs:
                stack.enter_context(host.nhwc_inputs())
            try:
                return train(host.task(), data, params, cfg, on_step, frozen=frozen, regularizer=regularizer)
            except TrainingDiverged as e:  # name what the saves every N steps kept
                if not saved:
                    raise
                raise TrainingDiverged(e.step, e.value, saved[-1]) from None

    @torch.no_grad()
    def sample(self, prompt: str, size: tuple[int, int], seed: int):
        """One image from the model as it is now (its adapters are attached), as KSampler would make it."""
        host = self.host
        positive = host.clip.encode_from_tokens_scheduled(host.clip.tokenize(prompt), show_pbar=False)
        negative = host.clip.encode_from_tokens_scheduled(host.clip.tokenize(""), show_pbar=False)
        latent = torch.zeros(1, 4, size[0] // 8, size[1] // 8)
        noise = comfy.sample.prepare_noise(latent, seed)
        samples = comfy.sample.sample(host.model, noise, PREVIEW_STEPS, PREVIEW_CFG, "euler", "normal", positive,
                                      negative, latent, disable_pbar=True, seed=seed)
        image = host.vae.decode(samples)[0].float().clamp(0, 1)
        from PIL import Image
        return Image.fromarray((image.cpu().numpy() * 255).round().astype("uint8"))


class PersonalizeTrainingOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PersonalizeTrainingOptions",
            display_name="Personalize Training Options",
            category="personalize/training",
            description="Schedule, loss weighting and run control shared by every Personalize trainer.",
            inputs=[
                io.Combo.Input("lr_schedule", options=list(LR_SCHEDULES), default="constant",
                               tooltip="The learning rate after warm-up: constant, or decaying to 0 at the last "
                                       "step (cosine, linear)."),
                io.Int.Input("warmup_steps", default=0, min=0, max=100000,
                             tooltip="Steps over which the learning rate rises linearly to its value."),
                io.Int.Input("gradient_accumulation", default=1, min=1, max=64,
                             tooltip="Micro-batches per optimiser step: a larger effective batch at the memory "
                                     "of batch_size."),
                io.Float.Input("max_grad_norm", default=1.0, min=0.0, max=100.0, tooltip="0 = no clipping."),
                io.Float.Input("min_snr_gamma", default=0.0, min=0.0, max=20.0, step=0.5,
                               tooltip="0 = off; 5 is the paper's recommendation."),
                io.Float.Input("noise_offset", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="About 0.05-0.1 helps very dark/bright images."),
                io.Int.Input("timestep_min", default=0, min=0, max=999,
                             tooltip="Train on noise levels from this timestep (0 = least noise)..."),
                io.Int.Input("timestep_max", default=999, min=0, max=999,
                             tooltip="...to this one (999 = pure noise). Lower it to train fine detail only."),
                io.Float.Input("ema_decay", default=0.0, min=0.0, max=0.9999, step=0.0001,
                               tooltip="0 = off; e.g. 0.999 returns the moving average of the weights (the decay "
                                       "warms up as min(decay, (1 + step) / (10 + step)), as in diffusers); the "
                                       "saves every N steps hold the average too."),
                io.Int.Input("sample_every", default=0, min=0, max=100000,
                             tooltip="Show a preview image on the trainer every N steps (0 = off)."),
                io.String.Input("sample_prompt", default="", tooltip="Empty = the first training caption."),
                io.Int.Input("save_every", default=0, min=0, max=100000,
                             tooltip="Also save the result every N steps (0 = only at the end)."),
                io.Combo.Input("optimizer", options=list(OPTIMIZERS), default="adamw", optional=True,
                               tooltip="adamw: the usual choice. adafactor: no per-weight moments, so a full "
                                       "fine-tune needs about half the memory (SDXL DreamBooth ~21 GiB instead of "
                                       "~40); no momentum, and its steps are not replayed as a CUDA graph. "
                                       "adafactor_fused: each weight is updated as soon as backward has its "
                                       "gradient, which is then freed (SDXL DreamBooth ~12.4 GiB: a 16 GB card), "
                                       "at ~1.5x Adafactor's step time; gradients are clipped per weight; no "
                                       "gradient accumulation or fp16."),
            ],
            outputs=[Options.Output(display_name="options")],
        )

    @classmethod
    def execute(cls, lr_schedule, warmup_steps, gradient_accumulation, max_grad_norm, min_snr_gamma, noise_offset,
                timestep_min, timestep_max, ema_decay, sample_every, sample_prompt, save_every,
                optimizer="adamw") -> io.NodeOutput:
        from ..training.objective import Objective

        objective = Objective(min_snr_gamma, noise_offset, timestep_min, timestep_max)
        objective.validate()
        options = TrainOptions(lr_schedule, warmup_steps, gradient_accumulation, max_grad_norm, ema_decay,
                               objective, sample_every, sample_prompt.strip(), save_every, optimizer)
        return io.NodeOutput(options)


NODES = [PersonalizeTrainingOptions]
