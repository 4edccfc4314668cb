"""Personalize Train LoRA: train a LoRA on the loaded checkpoint, in this process, and return it applied."""
from __future__ import annotations

import logging
from contextlib import ExitStack

import comfy.sd
import torch
from comfy_api.latest import io

from ..training.data import expand_captions, prepare_images
from ..training.files import lora_metadata
from ..training.lora import UNET_TARGET_PRESETS, LoRANetwork, TrainedLoRA
from ..training.trainer import DTYPES, TrainConfig, train
from .comfy_adapter import ComfyHost
from .progress import TrainingProgress

log = logging.getLogger(__name__)


class PersonalizeTrainLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PersonalizeTrainLoRA",
            display_name="Personalize Train LoRA",
            category="personalize/training",
            description="Trains a LoRA on the connected checkpoint in this ComfyUI process and returns the model "
                        "and CLIP with it applied, the LoRA weights (kohya keys) and the loss per step.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.Vae.Input("vae"),
                io.Image.Input("images", tooltip="The subject or style photos (one batch, same size)."),
                io.String.Input("caption", multiline=True, default="a photo of zwx person",
                                tooltip="One line for all images, or one line per image."),
                io.Int.Input("steps", default=500, min=1, max=100000),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-6, round=False),
                io.Int.Input("rank", default=8, min=1, max=256),
                io.Float.Input("alpha", default=8.0, min=0.01, max=1024.0, step=0.5,
                               tooltip="Scale = alpha / rank. alpha = rank gives scale 1."),
                io.Combo.Input("targets", options=list(UNET_TARGET_PRESETS), default="attention"),
                io.Boolean.Input("train_text_encoder", default=False),
                io.Int.Input("batch_size", default=1, min=1, max=64),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=True),
                io.Combo.Input("dtype", options=list(DTYPES), default="auto",
                               tooltip="auto: the weights' own dtype on GPU (fp16 with loss scaling), fp32 on CPU."),
                io.Boolean.Input("gradient_checkpointing", default=False, tooltip="Less memory, about 25% slower."),
            ],
            outputs=[
                io.Model.Output(display_name="model"),
                io.Clip.Output(display_name="clip"),
                io.LoraModel.Output(display_name="lora"),
                io.LossMap.Output(display_name="loss"),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, images, caption, steps, learning_rate, rank, alpha, targets,
                train_text_encoder, batch_size, seed, dtype, gradient_checkpointing) -> io.NodeOutput:
        cfg = TrainConfig(steps=steps, learning_rate=learning_rate, batch_size=batch_size, seed=seed,
                          dtype=dtype, gradient_checkpointing=gradient_checkpointing)
        cfg.validate()
        images = prepare_images(images)
        captions = expand_captions(caption, images.shape[0])
        host = ComfyHost(model, clip, vae)
        size = tuple(images.shape[1:3])
        latents = host.encode_images(images)

        with torch.inference_mode(False), torch.enable_grad():  # ComfyUI runs nodes in inference mode
            # Trainable tensors must be made here: tensors created in inference mode never track gradients.
            unet_net = LoRANetwork(host.unet_lora_targets(targets), rank, alpha, seed=seed)
            te_net = (LoRANetwork(host.text_encoder_lora_targets(), rank, alpha, seed=seed + 1)
                      if train_text_encoder else None)
            if te_net is None:
                cached = host.encode_text(captions, size)
                host.load_for_training(False)
                conditioning = cached.to(host.model.load_device).clone().select
            else:
                host.load_for_training(True)
                conditioning = lambda index: host.encode_text([captions[i] for i in index.tolist()], size)  # noqa: E731
            nets = [n for n in (unet_net, te_net) if n is not None]
            for n in nets:
                n.to(host.model.load_device)
            params = [p for n in nets for p in n.parameters()]
            with ExitStack() as attached:
                for n in nets:
                    attached.enter_context(n.attached())
                if te_net is not None:
                    attached.enter_context(host.text_encoder_autograd())
                if host.model.load_device.type == "cuda":
                    attached.enter_context(host.channels_last())
                losses = train(host.task(), latents, conditioning, params, cfg,
                               TrainingProgress(steps, cls.hidden.unique_id))

        tensors = unet_net.kohya_state_dict(torch.float32)
        if te_net is not None:
            tensors.update(te_net.kohya_state_dict(torch.float32))
        meta = lora_metadata(
            base_model=host.family, rank=rank, alpha=alpha, learning_rate=learning_rate, steps=steps,
            batch_size=batch_size, resolution=size, num_images=images.shape[0], seed=seed,
            title="Personalize LoRA", text_encoder_trained=te_net is not None, prediction=host.prediction,
            targets=targets, extra={"captions": sorted(set(captions)), "final_loss": losses[-1]},
        )
        lora = TrainedLoRA(tensors, meta)
        # The stock LoraLoader's own path, so the returned model equals loading the saved file.
        out_model, out_clip = comfy.sd.load_lora_for_models(model, clip if te_net else None, lora, 1.0, 1.0)
        log.info("trained %d LoRA modules; loss %.4f -> %.4f", len(tensors) // 3, losses[0], losses[-1])
        return io.NodeOutput(out_model, out_clip if te_net else clip, lora, {"loss": losses})


NODES = [PersonalizeTrainLoRA]
