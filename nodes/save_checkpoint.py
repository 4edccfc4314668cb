"""Personalize Save Checkpoint: write a trained MODEL/CLIP/VAE to models/checkpoints, atomically."""
from __future__ import annotations

import logging
import os

import comfy.model_base
import comfy.model_sampling
import comfy.sd
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..training.errors import InputError
from ..training.files import IF_EXISTS, architecture, resolve_output_path, write_atomic
from .comfy_adapter import model_family, model_prediction
from .session import IF_EXISTS_TOOLTIP, NAME_TOOLTIP

log = logging.getLogger(__name__)


def checkpoint_extras(model) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and marker tensors ComfyUI's CheckpointSave writes beside the weights, so that Load Checkpoint
    sets the same sampling up again: ``v_pred``, ``ztsnr`` (zero terminal SNR, which only this key turns on) and
    the EDM v-prediction sigmas; plus the modelspec architecture and prediction."""
    metadata: dict[str, str] = {}
    extra: dict[str, torch.Tensor] = {}
    sampling = model.get_model_object("model_sampling")
    if isinstance(sampling, comfy.model_sampling.ModelSamplingContinuousEDM) and isinstance(
            sampling, comfy.model_sampling.V_PREDICTION):
        extra["edm_vpred.sigma_max"] = torch.tensor(sampling.sigma_max).float()
        extra["edm_vpred.sigma_min"] = torch.tensor(sampling.sigma_min).float()
    # The prediction the model samples (and trained) with: a ModelSamplingDiscrete node (v_prediction, zsnr) on a
    # file without the markers must be saved with them, or the result reloads as eps.
    try:
        prediction = model_prediction(model)
    except InputError:  # EDM, flow, x0...: as ComfyUI's CheckpointSave decides, from the loaded type
        prediction = {comfy.model_base.ModelType.EPS: "eps",
                      comfy.model_base.ModelType.V_PREDICTION: "v"}.get(model.model.model_type)
    if prediction == "eps":
        metadata["modelspec.predict_key"] = "epsilon"
        if model.model.model_type == comfy.model_base.ModelType.V_PREDICTION:  # ComfyUI's writer adds v_pred
            log.warning("this model was loaded as v-prediction and samples as eps; the checkpoint keeps the v_pred "
                        "marker ComfyUI writes for it, so load it with ModelSamplingDiscrete set to eps")
    elif prediction == "v":
        metadata["modelspec.predict_key"] = "v"
        extra["v_pred"] = torch.tensor([])
        if getattr(sampling, "zsnr", False):
            extra["ztsnr"] = torch.tensor([])
    try:
        metadata["modelspec.architecture"] = architecture(model_family(model), prediction)
        metadata.update({"modelspec.sai_model_spec": "1.0.0", "modelspec.implementation": "sgm"})
    except InputError:
        pass  # a family the trainers do not know: saved as ComfyUI saves it, without an architecture
    return metadata, extra


def loader_note(model, extra_keys: dict) -> str | None:
    """What Load Checkpoint (ComfyUI 0.3.64) will not set up again by itself: it reads ``v_pred`` and ``ztsnr`` for
    SDXL only; SD1.x files load as eps and SD2 finds v-prediction from its weights but never zero terminal SNR."""
    try:
        family = model_family(model)
    except InputError:
        return None
    unread = {"sd1": ("v_pred", "ztsnr"), "sd2": ("ztsnr",)}.get(family, ())
    lost = [k for k in unread if k in extra_keys]
    if not lost:
        return None
    setting = "v_prediction" + (", zsnr on" if "ztsnr" in extra_keys else "")
    return (f"Load Checkpoint does not read {' and '.join(lost)} in {family.upper()} files: after loading this "
            f"one, add ModelSamplingDiscrete ({setting}), as the model was trained")


class PersonalizeSaveCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PersonalizeSaveCheckpoint",
            display_name="Personalize Save Checkpoint",
            category="personalize/training",
            description="Saves the model (with its patches merged), CLIP and VAE as one .safetensors checkpoint in "
                        "models/checkpoints, loadable by Load Checkpoint, A1111 and Forge.",
            inputs=[
                io.Model.Input("model"), io.Clip.Input("clip"), io.Vae.Input("vae"),
                io.String.Input("name", default="personalize_dreambooth", tooltip=NAME_TOOLTIP),
                io.String.Input("subfolder", default="", tooltip="Optional folder inside models/checkpoints."),
                io.Combo.Input("if_exists", options=list(IF_EXISTS), default="increment", tooltip=IF_EXISTS_TOOLTIP),
            ],
            outputs=[io.String.Output(display_name="ckpt_name")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, name, subfolder, if_exists) -> io.NodeOutput:
        folder = folder_paths.get_folder_paths("checkpoints")[0]
        path = resolve_output_path(folder, subfolder, name, ".safetensors", if_exists)
        metadata, extra_keys = checkpoint_extras(model)
        metadata.update({"modelspec.title": path.stem, "personalize.saved_by": "ComfyUI-Personalize"})
        # ComfyUI's own writer (CheckpointSave uses it): merges the patches, keeps the file layout loaders expect.
        write_atomic(path, lambda tmp: comfy.sd.save_checkpoint(tmp, model, clip, vae, metadata=metadata,
                                                                extra_keys=extra_keys))
        rel = os.path.relpath(path, folder)
        log.info("saved checkpoint %s", path)
        text = f"saved models/checkpoints/{rel}"
        note = loader_note(model, extra_keys)
        if note:
            log.warning(note)
            text += f"\nnote: {note}"
        return io.NodeOutput(rel, ui=ui.PreviewText(text))


NODES = [PersonalizeSaveCheckpoint]
