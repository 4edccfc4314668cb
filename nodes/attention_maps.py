"""Personalize Attention Maps: where each chosen word of the prompt looks, as images.

One model evaluation of the given latent, noised to ``at_percent`` of the schedule, through a patched clone that
keeps only the chosen words' columns of the cross-attention maps (``edits.selected_maps``)."""
from __future__ import annotations

import comfy.sample
import comfy.samplers
import torch
import torch.nn.functional as F
from comfy_api.latest import io

from ..attention.edits import selected_maps
from ..attention.tokens import word_positions
from ..training.errors import InputError
from .attention_hooks import (
    COND,
    chunks,
    downscale,
    fused_attention,
    set_replace,
    transformer_blocks,
)
from .attention_text import encode, prompt_tokens, word_tokenizer

RESOLUTIONS = {"latent/1": 1, "latent/2": 2, "latent/4": 4, "latent/8": 8, "all": 0}


class _Recorder:
    def __init__(self, columns: list[torch.Tensor], factor: int):
        self.columns, self.factor = columns, factor
        self.sum: torch.Tensor | None = None  # [B, words, H, W] at latent size
        self.layers = 0

    def make(self, previous):
        def replace(q, k, v, extra_options):
            factor = downscale(extra_options)
            if self.factor in (0, factor):
                latent_hw, hw = extra_options["original_shape"][-2:], extra_options["activations_shape"][-2:]
                for kind, rows in chunks(extra_options, q.shape[0]):
                    if kind != COND:
                        continue
                    maps = torch.stack([selected_maps(q[rows], k[rows], extra_options["n_heads"], c).sum(-1)
                                        for c in self.columns], dim=1).view(-1, len(self.columns), *hw)
                    maps = F.interpolate(maps, size=tuple(latent_hw), mode="bilinear").cpu()
                    self.sum = maps if self.sum is None else self.sum + maps
                    self.layers += 1
            return fused_attention(extra_options, previous)(q, k, v)
        return replace


class PersonalizeAttentionMaps(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PersonalizeAttentionMaps",
            display_name="Personalize Attention Maps",
            category="personalize/attention",
            description="Shows where chosen words attend in an image: the latent is noised to a point of the "
                        "schedule and denoised once; the words' cross-attention maps come out as images "
                        "(one per latent and word, in the order given).",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.String.Input("text", multiline=True, default="a photo of a cat riding a bicycle",
                                tooltip="The prompt the latent was made with (the maps are where its words attend)."),
                io.String.Input("words", default="cat, bicycle", tooltip="Comma-separated words or phrases."),
                io.Latent.Input("latent", tooltip="The image's latent (e.g. the sampler's output)."),
                io.Combo.Input("resolution", options=list(RESOLUTIONS), default="latent/4",
                               tooltip="Which layers: their feature map size relative to the latent; all = mean."),
                io.Float.Input("at_percent", default=0.5, min=0.0, max=0.99, step=0.01,
                               tooltip="Noise level to look at (0 = pure noise, near 1 = almost clean)."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1,
                             tooltip="The noise added to the latent to reach at_percent."),
            ],
            outputs=[io.Image.Output(display_name="maps")],
        )

    @classmethod
    def execute(cls, model, clip, text, words, latent, resolution, at_percent, seed) -> io.NodeOutput:
        names = [w.strip() for w in words.replace("\n", ",").split(",") if w.strip()]
        if not names:
            raise InputError("words", "name at least one word of the text, e.g. 'cat, bicycle'")
        if resolution not in RESOLUTIONS:
            raise InputError("resolution", f"must be one of {', '.join(RESOLUTIONS)}")
        if not 0.0 <= at_percent < 1.0:  # NaN too (ComfyUI's range check lets it through); at 1 there is no noise
            raise InputError("at_percent", f"must be at least 0 and below 1, got {at_percent}")
        tokens = prompt_tokens(clip, text)
        positions = word_positions(tokens, names, word_tokenizer(clip), prompt_text=text)
        recorder = _Recorder([torch.tensor(positions[n]) for n in names], RESOLUTIONS[resolution])
        m = model.clone()
        # guidance that calls the model again (PAG's perturbed pass, SAG's blurred one) would add its maps in; one
        # evaluation of the prompt is what is shown
        for name in ("sampler_pre_cfg_function", "sampler_cfg_function", "sampler_post_cfg_function"):
            m.model_options.pop(name, None)
        for block in transformer_blocks(m):
            set_replace(m, "attn2", block, recorder.make)
        samples = comfy.sample.fix_empty_latent_channels(m, latent["samples"])
        sigma = float(m.get_model_object("model_sampling").percent_to_sigma(at_percent))
        positive = encode(clip, text)
        noise = comfy.sample.prepare_noise(samples, seed)
        comfy.sample.sample_custom(m, noise, 1.0, comfy.samplers.sampler_object("euler"),
                                   torch.tensor([sigma, 0.0]), positive, positive, samples, seed=seed,
                                   disable_pbar=True)
        if recorder.sum is None:
            raise InputError("resolution", f"the model has no cross-attention layer at {resolution}; pick another")
        maps = recorder.sum / recorder.layers
        maps = maps / maps.flatten(2).amax(-1).clamp_min(1e-12)[..., None, None]
        maps = F.interpolate(maps, scale_factor=8, mode="bilinear").clamp(0, 1)  # latent -> pixels
        images = maps.flatten(0, 1)[..., None].expand(-1, -1, -1, 3).contiguous()
        return io.NodeOutput(images)


NODES = [PersonalizeAttentionMaps]
