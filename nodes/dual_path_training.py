"""Fast Tune through the Dual-Path blend, as DATE tunes: in every attention layer the trained LoRA is the soft path's
dW, and the caption with the learned word replaced by its nearest real word is the hard path's prompt,

    out = a Block(x, soft caption, W + dW) + (1 - a) Block(x, hard caption, W).

The math is ``attention/dual_path.py``'s differentiable ``cross_blend`` / ``self_blend``, the functions the
Dual-Path node runs under autograd, so what is tuned is what that node samples. Here: which adapter is which layer's
delta, the hard captions, and the hooks on the trainer's UNet call (ComfyUI's replace route, as the node's).

The blended adapters are not hooked onto their layers while training (the blend adds their factors on the soft path
only); previews sample the LoRA hooked plainly, a = 1. A row whose prompt has no learned word (caption dropout's
empty prompt, the class prompt) is its own hard prompt: both paths read it, as the node does for the negative."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import torch

from ..attention.dual_path import AttentionDeltas, LowRankDelta, check_blend, cross_blend, self_blend
from ..training.errors import InputError
from ..training.lora import LoRANetwork
from ..training.task import Conditioning
from .attention_hooks import fused_attention, transformer_blocks
from .comfy_adapter import POOLED_WIDTH, ComfyHost
from .dual_path import add_delta_out, leave_out_delta, stash_patch, stashed_inputs
from .embeddings import hard_tokens, reads_embedding

log = logging.getLogger(__name__)
_HARD = "personalize_train_hard"  # transformer_options: the hard captions' context of this call's rows
_DELTAS_ON = "personalize_train_deltas"  # False under the trainer's frozen(): the base model, for prior targets
_PROJ = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"}


class TrainingBlend:
    """The blend on ``host``'s training calls for the adapters of ``net`` on attention projections. Attention
    layers with factors are blended; cross-attention layers without any still take the hard caption on their base
    path (the node blends every cross-attention layer alike)."""

    def __init__(self, host: ComfyHost, net: LoRANetwork, a: float):
        self.host, self.net, self.a = host, net, check_blend(a, 1)
        by_module = {id(m): name for name, m in net.targets.items()}
        self.layers: list[tuple[str, tuple, torch.nn.Module, dict[str, str]]] = []  # (attn, key, module, proj->name)
        for block in transformer_blocks(host.model):
            for attn in ("attn1", "attn2"):
                module = getattr(block.module, attn)
                names = {p: by_module[id(module.get_submodule(path))] for p, path in _PROJ.items()
                         if id(module.get_submodule(path)) in by_module}
                if names or attn == "attn2":
                    self.layers.append((attn, block.key, module, names))
        self.blended = {n for *_, names in self.layers for n in names.values()}
        outside = sorted(set(net.adapters) - self.blended)
        if outside:
            raise InputError("targets", f"training through the blend (a_blend < 1) covers attention q/k/v/out only; "
                                        f"{len(outside)} LoRA layers lie outside it (e.g. {outside[0]}): choose the "
                                        "attention or cross_attention targets, or set a_blend to 1")

    @property
    def blends_self(self) -> bool:
        return any(attn == "attn1" for attn, *_ in self.layers)

    def _deltas(self, names: dict[str, str], like: torch.Tensor) -> AttentionDeltas:
        """The layer's adapters as deltas reading the trained weights (views: gradients reach them)."""
        parts = {}
        for proj, name in names.items():
            adapter = self.net.adapters[name]
            down, up = adapter.factors(like)
            parts[proj] = LowRankDelta(down, up, adapter.scale)
        return AttentionDeltas(**parts)

    def _replace(self, attn: str, module: torch.nn.Module, names: dict[str, str]):
        def replace(q, k, v, extra_options):
            attend = fused_attention(extra_options)
            if not extra_options.get(_DELTAS_ON, True):
                return attend(q, k, v)  # the frozen model: every row's prompt is its own hard prompt there
            x, context, value = stashed_inputs(extra_options, q, k, v)
            deltas = self._deltas(names, q)
            if attn == "attn1":
                out, delta = self_blend(attend, q, k, v, x, deltas, self.a, context, value)
            else:
                hard = extra_options[_HARD]
                out, delta = cross_blend(attend, q, k, v, module.to_k(hard), module.to_v(hard), x, context, deltas,
                                         self.a, value)
            leave_out_delta(extra_options, delta)
            return out
        return replace

    def call_options(self, cond: Conditioning, y: torch.Tensor | None, options: dict, like: torch.Tensor):
        """(y, transformer options) of one trainer call: the rows' hard captions for the replaces, and SDXL's pooled
        text vector blended as the node blends it (the prompt also enters through y)."""
        if cond.hard is None:
            raise ValueError("training through the blend needs each row's hard caption")
        options[_HARD] = cond.hard.context.to(like.device, like.dtype)
        options[_DELTAS_ON] = self.net.enabled
        if y is not None and cond.hard.y is not None and self.net.enabled and self.host.family == "sdxl":
            hard_y = cond.hard.y.to(y.device, y.dtype)
            y = torch.cat([torch.lerp(hard_y[:, :POOLED_WIDTH], y[:, :POOLED_WIDTH], self.a), y[:, POOLED_WIDTH:]], 1)
        return y, options

    @contextmanager
    def attached(self) -> Iterator["TrainingBlend"]:
        """The replaces and patches on the host's training calls, and the adapters outside the blend hooked."""
        options = self.host.training_options
        before = {key: options.get(key) for key in ("patches", "patches_replace")}
        patches = {"attn2_patch": [stash_patch], "attn2_output_patch": [add_delta_out]}
        if self.blends_self:
            patches.update({"attn1_patch": [stash_patch], "attn1_output_patch": [add_delta_out]})
        replaces: dict[str, dict] = {"attn1": {}, "attn2": {}}
        for attn, key, module, names in self.layers:
            replaces[attn][key] = self._replace(attn, module, names)
        options["patches"], options["patches_replace"] = patches, replaces
        self.host.blend = self
        try:
            with self.net.attached(set(self.net.adapters) - self.blended):
                yield self
        finally:
            self.host.blend = None
            for key, value in before.items():
                if value is None:
                    options.pop(key, None)
                else:
                    options[key] = value

    def preview(self):
        """For preview samples: the blended adapters hooked plainly (a = 1), as the trainer's MODEL output has them."""
        return self.net.attached(self.blended)


def with_hard_captions(data, host: ComfyHost):
    """``data`` whose encoders give each prompt's hard caption too, encoded now (the learned vectors at their start,
    the init word: their nearest real tokens), with the text encoder as it is; fixed for the run."""
    encode, size, device = data.encode, data.buckets[0].size, host.model.load_device
    with torch.no_grad():  # every prompt now: encoded on first use, a caption would take the word trained so far
        hard_of = {p: host.encode_text([p], size, hard=True).to(device) for p in data.prompts()}

    def hard(captions) -> Conditioning:
        return Conditioning.cat([hard_of[c] for c in captions])

    learned = next((c for b in data.buckets for c in b.captions if reads_embedding(host.clip, c)), None)
    if learned is not None:  # the word to write in the Dual-Path node's hard prompt, if it is wired by hand
        log.info("tuning through the dual-path blend: the hard captions replace the learned word by %s",
                 "; ".join(hard_tokens(host.clip, learned)[1]))
    if data.prompt_encoder is not None:
        data.prompt_encoder = _WithHard(data.prompt_encoder, hard(list(data.prompt_encoder.prompts)))
    data.encode = lambda captions, size_hw: encode(captions, size_hw).with_hard(hard(list(captions)))
    return data


class _WithHard:
    """A device prompt encoder whose conditioning carries the prompts' hard captions."""

    def __init__(self, encoder, hard: Conditioning):
        self.encoder, self.hard, self.prompts = encoder, hard, encoder.prompts

    def __call__(self, size):
        return self.encoder(size).with_hard(self.hard)
