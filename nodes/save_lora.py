"""Personalize Save LoRA: write a LoRA into models/loras as kohya-key safetensors with training metadata."""
from __future__ import annotations

import logging
import os

import folder_paths
import torch
from comfy_api.latest import io, ui

from ..training.embedding import TrainedEmbedding
from ..training.errors import InputError
from ..training.files import BUNDLED_EMBEDDING, IF_EXISTS, resolve_output_path, save_safetensors_atomic
from .session import IF_EXISTS_TOOLTIP, NAME_TOOLTIP
from .types import Embedding

log = logging.getLogger(__name__)
_SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def bundled(embedding) -> dict[str, torch.Tensor]:
    """kohya's bundled-embedding keys, which A1111/Forge's Lora extension loads as an embedding named after the
    token: ``bundle_emb.<token>.<clip_l|clip_g|clip_h>`` (the same ``{encoder: [n, D]}`` as an embedding file), in
    fp32 like embedding files."""
    if not isinstance(embedding, TrainedEmbedding) or not embedding:
        raise InputError("bundle_embedding", "connect the embedding output of a Personalize pivotal or Fast Tune "
                                             "node")
    return {f"{BUNDLED_EMBEDDING}{embedding.token}.{key}": v.detach().to("cpu", torch.float32).contiguous()
            for key, v in embedding.items()}


class PersonalizeSaveLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PersonalizeSaveLoRA",
            display_name="Personalize Save LoRA",
            category="personalize/training",
            description="Saves a LoRA to models/loras (kohya keys: loads in LoraLoader, A1111 and Forge). A "
                        "DreamBooth weight difference is saved too (kohya names where A1111 reads them; for "
                        "A1111/Forge, Save Checkpoint is exact).",
            inputs=[
                io.LoraModel.Input("lora"),
                io.String.Input("name", default="personalize_lora", tooltip=NAME_TOOLTIP),
                io.String.Input("subfolder", default="", tooltip="Optional folder inside models/loras."),
                io.Combo.Input("save_dtype", options=list(_SAVE_DTYPES), default="fp16",
                               tooltip="fp16: half the size of fp32, what LoRAs are usually shared in."),
                io.Combo.Input("if_exists", options=list(IF_EXISTS), default="increment", tooltip=IF_EXISTS_TOOLTIP),
                Embedding.Input("bundle_embedding", optional=True,
                                tooltip="Pivotal / Fast Tune: put the learned word in the file too (bundle_emb.*), so "
                                        "A1111/Forge load it with the LoRA and prompts use the bare token. ComfyUI "
                                        "reads embeddings from models/embeddings only (LoraLoader logs the bundled "
                                        "keys as not loaded): save the embedding too."),
            ],
            outputs=[io.String.Output(display_name="lora_name")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, lora, name, subfolder, save_dtype, if_exists, bundle_embedding=None) -> io.NodeOutput:
        if not isinstance(lora, dict) or not lora:
            raise InputError("lora", "is empty; connect the lora output of a training node")
        folder = folder_paths.get_folder_paths("loras")[0]
        path = resolve_output_path(folder, subfolder, name, ".safetensors", if_exists)
        dtype = _SAVE_DTYPES[save_dtype]
        tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in lora.items()}
        metadata = dict(getattr(lora, "metadata", {}) or {})
        metadata["ss_output_name"] = path.stem
        if bundle_embedding is not None:
            tensors.update(bundled(bundle_embedding))
            metadata["personalize.bundled_embedding"] = bundle_embedding.token
        save_safetensors_atomic(tensors, path, metadata)
        rel = os.path.relpath(path, folder)
        log.info("saved LoRA %s (%d tensors)", path, len(tensors))
        return io.NodeOutput(rel, ui=ui.PreviewText(f"saved models/loras/{rel}"))


NODES = [PersonalizeSaveLoRA]
