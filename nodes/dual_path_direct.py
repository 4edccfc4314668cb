"""The Dual-Path blend's cross-attention as the layer itself. Where nothing else stands in for a block's attn2, the
node object-patches that layer on its clone with ``DirectCrossAttention``: one forward over the host's own
projections and fused kernel, the soft and hard paths stacked on the batch axis, their k/v (values scaled by a and
1 - a) built once per run. ComfyUI's replace route would project the soft prompt's k/v at every step and call three
patches per layer (stash, replace, output add): more kernel launches and Python per layer, which is what a
launch-bound sampler pays for.

A replace that our nodes install on the block later sends the blend back to that route first (``demote``, called by
``attention_hooks.set_replace``), so it chains as before; another pack's replace added later would bypass the
layer, which the run start refuses (``check_not_bypassed``)."""
from __future__ import annotations

import comfy.ldm.modules.attention as comfy_attention
import torch

from ..attention.dual_path import blend_pairs
from ..training.errors import InputError
from .attention_hooks import Block, existing_replace


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

        q, update = self.to_q(x), None
        if a == 0.0:  # the base block on the hard prompt: no deltas
            out = attend(q, *blend.direct_kv(self, transformer_options, context, value, "hard"))
        elif a == 1.0:  # outside the window: the tuned block alone
            out = attend(deltas.plus_("q", q, x), *blend.direct_kv(self, transformer_options, context, value, "soft"))
            update = deltas.out_update(out, 1.0)
        else:
            k2, v2 = blend.direct_kv(self, transformer_options, context, value, a)
            out, update = blend_pairs(attend, deltas.paired_one("q", q, x), k2, v2, deltas, a, prescaled=True)
        n = self.to_out(out)
        return n if update is None else update.apply_(n)


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
