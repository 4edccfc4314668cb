"""Personalize Train LoRA: train a LoRA on the loaded checkpoint, in this process, and return it applied."""
from __future__ import annotations

import logging

import comfy.sd
import folder_paths
import torch
from comfy_api.latest import io

from ..training.errors import InputError
from ..training.files import BUNDLED_EMBEDDING, load_safetensors, lora_metadata
from ..training.lora import UNET_TARGET_PRESETS, LoRANetwork, TrainedLoRA
from .session import (
    ALPHA_TOOLTIP,
    RANK_TOOLTIP,
    TARGETS_TOOLTIP,
    TrainingSession,
    common_inputs,
    save_intermediate,
)

log = logging.getLogger(__name__)
NONE = "none"


def lora_files() -> list[str]:
    return [NONE] + [f for f in folder_paths.get_filename_list("loras") if f.endswith(".safetensors")]


def load_resume(nets: list[LoRANetwork], name: str) -> None:
    """Continue from a saved LoRA of the same shape (our own files, or kohya files of the same targets/rank)."""
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise InputError("resume_from", f"{name!r} is not in models/loras")
    sd = load_safetensors(path, "resume_from", "a LoRA")
    if not any(k.startswith(("lora_unet_", "lora_te")) for k in sd):
        raise InputError("resume_from", f"{name} is not a kohya-format LoRA (keys such as {sorted(sd)[:2]}); resume "
                                        "continues a LoRA this pack (or kohya) trained")
    fix = "pick the same targets, rank and text-encoder setting it was trained with"
    # the file's adapters this run would not train: resuming without them would silently drop part of the LoRA
    # (a bundled word is not an adapter: the LoRA resumes, the word is Train Pivotal's)
    adapters = {k.split(".")[0] for k in sd if not k.startswith(BUNDLED_EMBEDDING)}
    left_out = sorted(adapters - {a for net in nets for a in net.adapters})
    if left_out:
        raise InputError("resume_from", f"{name} has {len(left_out)} adapters this run does not train (e.g. "
                                        f"{', '.join(left_out[:2])}); {fix}")
    for net in nets:
        mine = {k: v for k, v in sd.items() if k.split(".")[0] in net.adapters}
        try:
            net.load_kohya_state_dict(mine)
        except ValueError as e:
            raise InputError("resume_from", f"{name} does not match this LoRA's targets/rank ({e}); {fix}") from e


class PersonalizeTrainLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PersonalizeTrainLoRA",
            display_name="Personalize Train LoRA",
            category="personalize/training",
            description="Trains a LoRA on the connected checkpoint in this ComfyUI process and returns the model "
                        "and CLIP with it applied, the LoRA weights (kohya keys) and the loss per step.",
            inputs=common_inputs(learning_rate=1e-4) + [
                io.Int.Input("rank", default=8, min=1, max=256, tooltip=RANK_TOOLTIP),
                io.Float.Input("alpha", default=8.0, min=0.01, max=1024.0, step=0.5, tooltip=ALPHA_TOOLTIP),
                io.Combo.Input("targets", options=list(UNET_TARGET_PRESETS), default="attention",
                               tooltip=TARGETS_TOOLTIP),
                io.Boolean.Input("train_text_encoder", default=False,
                                 tooltip="Also a LoRA on the text encoder's attention and MLPs (same learning rate; "
                                         "the file then needs LoraLoader's strength_clip too)."),
                io.Combo.Input("resume_from", options=lora_files(), default=NONE,
                               tooltip="Continue training a LoRA saved in models/loras."),
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
    def execute(cls, model, clip, vae, dataset, steps, learning_rate, batch_size, seed, dtype,
                gradient_checkpointing, rank, alpha, targets, train_text_encoder, resume_from=NONE, prior=None,
                options=None) -> io.NodeOutput:
        session = TrainingSession(model, clip, vae, dataset, prior, options,
                                  dict(steps=steps, learning_rate=learning_rate, batch_size=batch_size, seed=seed,
                                       dtype=dtype, gradient_checkpointing=gradient_checkpointing),
                                  cls.hidden.unique_id)
        host = session.host
        with torch.inference_mode(False), torch.enable_grad():  # ComfyUI runs nodes in inference mode
            # Trainable tensors must be made here: tensors created in inference mode never track gradients.
            unet_net = LoRANetwork(host.unet_lora_targets(targets), rank, alpha, seed=seed)
            te_net = (LoRANetwork(host.text_encoder_lora_targets(), rank, alpha, seed=seed + 1)
                      if train_text_encoder else None)
            nets = [n for n in (unet_net, te_net) if n is not None]
            if resume_from != NONE:
                load_resume(nets, resume_from)
                if nets[0].alpha != alpha:  # the file's scale keeps what was trained; the metadata says so too
                    log.warning("resume_from: %s was trained with alpha %g; continuing with it, not %g",
                                resume_from, nets[0].alpha, alpha)
                    alpha = nets[0].alpha
            data = session.data(text_trains=te_net is not None)
            for n in nets:
                n.to(host.model.load_device)

            def make_lora(step: int | None = None) -> TrainedLoRA:
                tensors = {k: v for n in nets for k, v in n.kohya_state_dict(torch.float32).items()}
                meta = lora_metadata(
                    base_model=host.family, rank=rank, alpha=alpha, learning_rate=learning_rate,
                    steps=step or steps, batch_size=batch_size, resolution=session.size,
                    num_images=len(dataset), seed=seed, title="Personalize LoRA",
                    text_encoder_trained=te_net is not None, prediction=host.prediction, targets=targets,
                    **session.schedule_metadata(), captions=dataset.captions,
                    extra={"captions": sorted(set(dataset.captions)), "prior": prior.mode if prior else "none"})
                return TrainedLoRA(tensors, meta)

            def save(step: int) -> str:
                lora = make_lora(step)
                return save_intermediate("loras", f"lora_step{step:05d}", {k: v.half() for k, v in lora.items()},
                                         lora.metadata)

            losses = session.run(data, [p for n in nets for p in n.parameters()], [n.attached() for n in nets],
                                 text_trains=te_net is not None, frozen=lambda: _all_disabled(nets), save=save)
        lora = make_lora()
        lora.metadata["ss_personalize_final_loss"] = f"{losses[-1]:.6g}"
        # The stock LoraLoader's own path, so the returned model equals loading the saved file.
        out_model, out_clip = comfy.sd.load_lora_for_models(model, clip if te_net else None, lora, 1.0, 1.0)
        log.info("trained %d LoRA modules; loss %.4f -> %.4f", len(lora) // 3, losses[0], losses[-1])
        return io.NodeOutput(out_model, out_clip if te_net else clip, lora, {"loss": losses})


def _all_disabled(nets: list[LoRANetwork]):
    from contextlib import ExitStack

    stack = ExitStack()
    for n in nets:
        stack.enter_context(n.disabled())
    return stack


NODES = [PersonalizeTrainLoRA]
