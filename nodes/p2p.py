"""Personalize P2P: prompt-to-prompt word swap / refinement in one sampling run (source and edited image)."""
from __future__ import annotations

import logging

import torch
from comfy.patcher_extension import WrappersMP
from comfy_api.latest import io

from ..attention.align import auto_mapper, refine_mapper, swap_mapper
from ..attention.local_blend import LocalBlend
from ..attention.tokens import parse_word_weights, token_weights, word_positions
from ..training.errors import InputError
from .attention_hooks import (
    COND,
    EMPTY_WINDOW,
    check_fraction,
    check_prompt_lengths,
    percent_window,
    sampled_prompts,
    transformer_blocks,
)
from .attention_reweight import window_inputs
from .attention_text import (
    encode,
    pair_fresh_noise,
    paired_conditioning,
    paired_latent,
    prompt_tokens,
    refuse_second_pairing,
    word_tokenizer,
    words_with_positions,
)
from .p2p_patches import BlendRecorder, CrossPlan, install_cross, install_self_injection, low_resolution

log = logging.getLogger(__name__)
MODES = ("auto", "swap", "refine")


class PersonalizeP2P(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PersonalizeP2P",
            display_name="Personalize P2P (Prompt-to-Prompt)",
            category="personalize/attention",
            description="Edits an image by editing its prompt while keeping the layout: the edited image attends "
                        "with the source image's attention maps. One sampling run makes both (the LATENT output "
                        "holds source, edited pairs with shared noise; samplers that add noise every step draw "
                        "it once per pair).",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.String.Input("source", multiline=True, default="a photo of a cat riding a bicycle",
                                tooltip="The prompt of the image whose layout is kept (the first of each pair)."),
                io.String.Input("target", multiline=True, default="a photo of a dog riding a bicycle",
                                tooltip="The edited prompt (the second of each pair). Connect this node's "
                                        "positive and latent to the sampler: they hold both."),
                io.Latent.Input("latent", tooltip="The empty latent (any batch size)."),
                io.Combo.Input("mode", options=list(MODES), default="auto",
                               tooltip="swap: same number of words, some replaced. refine: words added or "
                                       "removed (global token alignment). auto: swap when word counts match."),
                *window_inputs(0.0, 0.8, "cross_"),
                io.String.Input("word_windows", default="",
                                tooltip="Per target word, the share of the schedule its maps are injected (as "
                                        "cross_end_percent), e.g. 'dog:0.4' (less = more freedom for that word's "
                                        "shape)."),
                *window_inputs(0.0, 0.4, "self_"),
                io.String.Input("reweight", default="", tooltip="word:weight of target words, e.g. 'fluffy:2'."),
                io.String.Input("blend_words", default="",
                                tooltip="Local blend: words (of the source and/or target) whose region may "
                                        "change; everything else stays as in the source image. Empty = off."),
                io.Float.Input("blend_threshold", default=0.3, min=0.0, max=1.0, step=0.01,
                               tooltip="Local blend: where the words' summed attention exceeds this share of its "
                                       "maximum, the image may change (the paper's 0.3; lower = larger region)."),
                io.Float.Input("blend_start_percent", default=0.2, min=0.0, max=1.0, step=0.01,
                               tooltip="Local blend: from this share of the schedule on, the image outside the "
                                       "words' region is taken from the source."),
            ],
            outputs=[io.Model.Output(), io.Conditioning.Output(display_name="positive"),
                     io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, model, clip, source, target, latent, mode, cross_start_percent, cross_end_percent,
                word_windows, self_start_percent, self_end_percent, reweight, blend_words, blend_threshold,
                blend_start_percent) -> io.NodeOutput:
        if mode not in MODES:
            raise InputError("mode", f"must be one of {', '.join(MODES)}")
        blocks = transformer_blocks(model)
        cross = percent_window(model, cross_start_percent, cross_end_percent,
                               ("cross_start_percent", "cross_end_percent"))
        self_window = percent_window(model, self_start_percent, self_end_percent,
                                     ("self_start_percent", "self_end_percent"))
        check_fraction(blend_threshold, "blend_threshold")  # NaN made the mask empty: the edit vanished, silently
        check_fraction(blend_start_percent, "blend_start_percent")
        src, tgt = prompt_tokens(clip, source), prompt_tokens(clip, target)
        if src.length != tgt.length:
            raise InputError("target", "the source and target prompts tokenize to a different number of 77-token "
                                       "chunks; make their lengths similar")
        ids_of = word_tokenizer(clip)
        if mode == "swap":
            mapper = swap_mapper(words_with_positions(clip, source, src, "source"),
                                 words_with_positions(clip, target, tgt, "target"), tgt.length)
            alphas = torch.ones(tgt.length)
        elif mode == "auto" and len(source.split()) == len(target.split()):
            try:  # a word swap needs every word placed in the tokens (no embeddings or (weights))
                words = (words_with_positions(clip, source, src, "source"),
                         words_with_positions(clip, target, tgt, "target"))
            except InputError as e:
                log.info("P2P auto mode: refine, since the words cannot be paired for a swap (%s)", e)
                words = None
            if words is None:
                mapper, alphas = refine_mapper(src, tgt)
            else:
                mapper, alphas, _ = auto_mapper(src, tgt, *words)
        else:
            mapper, alphas = refine_mapper(src, tgt)
        equalizer = torch.ones(tgt.length)
        if reweight.strip():
            weighted = parse_word_weights(reweight, "reweight")
            equalizer = token_weights(tgt.length, word_positions(tgt, [w for w, _ in weighted], ids_of, "reweight",
                                                                    prompt_text=target),
                                      dict(weighted))
        token_windows = {}
        if word_windows.strip():
            sampling = model.get_model_object("model_sampling")
            for word, end in parse_word_weights(word_windows, "word_windows"):
                if not 0.0 <= end <= 1.0:
                    raise InputError("word_windows", f"'{word}:{end:g}': the end of a word's window is a fraction "
                                                     "of sampling, from 0 to 1 (e.g. 'bus:0.4')")
                # the word's own window from the shared start (also when the shared window has no width); of no
                # width, or ending before the start, it is off
                w = (EMPTY_WINDOW if end <= cross_start_percent else
                     (float(sampling.percent_to_sigma(cross_start_percent)), float(sampling.percent_to_sigma(end))))
                for pos in word_positions(tgt, [word], ids_of, "word_windows", prompt_text=target)[word]:
                    token_windows[pos] = w
        plan = CrossPlan(mapper.float(), alphas.float(), equalizer.float(), cross, token_windows)
        recorder = None
        if blend_words.strip():
            recorder = cls._blend(model, src, tgt, blend_words, ids_of, blend_threshold, blend_start_percent)
        refuse_second_pairing(model, "P2P")
        m = model.clone()
        install_cross(m, blocks, plan, recorder)
        if self_end_percent > self_start_percent:
            install_self_injection(m, self_window)
        if recorder is not None:
            # a function, not the bound method: a clone deep-copies model_options, and a bound method's copy
            # carries a copy of the recorder, which the attn2 replaces never fill (any node after this one
            # turned local blend off)
            m.set_model_sampler_post_cfg_function(lambda args: recorder.post_cfg(args))
        pair_fresh_noise(m, "P2P")
        check_prompt_lengths(m, {COND: tgt.length}, "source", "the source prompt",
                             "connect this node's positive output (source and target paired) to the sampler")
        refuse_unpaired_positive(m)
        positive = paired_conditioning(encode(clip, source), encode(clip, target))
        return io.NodeOutput(m, positive, paired_latent(latent))

    @staticmethod
    def _blend(model, src, tgt, blend_words, ids_of, threshold, start_percent) -> BlendRecorder:
        words = [w.strip() for w in blend_words.replace("\n", ",").split(",") if w.strip()]
        if not words:
            raise InputError("blend_words", "names no word; write words of the prompts separated by commas (e.g. "
                                            "'car, bus'), or leave it empty to turn local blend off")
        src_pos, tgt_pos = [], []
        for word in words:
            ids = ids_of(word)
            found_src, found_tgt = src.find(ids), tgt.find(ids)
            if not found_src and not found_tgt:
                raise InputError("blend_words", f"'{word}' is in neither the source nor the target prompt")
            src_pos += found_src
            tgt_pos += found_tgt
        local = LocalBlend(torch.tensor(src_pos, dtype=torch.long), torch.tensor(tgt_pos, dtype=torch.long),
                           threshold)
        start = float(model.get_model_object("model_sampling").percent_to_sigma(start_percent))
        return BlendRecorder(local, low_resolution(model), start)


def refuse_unpaired_positive(model) -> None:
    """OUTER_SAMPLE wrapper: the sampler's positive must be the node's pair (source, target). One prompt of one's
    own is repeated over both rows: source and target are then the same image, silently."""
    def wrapper(executor, *args, **kwargs):
        for got in sampled_prompts(executor, COND):
            if got.shape[0] != 2:
                raise InputError("target", f"P2P: the sampler's positive holds {got.shape[0]} prompt(s), not this "
                                           "node's source/target pair, so both images would be the same; connect "
                                           "this node's positive output to the sampler")
        return executor(*args, **kwargs)
    model.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, "personalize_p2p_pair", wrapper)


NODES = [PersonalizeP2P]

