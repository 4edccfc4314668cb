"""Personalize Save Checkpoint: write a trained MODEL/CLIP/VAE to models/checkpoints, atomically."""
from __future__ import annotations

import logging
import os

import comfy.sd
import folder_paths
from comfy_api.latest import io, ui

from ..training.files import IF_EXISTS, resolve_output_path, write_atomic

log = logging.getLogger(__name__)


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
                io.String.Input("name", default="personalize_dreambooth"),
                io.String.Input("subfolder", default=""),
                io.Combo.Input("if_exists", options=list(IF_EXISTS), default="increment"),
            ],
            outputs=[io.String.Output(display_name="ckpt_name")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, name, subfolder, if_exists) -> io.NodeOutput:
        folder = folder_paths.get_folder_paths("checkpoints")[0]
        path = resolve_output_path(folder, subfolder, name, ".safetensors", if_exists)
        metadata = {"modelspec.title": path.stem, "personalize.saved_by": "ComfyUI-Personalize"}
        # ComfyUI's own writer (CheckpointSave uses it): merges the patches, keeps the file layout loaders expect.
        write_atomic(path, lambda tmp: comfy.sd.save_checkpoint(tmp, model, clip, vae, metadata=metadata))
        rel = os.path.relpath(path, folder)
        log.info("saved checkpoint %s", path)
        return io.NodeOutput(rel, ui=ui.PreviewText(f"saved models/checkpoints/{rel}"))


NODES = [PersonalizeSaveCheckpoint]
