"""The Dual-Path blend's cross-attention as the layer itself. Where nothing else stands in for a block's attn2, the
node object-patches that layer on its clone with ``DirectCrossAttention``: one forward over the host's own
projections and fused kernel, the soft and hard paths stacked on the batch axis, their k/v (values scaled by a and
1 - a) built once per run. ComfyUI's replace route would project the soft prompt's k/v at every step and call three
patches per layer (stash, replace, output add): more kernel launches and Python per layer, which is what a
launch-bound sampler pays for. Where the projections are plain linear layers on the sampler's device, their weights
are used as such (``attention.dual_path_weights``: the q pair by one batched GEMM, to_out with W + dW merged for
the run): six GPU operations per call instead of nine, one more than ComfyUI's own layer.

A replace that our nodes install on the block later sends the blend back to that route first (``demote``, called by
``attention_hooks.set_replace``), so it chains as before; another pack's replace added later would bypass the
layer, which the run start refuses (``check_not_bypassed``)."""
from __future__ import annotations

from typing import NamedTuple

import comfy.ldm.modules.attention as comfy_attention
import comfy.ops
import torch

from ..attention.dual_path import blend_pairs, scale_values_
from ..attention.dual_path_weights import merged_weight, paired_out, paired_projection, soft_out
from ..training.errors import InputError
from .attention_hooks import Block, existing_replace, row_kinds


class DirectCrossAttention(torch.nn.Module):
    """Stands in for one block's attn2 (a ComfyUI ``CrossAttention``) with the same call signature."""

    def __init__(self, original: torch.nn.Module, blend, block: Block):
        super().__init__()
        # the host's projections as children under their own names: weight patches (LoRA loaders), lowvram casts
        # and state dicts find them at the same keys; the original layer stays outside the module tree
        self.to_q, self.to_k, self.to_v, self.to_out = original.to_q, original.to_k, original.to_v, original.to_out
        self.heads, self.dim_head, self.attn_precision = original.heads, original.dim_head, original.attn_precision
        object.__setattr__(self, "original", original)
        object.__setattr__(self, "blend", blend)
        object.__setattr__(self, "block", block)

    @property
    def path(self) -> str:
        return f"{self.block.path}.attn2"

    def demote(self, model) -> None:
        """Back to ComfyUI's replace route on ``model`` (a clone): the original layer, the blend as its replace."""
        model.add_object_patch(self.path, self.original)
        self.blend.install_replace(model)

    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):
        context = x if context is None else context
        value = context if value is None else value
        if mask is not None or not self.blend.lean() or x.shape[0] != context.shape[0]:
            return self.blend.through_replace(self, x, context, value, transformer_options)  # the general route
        blend = self.blend
        a, deltas = blend.a_now(transformer_options), blend.sampling_deltas(x)

        def attend(q, k, v):
            return comfy_attention.optimized_attention(q, k, v, self.heads, attn_precision=self.attn_precision,
                                                       transformer_options=transformer_options)

        if a == 0.0:  # the base block on the hard prompt: no deltas
            return self.to_out(attend(self.to_q(x), *self.kv(transformer_options, context, value, "hard")))
        weights = self.run_weights(x, transformer_options, deltas)
        if a == 1.0:  # outside the window: the tuned block alone
            out = attend(deltas.plus_("q", self.to_q(x), x), *self.kv(transformer_options, context, value, "soft"))
            if weights is not None:
                return soft_out(out, weights.out_merged, weights.out_bias)
            return deltas.out_update(out, 1.0).apply_(self.to_out(out)) if "out" in deltas.parts else self.to_out(out)
        k2, v2 = self.kv(transformer_options, context, value, a)
        if weights is not None:
            q2 = paired_projection(x, weights.q_weight, weights.q_bias, deltas.parts.get("q"))
            return paired_out(attend(q2, k2, v2), weights.out_weight, weights.out_merged, weights.out_bias)
        out, update = blend_pairs(attend, deltas.paired_one("q", self.to_q(x), x), k2, v2, deltas, a, prescaled=True)
        n = self.to_out(out)
        return n if update is None else update.apply_(n)

    def kv(self, transformer_options: dict, context, value, what) -> tuple[torch.Tensor, torch.Tensor]:
        """k/v once per run and batch of conditionings (the blend's PromptCache): "soft" (W + dW on the soft prompt),
        "hard" (W on the hard prompt in positive rows, the row's own prompt elsewhere), or for a blend ``what`` = a,
        the [soft; hard] pair with its values scaled by a and 1 - a. Rows that repeat a prompt (the latent batch)
        are built and kept once and gathered at each call, k and v by one index_select: the kept k/v stay within the
        budget whatever the batch (SDXL, 4 images: a quarter of the bytes), and the gather is one GPU operation
        where ComfyUI's own layer projects k and v at every call."""
        blend = self.blend

        def build(rows):  # rows: the distinct rows' indices on the device, None for every row
            ctx = context if rows is None else context.index_select(0, rows)
            val = value if rows is None else ctx  # rows are only found where value is context
            k, v = self.to_k(ctx), self.to_v(val)
            if what == "soft":
                deltas = blend.sampling_deltas(k)
                return deltas.plus_("k", k, ctx), deltas.plus_("v", v, val)
            positive = blend.positive_rows(transformer_options, context)  # [B, 1, 1] over the whole batch
            if positive is not None and rows is not None:
                positive = positive.index_select(0, rows)
            if what == "hard":
                return blend.hard_rows(positive, k, v)
            k2, v2 = blend.paired_kv(positive, k, v, ctx, val)
            return k2, scale_values_(v2, what)

        def kinds() -> list[int]:  # rows of equal prompts differ if one is positive (it takes the hard prompt)
            return row_kinds(transformer_options, len(context))

        rows = blend.prompts.distinct_rows(transformer_options, context, kinds) if value is context else None
        if rows is None:
            return blend.prompts.get_or_make(transformer_options, context, lambda: build(None), tag=("direct", what))
        kept = blend.prompts.get_or_make(transformer_options, context, lambda: torch.stack(build(rows.first_index)),
                                         tag=("direct", what, "distinct rows"))
        return kept.index_select(1, rows.index if what in ("soft", "hard") else rows.pair_index).unbind(0)

    def run_weights(self, like: torch.Tensor, transformer_options: dict, deltas) -> RunWeights | None:
        """The projections' weights for this run, W + dW of to_out merged (``PromptCache.keep_for_run``, within its
        budget); None where a projection is not a plain linear layer on the sampler's device (its module computes
        it) or the run cannot keep W + dW: then the modules and the rank-r deltas. Made anew if the weights were
        moved or replaced within the run (a partial unload for another model)."""
        def make():
            q, out = plain_linear(self.to_q, like), self.plain_out(like)
            if q is None or out is None:
                return None, 0
            merged = merged_weight(out[1], deltas.parts.get("out"))
            kept = 0 if merged is out[1] else merged.numel() * merged.element_size()
            return RunWeights(*q, *out, merged), kept

        def still_valid(w: RunWeights) -> bool:
            return (w.q_linear.weight is w.q_weight and w.out_linear.weight is w.out_weight
                    and w.q_weight.device == like.device and w.out_weight.device == like.device)

        return self.blend.prompts.keep_for_run(transformer_options, ("weights", like.device, like.dtype), make,
                                               still_valid)

    def plain_out(self, like: torch.Tensor) -> tuple | None:
        linear, dropout = (self.to_out[0], self.to_out[1]) if len(self.to_out) == 2 else (None, None)
        if not isinstance(dropout, torch.nn.Dropout) or (dropout.p and dropout.training):
            return None
        return plain_linear(linear, like)


class RunWeights(NamedTuple):
    q_linear: torch.nn.Module
    q_weight: torch.Tensor
    q_bias: torch.Tensor | None
    out_linear: torch.nn.Module
    out_weight: torch.Tensor
    out_bias: torch.Tensor | None
    out_merged: torch.Tensor  # W + dW of to_out


def plain_linear(module: torch.nn.Module | None, like: torch.Tensor) -> tuple | None:
    """(module, weight, bias) when ``module`` computes F.linear(x, weight, bias) with them as they are: ComfyUI's own
    Linear with no per-call cast (lowvram, manual cast, fp8) or weight function (patches applied per call), no
    forward hooks or instance forward, plain tensors on ``like``'s device and dtype. Other ops (fp8, GGUF, cuBLAS
    ops, quantised tensor subclasses) compute their own way: None, they keep their own call."""
    if type(module).forward not in _PLAIN_FORWARDS or getattr(module, "comfy_cast_weights", False):
        return None
    if (getattr(module, "weight_function", None) or getattr(module, "bias_function", None) or "forward" in vars(module)
            or module._forward_hooks or module._forward_pre_hooks):
        return None
    weight, bias = module.weight, module.bias
    for t in (weight,) if bias is None else (weight, bias):
        if type(t.data) is not torch.Tensor or t.device != like.device or t.dtype != like.dtype:
            return None
    return module, weight, bias


_PLAIN_FORWARDS = (torch.nn.Linear.forward, comfy.ops.disable_weight_init.Linear.forward)


def can_go_direct(model, block: Block) -> bool:
    """The block's attn2 is ComfyUI's own layer and nothing replaces it on ``model``."""
    layer = model.get_model_object(f"{block.path}.attn2")
    return type(layer) is comfy_attention.CrossAttention and existing_replace(model, "attn2", block.key) is None


def install_direct(model, block: Block, blend) -> DirectCrossAttention:
    """Object-patch ``block``'s attn2 on ``model`` (a clone) with the blend's direct layer; its per-run caches apply
    in the runs where that layer is the one ComfyUI calls."""
    layer = DirectCrossAttention(model.get_model_object(f"{block.path}.attn2"), blend, block)
    model.add_object_patch(layer.path, layer)
    blend.prompts.watch_layer(block.key, lambda patcher: patcher.get_model_object(layer.path) is layer)
    return layer


def check_not_bypassed(layers: list[DirectCrossAttention]):
    """An ON_PRE_RUN callback: refuse a run in which another pack's attn2 replace, added after the blend, would
    silently take over the blended layers (ComfyUI calls a replace instead of the layer)."""
    def check(patcher, *_):
        bypassed = [layer.block.key for layer in layers if patcher.get_model_object(layer.path) is layer
                    and existing_replace(patcher, "attn2", layer.block.key) is not None]
        if bypassed:
            raise InputError("model", f"a node applied after the Dual-Path Attention Blend replaces cross-attention "
                                      f"on {len(bypassed)} of its layers (IPAdapter or similar), which would drop the "
                                      "blend there; apply the Dual-Path Attention Blend after that node")
    return check
