"""Personalize Fast Tune: one-image personalisation in a few dozen steps (DATE-style encoder init + fast tune,
without a pretrained encoder). The word starts at real tokens (the init word's embedding), the attention LoRA at
zero; both tune together at a high learning rate with the nearest-neighbour contrastive regulariser (the word
stays near real words) and L2 toward the start (the weights stay near the model); with a_blend < 1 through the
Dual-Path blend, as DATE tunes (nodes/dual_path_training.py). The training is pivotal tuning's
(nodes/train_embedding.py); this node sets its fast-tune defaults, regularisers and blend."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..training.errors import InputError
from ..training.lora import UNET_TARGET_PRESETS
from .session import ALPHA_TOOLTIP, RANK_TOOLTIP, TARGETS_TOOLTIP, common_inputs
from .train_embedding import INIT_WORD_TOOLTIP, pivotal_output_sockets, pivotal_outputs

log = logging.getLogger(__name__)


class PersonalizeFastTune(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PersonalizeFastTune",
            display_name="Personalize Fast Tune (one image)",
            category="personalize/training",
            description="Personalises from ONE image (or a few) in 12-50 steps: a new word, started at the init "
                        "word's embedding (the nearest real token), and an attention LoRA started at zero, tuned "
                        "together at lr 2e-3. The nearest-neighbour contrastive regulariser keeps the word near "
                        "real words and L2 keeps the LoRA near its start. Feed the LoRA and the CLIP to the "
                        "Dual-Path Attention Blend to keep the model's prior; a_blend below 1 tunes through it.",
            inputs=common_inputs(learning_rate=2e-3, steps=25) + [
                io.String.Input("token", default="", tooltip="The word the captions use for the subject (e.g. from "
                                "Personalize Identifier); prompts then use embedding:<token>."),
                io.String.Input("init_word", default="person", tooltip=INIT_WORD_TOOLTIP + " A word of several "
                                "tokens needs num_vectors = its token count to start from all of them."),
                io.Int.Input("num_vectors", default=1, min=1, max=16,
                             tooltip="Vectors the new word is made of (1 = one token, as a real word)."),
                io.Int.Input("rank", default=4, min=1, max=64, tooltip=RANK_TOOLTIP),
                io.Float.Input("alpha", default=4.0, min=0.01, max=1024.0, step=0.5, tooltip=ALPHA_TOOLTIP),
                io.Combo.Input("targets", options=list(UNET_TARGET_PRESETS), default="attention",
                               tooltip=TARGETS_TOOLTIP),
                io.Float.Input("nn_weight", default=0.01, min=0.0, max=10.0, step=0.001, round=False,
                               tooltip="Nearest-neighbour contrastive regulariser on the word, with a pull to that "
                                       "word's vector that keeps its length real (0: off)."),
                io.Float.Input("l2_weight", default=0.01, min=0.0, max=10.0, step=0.001, round=False,
                               tooltip="L2 of the LoRA's distance from its start: weight decay toward the start "
                                       "(0: off)."),
                io.Float.Input("a_blend", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Below 1: tune through the Dual-Path blend, as DATE does. Every attention "
                                       "layer mixes a * (caption, model + LoRA) and (1 - a) * (the caption with the "
                                       "word replaced by init_word (the picked one), the model alone). Then "
                                       "sample through the Dual-Path Attention Blend at the same a_blend, with paths "
                                       "self+cross for the attention targets or cross for cross_attention, on the "
                                       "model from before this node. At 1 (default) the LoRA is tuned plainly, and "
                                       "the model output is the tuned model."),
            ],
            outputs=pivotal_output_sockets(),
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, steps, learning_rate, batch_size, seed, dtype, gradient_checkpointing,
                token, init_word, num_vectors, rank, alpha, targets, nn_weight, l2_weight, a_blend=1.0, prior=None,
                options=None) -> io.NodeOutput:
        for name, value in (("nn_weight", nn_weight), ("l2_weight", l2_weight)):
            if not value >= 0:
                raise InputError(name, f"must be 0 (off) or positive, got {value}")
        if not 0.0 < a_blend <= 1.0:  # NaN too
            raise InputError("a_blend", f"must be above 0 (0 is the model alone, through which nothing trains) and "
                                        f"at most 1 (the LoRA tuned plainly); got {a_blend}")
        cfg_args = dict(steps=steps, learning_rate=learning_rate, batch_size=batch_size, seed=seed, dtype=dtype,
                        gradient_checkpointing=gradient_checkpointing)
        lora_args = dict(rank=rank, alpha=alpha, targets=targets, embedding_lr=learning_rate)
        out = pivotal_outputs(cls, model, clip, vae, dataset, prior, options, cfg_args, token, init_word, num_vectors,
                              lora_args, "Personalize fast-tune LoRA",
                              fast={"nn_weight": nn_weight, "l2_weight": l2_weight, "a_blend": a_blend})
        if a_blend < 1.0:
            log.info("Fast Tune tuned through the Dual-Path blend at a = %.2f: sample through the Dual-Path "
                     "Attention Blend at a_blend %.2f with paths %s, on the model from before Fast Tune (its MODEL "
                     "output has the LoRA at a = 1)", a_blend, a_blend,
                     "cross" if targets == "cross_attention" else "self+cross")
        return out


NODES = [PersonalizeFastTune]
