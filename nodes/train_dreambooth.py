"""Personalize Train DreamBooth: full fine-tune of the UNet (optionally the text encoder) with prior preservation."""
from __future__ import annotations

import logging
import math

import comfy.model_management as mm
import comfy.sd
import torch
from comfy_api.latest import io

from ..training.errors import InputError
from ..training.files import base_model_metadata, tag_frequency
from ..training.full_finetune import FullFineTune, diff_state_dict
from ..training.lora import TrainedLoRA
from ..training.optimizers import BYTES_PER_WEIGHT, state_bytes
from ..training.trainer import ParamGroup, resolve_precision
from .session import TrainingSession, common_inputs, save_intermediate

log = logging.getLogger(__name__)


# Per trained weight: optimizers.BYTES_PER_WEIGHT (fp32 master copy and gradient) and the optimiser's state
# (optimizers.state_bytes, from the shapes) plus ~0.85 byte for the activations and the rest: the measured peaks of
# SDXL (2.57 B weights) at 1024 px with gradient checkpointing are 1.3 GiB (AdamW), 0.8 GiB (Adafactor) and 2.0 GiB
# (adafactor_fused, whose steps run while backward's activations live) over the weights, gradients and state
# (bench/results/2026-12-03-s10-db-sdxl-h200.md): estimates 40.3 / 22.1 / 12.5 GiB against 39.6 / 20.9 / 12.4.
OTHER_BYTES_PER_WEIGHT = 0.85


def memory_needed(shapes: list, optimizer: str) -> float:
    """Bytes a full fine-tune of weights of these shapes needs on its device with this optimiser."""
    trained = sum(math.prod(s) for s in shapes)
    return trained * (BYTES_PER_WEIGHT[optimizer] + OTHER_BYTES_PER_WEIGHT) + state_bytes(optimizer, shapes)


def check_memory(host, train_text_encoder: bool, optimizer: str, fused_possible: bool = True) -> None:
    """Refuse a full fine-tune its device cannot hold, with the numbers, instead of running out of memory later.
    ``fused_possible``: adafactor_fused allows the run's settings (no gradient accumulation, no fp16)."""
    shapes = [p.shape for p in host.diffusion_model.parameters()]
    if train_text_encoder and host.clip is not None:
        shapes += [p.shape for p in host.clip.cond_stage_model.parameters()]
    need = memory_needed(shapes, optimizer)
    if getattr(mm, "directml_enabled", False):
        return  # ComfyUI cannot read a DirectML device's memory (it reports a fixed 1 GiB)
    device = host.model.load_device
    total = mm.get_total_memory(device)
    if need > total:
        lighter = ""
        for other in ("adafactor_fused", "adafactor"):  # the lightest the run's settings allow, if it fits
            if other != optimizer and memory_needed(shapes, other) <= total and (other != "adafactor_fused"
                                                                                 or fused_possible):
                lighter = (f", or set Training Options' optimizer to {other} (about "
                           f"{memory_needed(shapes, other) / 2**30:.1f} GiB)")
                break
        raise InputError("model", f"DreamBooth trains all {sum(math.prod(s) for s in shapes) / 1e9:.2f} B weights "
                                  f"of this model, which takes about {need / 2**30:.1f} GiB (fp32 weights, "
                                  f"gradients, {optimizer} states and activations); {device} has "
                                  f"{total / 2**30:.1f} GiB. Train a LoRA (Personalize Train LoRA) instead, or use a "
                                  "GPU with more memory" + (", or leave the text encoder out" if train_text_encoder
                                                            else "") + lighter + ".")


class PersonalizeTrainDreamBooth(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PersonalizeTrainDreamBooth",
            display_name="Personalize Train DreamBooth",
            category="personalize/training",
            description="DreamBooth: fine-tunes every UNet weight (and optionally the text encoder) on the subject, "
                        "with class-specific prior preservation when a prior is connected. Returns the tuned "
                        "MODEL/CLIP and the weight difference (saves as a checkpoint or a diff file).",
            inputs=common_inputs(learning_rate=5e-6, steps=800) + [
                io.Boolean.Input("train_text_encoder", default=False,
                                 tooltip="Also fine-tune the text encoder (more memory; its own learning rate)."),
                io.Float.Input("text_encoder_lr", default=2e-6, min=1e-9, max=1.0, step=1e-7, round=False,
                               tooltip="The text encoder's learning rate, when it trains (usually below the "
                                       "UNet's)."),
            ],
            outputs=[io.Model.Output(display_name="model"), io.Clip.Output(display_name="clip"),
                     io.LoraModel.Output(display_name="weight_diff",
                                         tooltip="trained - original for every weight; Save LoRA writes it as a "
                                                 "diff file that LoraLoader applies."),
                     io.LossMap.Output(display_name="loss")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, steps, learning_rate, batch_size, seed, dtype, gradient_checkpointing,
                train_text_encoder, text_encoder_lr, prior=None, options=None) -> io.NodeOutput:
        if train_text_encoder and not text_encoder_lr > 0:
            raise InputError("text_encoder_lr", f"must be positive, got {text_encoder_lr}")
        if prior is not None and prior.mode == "prior_prediction":
            raise InputError("prior", "prior_prediction needs the frozen model next to the trained one, which a full "
                                      "fine-tune would have to copy; generate class images instead (mode generate)")
        session = TrainingSession(model, clip, vae, dataset, prior, options,
                                  dict(steps=steps, learning_rate=learning_rate, batch_size=batch_size, seed=seed,
                                       dtype=dtype, gradient_checkpointing=gradient_checkpointing),
                                  cls.hidden.unique_id)
        host = session.host
        # before encoding anything: a run that cannot fit fails at once
        # fp32 master weights: "auto" is fp16 with loss scaling on a GPU without bf16, which the fused step refuses
        scaling = resolve_precision(dtype, host.model.load_device, torch.float32).grad_scaling
        check_memory(host, train_text_encoder, session.options.optimizer,
                     session.options.gradient_accumulation == 1 and not scaling)
        with torch.inference_mode(False), torch.enable_grad():
            data = session.data(text_trains=train_text_encoder)
            device = host.model.load_device
            # Copies of the weights as loaded (with any upstream LoRA merged), in fp32: the master weights.
            save_dtype = torch.float16 if host.model.model.get_dtype() == torch.float16 else torch.float32
            unet = FullFineTune(host.diffusion_model, device, channels_last=device.type == "cuda",
                                delta_dtype=save_dtype)
            te = (FullFineTune(host.clip.cond_stage_model, device, delta_dtype=save_dtype) if train_text_encoder
                  else None)
            host.compute_dtype = torch.float32  # fp32 master weights; bf16/fp16 compute comes from autocast
            groups = [ParamGroup(list(unet.parameters()), learning_rate)]
            if te is not None:
                groups.append(ParamGroup(list(te.parameters()), text_encoder_lr))
            attach = [unet.swapped_in()] + ([te.swapped_in()] if te is not None else [])

            names = host.kohya_module_names(te is not None)  # kohya names: A1111/Forge read the file too

            def weight_diff() -> dict[str, torch.Tensor]:
                diff = diff_state_dict(unet.deltas(save_dtype), "diffusion_model.", names)
                if te is not None:  # ComfyUI's CLIP key map names weights (and their biases) only
                    te_deltas = {n: d for n, d in te.deltas(save_dtype).items() if n.endswith((".weight", ".bias"))}
                    diff.update(diff_state_dict(te_deltas, "text_encoders.", names))
                return diff

            # A1111/Forge file a network by these keys (without them: under SD1, hidden for SDXL/SD2 models).
            base_meta = {**base_model_metadata(host.family, host.prediction), **tag_frequency(dataset.captions)}

            def save(step: int) -> str:  # the weight difference so far, as a diff file LoraLoader applies
                return save_intermediate("loras", f"dreambooth_step{step:05d}", weight_diff(),
                                         {**base_meta, "personalize.method": "dreambooth",
                                          "personalize.step": str(step)})

            # No previews: sampling may make ComfyUI move the UNet's modules, and with them the swapped-in
            # trainable weights, to another device.
            losses = session.run(data, groups, attach, text_trains=train_text_encoder, save=save,
                                 channels_last=False, nhwc_inputs=device.type == "cuda", previews=False)
        diff = weight_diff()
        meta = {**base_meta, "modelspec.title": "Personalize DreamBooth weight difference",
                "personalize.method": "dreambooth", "personalize.steps": str(steps),
                "personalize.learning_rate": str(learning_rate), "personalize.base_model": host.family,
                "personalize.prior": prior.mode if prior else "none",
                "personalize.class_prompt": prior.class_prompt if prior else "",
                "personalize.captions": "; ".join(sorted(set(dataset.captions)))[:2000],
                "personalize.final_loss": f"{losses[-1]:.6g}"}
        weight_diff = TrainedLoRA(diff, meta)
        out_model, out_clip = comfy.sd.load_lora_for_models(model, clip if te else None, weight_diff, 1.0, 1.0)
        log.info("DreamBooth: tuned %d UNet tensors%s; loss %.4f -> %.4f", len(unet.weights),
                 f" and {len(te.weights)} text-encoder tensors" if te else "", losses[0], losses[-1])
        return io.NodeOutput(out_model, out_clip if te else clip, weight_diff, {"loss": losses})


NODES = [PersonalizeTrainDreamBooth]
