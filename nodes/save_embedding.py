"""Personalize Save Embedding: write learned token vectors to models/embeddings ({clip_l[, clip_g]} safetensors)."""
from __future__ import annotations

import logging
import os
import re

import folder_paths
from comfy_api.latest import io, ui

from ..training.embedding import TrainedEmbedding, check_token_name
from ..training.errors import InputError
from ..training.files import IF_EXISTS, resolve_output_path, save_safetensors_atomic
from .session import IF_EXISTS_TOOLTIP
from .types import Embedding

log = logging.getLogger(__name__)


class PersonalizeSaveEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PersonalizeSaveEmbedding",
            display_name="Personalize Save Embedding",
            category="personalize/training",
            description="Saves a learned embedding to models/embeddings; prompts in ComfyUI use embedding:<name> "
                        "(A1111/Forge load the same file).",
            inputs=[
                Embedding.Input("embedding"),
                io.String.Input("name", default="", tooltip="Empty = the token's name."),
                io.String.Input("subfolder", default="", tooltip="Optional folder inside models/embeddings; prompts "
                                "then use embedding:<subfolder>/<name>."),
                io.Combo.Input("if_exists", options=list(IF_EXISTS), default="increment", tooltip=IF_EXISTS_TOOLTIP),
            ],
            outputs=[io.String.Output(display_name="prompt_name", tooltip="Use as embedding:<prompt_name>.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, embedding, name, subfolder, if_exists) -> io.NodeOutput:
        if not isinstance(embedding, TrainedEmbedding) or not embedding:
            raise InputError("embedding", "connect the embedding output of a Personalize trainer")
        name = check_token_name(name, "name") if name.strip() else embedding.token
        for part in filter(None, re.split(r"[/\\]", subfolder.strip())):
            if re.search(r"[\s(),:]", part):  # a prompt reads embedding:sub/name up to a space, and ( ) , : are its
                raise InputError("subfolder", f"{part!r}: prompts could not name embedding:{part}/... (no spaces "
                                              "or ( ) , : in a folder name); use letters, digits, . _ or -")
        folder = folder_paths.get_folder_paths("embeddings")[0]
        path = resolve_output_path(folder, subfolder, name, ".safetensors", if_exists)
        tensors = {k: v.detach().to("cpu").float().contiguous() for k, v in embedding.items()}
        save_safetensors_atomic(tensors, path, embedding.metadata)
        prompt_name = os.path.splitext(os.path.relpath(path, folder))[0].replace(os.sep, "/")
        log.info("saved embedding %s (%s)", path, {k: tuple(v.shape) for k, v in tensors.items()})
        return io.NodeOutput(prompt_name, ui=ui.PreviewText(f"saved models/embeddings/{prompt_name}.safetensors; "
                                                            f"prompt with embedding:{prompt_name}"))


NODES = [PersonalizeSaveEmbedding]
