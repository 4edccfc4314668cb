"""Personalize Attention Reweight: scale how much the image attends to chosen words of the prompt."""
from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from ..attention.tokens import parse_word_weights, token_weights, word_positions
from ..training.errors import InputError
from .attention_hooks import APPLY_TO, percent_window, replaces_cross_attention, transformer_blocks
from .attention_text import encode, paired_conditioning, paired_latent, prompt_tokens, word_tokenizer
from .p2p_patches import CrossPlan, install, p2p_cross_replace, renormalized_replace, value_reweight_patch

log = logging.getLogger(__name__)
MODES = ("value", "renormalized", "p2p_locked")


def window_inputs(start: float = 0.0, end: float = 1.0, prefix: str = "") -> list:
    return [
        io.Float.Input(f"{prefix}start_percent", default=start, min=0.0, max=1.0, step=0.01,
                       tooltip="Fraction of sampling (0 = first step) at which the edit starts."),
        io.Float.Input(f"{prefix}end_percent", default=end, min=0.0, max=1.0, step=0.01,
                       tooltip="Fraction of sampling at which the edit stops."),
    ]


class PersonalizeAttentionReweight(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PersonalizeAttentionReweight",
            display_name="Personalize Attention Reweight",
            category="personalize/attention",
            description="Encodes the prompt and patches a copy of the model so chosen words get more (or less, "
                        "or negative) attention. value: scales the words' attention, zero overhead. renormalized: "
                        "softmax bias log(w), the other words give way. p2p_locked: reweights on the layout of the "
                        "unweighted image (one run makes both; use the CONDITIONING and LATENT outputs).",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.String.Input("text", multiline=True, default="a photo of a red car on a street",
                                tooltip="The prompt; its encoding is the CONDITIONING output."),
                io.String.Input("words", multiline=True, default="red:2.0",
                                tooltip="word:weight per line or comma; phrases allowed; weights may be negative "
                                        "(except renormalized); 1 = unchanged, 0 = ignore the word."),
                io.Combo.Input("mode", options=list(MODES), default="value"),
                io.Combo.Input("apply_to", options=list(APPLY_TO), default="cond",
                               tooltip="Which prompt the weights act on: cond = positive (the text above)."),
                *window_inputs(),
                io.Latent.Input("latent", optional=True,
                                tooltip="p2p_locked: the empty latent; the output holds each image twice "
                                        "(unweighted, reweighted) with the same noise."),
            ],
            outputs=[io.Model.Output(), io.Conditioning.Output(display_name="positive"),
                     io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, model, clip, text, words, mode, apply_to, start_percent, end_percent,
                latent=None) -> io.NodeOutput:
        if mode not in MODES:
            raise InputError("mode", f"must be one of {', '.join(MODES)}")
        blocks = transformer_blocks(model)
        window = percent_window(model, start_percent, end_percent, ("start_percent", "end_percent"))
        weighted = parse_word_weights(words)
        tokens = prompt_tokens(clip, text)
        positions = word_positions(tokens, [w for w, _ in weighted], word_tokenizer(clip))
        weights = token_weights(tokens.length, positions, dict(weighted))
        if mode == "renormalized" and bool((weights < 0).any()):
            raise InputError("words", "renormalized mode needs weights >= 0; use value mode for negative weights")
        if mode == "renormalized" and any(replaces_cross_attention(model, b) for b in blocks):
            # its logit bias needs the attention kernel itself; it cannot pass a bias through another replace
            raise InputError("mode", "another node already replaces cross-attention on this model (IPAdapter, "
                                     "a Dual-Path blend or similar), which renormalized mode would drop; use value "
                                     "or p2p_locked mode, which run on top of it")
        m = model.clone()
        positive = encode(clip, text)
        if mode == "value":
            m.set_model_attn2_patch(value_reweight_patch(weights, APPLY_TO[apply_to], window))
        elif mode == "renormalized":
            install(m, blocks, "attn2", renormalized_replace(weights, APPLY_TO[apply_to], window))
        else:
            if latent is None:
                raise InputError("latent", "p2p_locked needs the empty latent (it doubles it into pairs)")
            if apply_to != "cond":
                log.warning("p2p_locked reweights the positive prompt only; apply_to=%s ignored", apply_to)
            plan = CrossPlan(torch.eye(tokens.length), torch.ones(tokens.length), weights, window)
            install(m, blocks, "attn2", p2p_cross_replace(plan, None))
            positive = paired_conditioning(positive, positive)
            latent = paired_latent(latent)
        return io.NodeOutput(m, positive, latent)


NODES = [PersonalizeAttentionReweight]
