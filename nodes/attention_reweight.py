"""Personalize Attention Reweight: scale how much the image attends to chosen words of the prompt."""
from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from ..attention.tokens import parse_word_weights, token_weights, word_positions
from ..training.errors import InputError
from .attention_hooks import (
    APPLY_TO,
    COND,
    UNCOND,
    check_fraction,
    check_prompt_lengths,
    percent_window,
    replaces_cross_attention,
    transformer_blocks,
    warn_if_prompt_differs,
)
from .attention_text import (
    encode,
    pair_fresh_noise,
    paired_conditioning,
    paired_latent,
    prompt_tokens,
    refuse_second_pairing,
    word_tokenizer,
)
from .p2p_patches import (
    CrossPlan,
    install,
    install_self_injection,
    p2p_cross_replace,
    renormalized_replace,
    value_reweight_patch,
)

log = logging.getLogger(__name__)
MODES = ("value", "renormalized", "p2p_locked")
# Windows are ComfyUI's start/end percent (of the noise schedule, as ControlNet's); the paper counts steps.
SHARE = ("As ComfyUI's start/end percent it is a share of the noise schedule, not of the steps: with the "
         "normal, simple or ddim_uniform scheduler they agree (0.8 of 50 steps = 40, the paper's count); karras "
         "and exponential spend more steps at low noise, so 0.8 covers fewer steps (31 and 26 of 50).")


def window_inputs(start: float = 0.0, end: float = 1.0, prefix: str = "") -> list:
    return [
        io.Float.Input(f"{prefix}start_percent", default=start, min=0.0, max=1.0, step=0.01,
                       tooltip=f"Share of the noise schedule (0 = the first step) at which the edit starts. {SHARE}"),
        io.Float.Input(f"{prefix}end_percent", default=end, min=0.0, max=1.0, step=0.01,
                       tooltip=f"Share of the noise schedule at which the edit stops (equal to the start: "
                               f"off). {SHARE}"),
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
                io.Combo.Input("mode", options=list(MODES), default="value",
                               tooltip="value: scales the words' attention (no extra cost). renormalized: a softmax "
                                       "bias, so the other words give way. p2p_locked: reweights on the layout of "
                                       "the unweighted image (one run makes both; use this node's latent)."),
                io.Combo.Input("apply_to", options=list(APPLY_TO), default="cond",
                               tooltip="Which prompt the weights act on: cond = positive (the text above), uncond "
                                       "= negative (negative_text), both = each where its words are."),
                *window_inputs(),
                io.Latent.Input("latent", optional=True,
                                tooltip="p2p_locked: the empty latent; the output holds each image twice "
                                        "(unweighted, reweighted) with the same noise."),
                io.String.Input("negative_text", multiline=True, default="", optional=True,
                                tooltip="The negative prompt, for apply_to uncond or both: the words are found in "
                                        "it, and its encoding is the negative output; connect that to the "
                                        "sampler's negative."),
                io.Float.Input("self_end_percent", default=0.4, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="p2p_locked: the reweighted image also takes the unweighted one's "
                                       "self-attention (its layout) up to this share of the schedule, as the "
                                       "paper's reweighting does (0.4); 0 = cross-attention only."),
            ],
            outputs=[io.Model.Output(), io.Conditioning.Output(display_name="positive"),
                     io.Latent.Output(display_name="latent"), io.Conditioning.Output(display_name="negative")],
        )

    @classmethod
    def execute(cls, model, clip, text, words, mode, apply_to, start_percent, end_percent,
                latent=None, negative_text="", self_end_percent=0.4) -> io.NodeOutput:
        if mode not in MODES:
            raise InputError("mode", f"must be one of {', '.join(MODES)}")
        if apply_to not in APPLY_TO:
            raise InputError("apply_to", f"must be one of {', '.join(APPLY_TO)}")
        blocks = transformer_blocks(model)
        window = percent_window(model, start_percent, end_percent, ("start_percent", "end_percent"))
        weighted = parse_word_weights(words)
        if not weighted:
            raise InputError("words", "names no word; write word:weight entries, e.g. 'red:2.0, car:0.5'")
        if mode == "p2p_locked" and apply_to != "cond":
            log.warning("p2p_locked reweights the positive prompt only; apply_to=%s ignored", apply_to)
            apply_to = "cond"
        texts = {kind: text if kind == COND else negative_text for kind in APPLY_TO[apply_to]}
        if UNCOND in texts and not (negative_text or "").strip():
            raise InputError("negative_text", f"apply_to={apply_to} reweights words of the negative prompt: write "
                                              "it here, and connect this node's negative output to the sampler")
        try:
            weights = prompt_weights(clip, texts, weighted)
        except InputError as e:  # a word of the negative prompt with apply_to=cond: say where it is
            if UNCOND in texts or not (negative_text or "").strip():
                raise
            tokens, tokenize_word = prompt_tokens(clip, negative_text), word_tokenizer(clip)
            negative_words = [w for w, _ in weighted if tokens.find(tokenize_word(w))]
            if not negative_words:
                raise
            raise InputError("apply_to", f"{str(e).removeprefix('words: ')} {', '.join(negative_words)} "
                                         "is in negative_text: set apply_to to uncond or both") from e
        if mode == "renormalized" and any(bool((w < 0).any()) for w in weights.values()):
            raise InputError("words", "renormalized mode needs weights >= 0; use value mode for negative weights")
        if mode == "renormalized" and any(replaces_cross_attention(model, b) for b in blocks):
            # its logit bias needs the attention kernel itself; it cannot pass a bias through another replace
            raise InputError("mode", "another node already replaces cross-attention on this model (IPAdapter, "
                                     "a Dual-Path blend or similar), which renormalized mode would drop; use value "
                                     "or p2p_locked mode, which run on top of it")
        m = model.clone()
        positive, negative = encode(clip, text), encode(clip, negative_text or "")
        own = {COND: positive[0][0], UNCOND: negative[0][0]}  # the prompts the weights are laid out on
        if mode == "value":
            m.set_model_attn2_patch(value_reweight_patch(weights, window))
        elif mode == "renormalized":
            install(m, blocks, "attn2", renormalized_replace(weights, window), "Personalize Attention Reweight")
        else:
            if latent is None:
                raise InputError("latent", "p2p_locked needs the empty latent (it doubles it into pairs)")
            refuse_second_pairing(model, "Reweight p2p_locked")
            length = weights[COND].shape[0]
            plan = CrossPlan(torch.eye(length), torch.ones(length), weights[COND], window)
            install(m, blocks, "attn2", p2p_cross_replace(plan, None), "Personalize Attention Reweight")
            if check_fraction(self_end_percent, "self_end_percent") > 0:
                install_self_injection(m, percent_window(model, 0.0, self_end_percent,
                                                         ("self_end_percent", "self_end_percent")))
            positive = paired_conditioning(positive, positive)
            latent = paired_latent(latent)
            pair_fresh_noise(m, "Reweight p2p_locked")
        for kind, w in weights.items():  # each prompt's weights are laid out for its own token count
            name, output = ("text", "positive") if kind == COND else ("negative_text", "negative")
            check_prompt_lengths(m, {kind: w.shape[0]}, name, f"the {name}",
                                 f"connect this node's {output} output to the sampler, or write the prompt you "
                                 f"sample with in {name}")
        warn_if_prompt_differs(m, {kind: own[kind] for kind in weights}, "Attention Reweight",
                               {COND: "text", UNCOND: "negative_text"})
        return io.NodeOutput(m, positive, latent, negative)


def prompt_weights(clip, texts: dict[int, str], weighted: list[tuple[str, float]]) -> dict[int, torch.Tensor]:
    """Per chunk kind, the weights of its prompt's tokens. With one prompt every word must be in it; with both, each
    word must be in at least one of them and weighs where it is."""
    tokenize_word, found = word_tokenizer(clip), {}
    for kind, text in texts.items():
        tokens = prompt_tokens(clip, text)
        if len(texts) == 1:
            positions = word_positions(tokens, [w for w, _ in weighted], tokenize_word, prompt_text=text)
        else:
            positions = {w: rows for w, _ in weighted if (rows := tokens.find(tokenize_word(w)))}
        found[kind] = (tokens.length, positions)
    for word, _ in weighted:
        if not any(word in positions for _, positions in found.values()):
            raise InputError("words", f"'{word}' is in neither the prompt nor the negative prompt; write it exactly "
                                      "as it is spelled there")
    return {kind: token_weights(length, positions, dict(weighted)) for kind, (length, positions) in found.items()}


NODES = [PersonalizeAttentionReweight]
