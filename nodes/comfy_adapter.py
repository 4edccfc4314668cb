"""The core's host interface on ComfyUI objects: ModelPatcher + CLIP + VAE -> denoiser call, noise schedule,
LoRA targets with kohya names, and the image/text encoders. Glue only; the algorithms live in training/."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator, Sequence

import comfy.ldm.modules.attention as comfy_attention
import comfy.lora
import comfy.model_base
import comfy.model_management as mm
import comfy.model_sampling
import comfy.utils
import torch
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock, UNetModel
from torch import nn

from ..training.errors import InputError
from ..training.lora import TEXT_ENCODER_TARGETS, UNET_TARGET_PRESETS, find_linear_targets
from ..training.schedule import NoiseSchedule
from ..training.task import Conditioning, DiffusionTask
from . import prompt_encoder
from .embeddings import hard_tokens, reads_embedding

log = logging.getLogger(__name__)

# kohya's text-encoder prefixes per family and ComfyUI clip attribute (comfy.lora.model_lora_keys_clip).
_TE_PREFIXES = {"sd1": {"clip_l": "lora_te"}, "sd2": {"clip_h": "lora_te"},
                "sdxl": {"clip_l": "lora_te1", "clip_g": "lora_te2"}}


POOLED_WIDTH = 1280  # SDXL's y: CLIP-G's pooled text vector, then the size/crop embeddings


def model_family(model) -> str:
    """"sd1", "sd2" or "sdxl"; anything else is refused with the reason."""
    base = model.model
    name = type(base).__name__
    if not isinstance(getattr(base, "diffusion_model", None), UNetModel):
        raise InputError("model", f"{name} models are not supported; training needs an SD1.x, SD2.x or SDXL checkpoint")
    unet_config = base.model_config.unet_config
    if unet_config.get("in_channels", 4) != 4:
        raise InputError("model", "inpainting/instruct checkpoints (extra input channels) are not supported")
    if type(base) is comfy.model_base.SDXL:
        return "sdxl"
    if type(base) is comfy.model_base.BaseModel and unet_config.get("context_dim") in (768, 1024):
        return "sd1" if unet_config["context_dim"] == 768 else "sd2"
    raise InputError("model", f"{name} models are not supported; training needs an SD1.x, SD2.x or SDXL checkpoint")


def native_resolution(model) -> int:
    """The square size the family was trained at (SD2's v-prediction model is the 768 one)."""
    family = model_family(model)
    return {"sd1": 512, "sd2": 768 if model_prediction(model) == "v" else 512, "sdxl": 1024}[family]


def model_prediction(model) -> str:
    """"eps" or "v". The prediction is read from how the sampling turns the model's output into the image, so a
    ModelSamplingDiscrete node set to x0, img_to_img or lcm (subclasses of EPS) is refused, not trained as eps."""
    sampling = model.get_model_object("model_sampling")
    denoised = getattr(type(sampling), "calculate_denoised", None)
    predictions = {comfy.model_sampling.EPS.calculate_denoised: "eps",
                   comfy.model_sampling.V_PREDICTION.calculate_denoised: "v"}
    if not isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete) or isinstance(
            sampling, comfy.model_sampling.EDM) or denoised not in predictions:
        raise InputError("model", f"{type(sampling).__name__} sampling is not supported; training needs a discrete "
                                  "eps or v-prediction schedule (remove ModelSampling* nodes, or set "
                                  "ModelSamplingDiscrete to eps or v_prediction)")
    return predictions[denoised]


def _fixed_attention(func, *args, **kwargs):
    """One attention kernel for training: ComfyUI's memory-dependent chunking (sub-quad/split) would make
    gradient-checkpointing recomputes differ from the forward pass (ComfyUI issue #15845)."""
    return comfy_attention.attention_pytorch(*args, **kwargs)


def _made_in_inference_mode(t: torch.Tensor) -> bool:
    """Also true for a Parameter made in inference mode whose ``.data`` was later replaced (``Module.to``
    does that when ComfyUI moves a model): it no longer reports ``is_inference()`` but still has no version
    counter, which autograd needs."""
    if t.is_inference():
        return True
    try:
        t._version
    except RuntimeError:
        return True
    return False


def make_autograd_safe(module: nn.Module) -> int:
    """ComfyUI creates weights inside ``torch.inference_mode``; autograd refuses to save such tensors for
    backward. Swap each for a normal tensor of identical value (as ComfyUI's own loading swaps Parameters)."""
    swapped = 0
    with torch.inference_mode(False), torch.no_grad():
        for mod in module.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None and _made_in_inference_mode(p):
                    mod._parameters[name] = nn.Parameter(p.clone(), requires_grad=False)
                    swapped += 1
            for name, b in list(mod._buffers.items()):
                if b is not None and b.is_floating_point() and _made_in_inference_mode(b):
                    mod._buffers[name] = b.clone()
    return swapped


class ComfyHost:
    def __init__(self, model, clip, vae):
        self.family = model_family(model)
        self.prediction = model_prediction(model)
        self.input_model, self.input_clip, self.vae = model, clip, vae
        # Train on clones: loading them applies any upstream patches without touching the inputs' patch lists.
        self.model = model.clone()
        self.clip = clip.clone() if clip is not None else None
        sampling = self.model.get_model_object("model_sampling")
        self.schedule = NoiseSchedule.from_sigmas(sampling.sigmas.detach().cpu(), self.prediction)
        base = self.model.model
        self.compute_dtype = base.manual_cast_dtype or base.get_dtype()
        # what every training call passes the UNet; a TrainingBlend (``blend``) adds its patches while attached
        self.training_options = {"optimized_attention_override": _fixed_attention}
        self.blend = None
        self._channels_last = False
        self._tokens: dict[str, dict] = {}
        self.cache_tokens = True  # False when prompts carry trained vectors (tokens hold views of them)

    @property
    def diffusion_model(self) -> nn.Module:
        return self.model.model.diffusion_model

    # ---- LoRA targets, named as kohya names them (SD1/2: diffusers paths; SDXL: LDM paths)
    def unet_lora_targets(self, preset: str) -> dict[str, nn.Linear]:
        if preset not in UNET_TARGET_PRESETS:
            raise InputError("targets", f"must be one of {list(UNET_TARGET_PRESETS)}, got {preset!r}")
        found = find_linear_targets(self.diffusion_model, UNET_TARGET_PRESETS[preset])
        if self.family == "sdxl":
            names = {p: p for p in found}
        else:
            to_diffusers = comfy.utils.unet_to_diffusers(self.model.model.model_config.unet_config)
            names = {ldm[: -len(".weight")]: d[: -len(".weight")] for d, ldm in to_diffusers.items()
                     if d.endswith(".weight")}
        return {"lora_unet_" + names[p].replace(".", "_"): m for p, m in found.items()}

    def text_encoder_lora_targets(self) -> dict[str, nn.Linear]:
        if self.clip is None:
            raise InputError("clip", "train_text_encoder needs the CLIP input connected")
        out = {}
        for attr, prefix in _TE_PREFIXES[self.family].items():
            encoder = getattr(self.clip.cond_stage_model, attr, None)
            if encoder is None:
                continue
            for path, m in find_linear_targets(encoder.transformer, TEXT_ENCODER_TARGETS).items():
                out[f"{prefix}_{path.replace('.', '_')}"] = m
        return out

    def kohya_module_names(self, with_text_encoder: bool) -> dict[str, str]:
        """ComfyUI's generic module names (``diffusion_model.<module>``, ``text_encoders.<module>``) -> the kohya
        names A1111/Forge read, for every module ComfyUI's key map also resolves under that name (text encoders:
        the layers' attention and MLP projections; the rest keeps the generic name, which ComfyUI alone reads)."""
        names = {}
        for lora_key, model_key in comfy.lora.model_lora_keys_unet(self.model.model, {}).items():
            module = model_key[: -len(".weight")]
            if lora_key == "lora_unet_" + module[len("diffusion_model."):].replace(".", "_"):
                names[module] = lora_key
        if with_text_encoder:
            prefixes = _TE_PREFIXES[self.family]
            for lora_key, model_key in comfy.lora.model_lora_keys_clip(self.clip.cond_stage_model, {}).items():
                attr, _, path = model_key[: -len(".weight")].partition(".transformer.")
                if attr in prefixes and lora_key == f"{prefixes[attr]}_{path.replace('.', '_')}":
                    names[f"text_encoders.{model_key[: -len('.weight')]}"] = lora_key
        return names

    # ---- encoders
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        latents = self.vae.encode(images)
        return self.model.model.process_latent_in(latents).float().cpu()

    def encode_text(self, captions: Sequence[str], size: tuple[int, int], hard: bool = False) -> Conditioning:
        """CLIPTextEncode's path (clip skip, embeddings, weights), plus SDXL's size/crop vector. ``hard``: each
        learned vector (``embedding:NAME``) replaced by its nearest real token, the Dual-Path blend's hard prompt."""
        if self.clip is None:
            raise InputError("clip", "connect the CLIP that belongs to this checkpoint")
        encoded = {}
        for caption in dict.fromkeys(captions):  # a batch often repeats one caption: encode each once
            if hard:  # a caption without a learned word is its own hard caption
                learned = reads_embedding(self.clip, caption)
                tokens = hard_tokens(self.clip, caption)[0] if learned else self.clip.tokenize(caption)
            else:
                if caption not in self._tokens or not self.cache_tokens:  # text training encodes every step
                    self._tokens[caption] = self.clip.tokenize(caption)
                tokens = self._tokens[caption]
            cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
            y = None
            if self.family == "sdxl":
                h, w = size
                y = self.model.model.encode_adm(pooled_output=pooled, width=w, height=h, crop_w=0, crop_h=0,
                                                target_width=w, target_height=h)
            encoded[caption] = Conditioning(cond, y)
        return Conditioning.cat([encoded[c] for c in captions])

    def micro_conditioning(self, rows: Sequence[tuple[int, int, int, int]], size: tuple[int, int]) -> torch.Tensor:
        """SDXL's size/crop embeddings (the tail of y after the pooled text vector) for each image: [(original
        height, width, crop top, crop left)] into a bucket of ``size`` -> [len(rows), A] float32 on the CPU."""
        pooled = torch.zeros(1, POOLED_WIDTH)
        h, w = size
        tails = [self.model.model.encode_adm(pooled_output=pooled, width=ow, height=oh, crop_w=left, crop_h=top,
                                             target_width=w, target_height=h)[:, POOLED_WIDTH:]
                 for oh, ow, top, left in rows]
        return torch.cat(tails).float().cpu()

    def device_prompt_encoder(self, prompts: Sequence[str], size: tuple[int, int]):
        """Every prompt encoded by device work only (CUDA-graph friendly), checked against ``encode_text``; None
        where ComfyUI's own path must be used. Call after ``load_for_training`` (the CLIP is on its device)."""
        if self.clip is None:
            return None
        adm = None
        if self.family == "sdxl":
            def adm(pooled, size_hw):
                h, w = size_hw
                return self.model.model.encode_adm(pooled_output=pooled, width=w, height=h, crop_w=0, crop_h=0,
                                                   target_width=w, target_height=h)
        device = self.clip.patcher.load_device
        return prompt_encoder.build(self.clip, prompts, device, adm, self.encode_text, size)

    # ---- training
    def load_for_training(self, with_text_encoder: bool) -> None:
        models = [self.model] + ([self.clip.patcher] if with_text_encoder else [])
        # Training needs memory ComfyUI does not know of (fp32 copies, gradients, optimiser state, activations):
        # every other model leaves the device first, as ComfyUI's own trainer asks (nodes_train.py).
        mm.load_models_gpu(models, memory_required=1e20, force_full_load=True)
        swapped = make_autograd_safe(self.diffusion_model)
        if with_text_encoder:
            swapped += make_autograd_safe(self.clip.cond_stage_model)
            # Encoding every step must not go through ComfyUI's loader: asking it to load the CLIP again may
            # make it free memory by moving the UNet (and the weights a step uses) off the GPU mid-training.
            # The override lives on our clone only.
            patcher = self.clip.patcher
            self.clip.load_model = lambda *args, **kwargs: patcher
        log.debug("made %d inference-mode tensors usable by autograd", swapped)

    @contextmanager
    def text_encoder_autograd(self) -> Iterator[None]:
        """ComfyUI's CLIP layers do ``x += attn(layer_norm1(x))``: the in-place add overwrites the tensor
        LayerNorm saved for backward. Feeding every LayerNorm a copy of its input makes that safe; the hooks
        go when the block ends."""
        def copy_input(_module, args):
            return (args[0].clone(),) + tuple(args[1:])

        handles = [m.register_forward_pre_hook(copy_input) for m in self.clip.cond_stage_model.modules()
                   if isinstance(m, nn.LayerNorm)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def channels_last(self) -> Iterator[None]:
        """Run the UNet's convolutions in NHWC, the layout cuDNN's fp16/bf16 kernels use: without it every conv
        converts its input and output (about a fifth of a batch-1 step's GPU time on an H100). Conv weights
        are re-laid out in place (same values, same Parameter objects; the NCHW storage is not kept, so no
        second copy of the conv weights) and laid out back when the block ends."""
        relaid = []
        try:
            with torch.inference_mode(False), torch.no_grad():
                for mod in self.diffusion_model.modules():
                    w = mod._parameters.get("weight") if isinstance(mod, nn.Conv2d) else None
                    if w is not None and w.dim() == 4 and not _made_in_inference_mode(w):
                        w.data = w.data.contiguous(memory_format=torch.channels_last)
                        relaid.append(w)
            with self.nhwc_inputs():
                yield
        finally:
            with torch.no_grad():
                for w in relaid:
                    w.data = w.data.contiguous()

    @contextmanager
    def nhwc_inputs(self) -> Iterator[None]:
        """Feed the UNet NHWC inputs (for trainers whose own conv weights are NHWC)."""
        self._channels_last = True
        try:
            yield
        finally:
            self._channels_last = False

    def task(self) -> DiffusionTask:
        dm = self.diffusion_model
        # The UNet runs each block's layers itself (forward_timestep_embed), so checkpoint the layers: each ResBlock
        # and each transformer block (SDXL stacks up to 10 in one SpatialTransformer; recomputing the stack at
        # once would hold all their activations together).
        blocks = []
        for layer in (layer for block in (*dm.input_blocks, dm.middle_block, *dm.output_blocks) for layer in block):
            if isinstance(layer, ResBlock):
                blocks.append(layer)
            elif isinstance(layer, SpatialTransformer):
                blocks.extend(layer.transformer_blocks)
        frozen = [dm] + ([self.clip.cond_stage_model] if self.clip is not None else [])
        return DiffusionTask(self.predict, self.schedule, self.model.load_device, self.compute_dtype, blocks,
                             frozen)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        dt = self.compute_dtype
        y = None if cond.y is None else cond.y.to(x_t.device, dt)
        x_t = x_t.to(dt, memory_format=torch.channels_last if self._channels_last else torch.preserve_format)
        options = dict(self.training_options)
        if self.blend is not None:
            y, options = self.blend.call_options(cond, y, options, x_t)
        return self.diffusion_model(x_t, t.float(), context=cond.context.to(x_t.device, dt), y=y,
                                    transformer_options=options)
