"""Captions encoded by device work alone, so a step that trains the text side (Textual Inversion vectors, text-encoder
LoRA) can be replayed as a CUDA graph.

ComfyUI's ``CLIP.encode_from_tokens`` walks the token lists in Python and builds index tensors on the host in every
call; a CUDA graph cannot record that. Here the prompts are tokenized once and every host-side decision (ids, where
the learned vectors go, the attention mask, the pooled token) is made once; a call only gathers the live vectors,
runs the encoder layers and applies the same output rules. The rules mirror ComfyUI 0.3.x (``SDClipModel.
process_tokens`` / ``forward``, ``CLIPTextModel_.forward``, ``encode_token_weights``, SDXL's concatenation), so
``build`` checks the result against ``encode_from_tokens`` and returns None (ComfyUI's own path is used) when they
differ or the prompts need something not mirrored (weights, several 77-token chunks, other encoder types).
"""
from __future__ import annotations

import logging
import numbers
from typing import Callable, Sequence

import comfy.ops
import comfy.sd1_clip
import comfy.sdxl_clip
import torch
from comfy.clip_model import CLIPTextModel

from ..training.task import Conditioning

log = logging.getLogger(__name__)
Adm = Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]  # pooled [P, D], pixel size -> SDXL's y


class _Unsupported(Exception):
    pass


class _EncoderPrompts:
    """One CLIP text encoder (``SDClipModel``) and every prompt's tokens, prepared for device-only encoding."""

    def __init__(self, sd_clip: comfy.sd1_clip.SDClipModel, token_lists: Sequence[list], device: torch.device):
        if not isinstance(sd_clip.transformer, CLIPTextModel) or sd_clip.layer == "all" or \
                isinstance(sd_clip.layer, list):
            raise _Unsupported(f"{type(sd_clip.transformer).__name__} / layer {sd_clip.layer}")
        self.clip = sd_clip
        # the options encode_from_tokens set just before: read now, they are reset by every later encode
        self.layer, self.layer_idx = sd_clip.layer, sd_clip.layer_idx
        self.norm_hidden, self.zero_out_masked = sd_clip.layer_norm_hidden_state, sd_clip.zero_out_masked
        self.use_mask, self.projected = sd_clip.enable_attention_masks, sd_clip.return_projected_pooled
        special = sd_clip.special_tokens
        end = special.get("end")
        stop = end if end is not None else special.get("pad", -1)
        ids, masks, self.slots = [], [], []  # slots: (prompt, position, vector view)
        for p, tokens in enumerate(token_lists):
            row, mask, eos = [], [], False
            for pos, item in enumerate(tokens):
                token = item[0]
                if isinstance(token, numbers.Integral):  # process_tokens' mask rule
                    mask.append(0 if eos else 1)
                    row.append(int(token))
                    if not eos and int(token) == stop:
                        if end is None:
                            mask[-1] = 0
                        eos = True
                elif isinstance(token, torch.Tensor) and token.dim() == 1:
                    mask.append(1)
                    row.append(0)  # placeholder, overwritten by the vector
                    self.slots.append((p, pos, token))
                else:
                    raise _Unsupported(f"token of type {type(token).__name__}")
            ids.append(row)
            masks.append(mask)
        if len({len(r) for r in ids}) != 1:
            raise _Unsupported("prompts of different lengths")
        self.ids = torch.tensor(ids, device=device)
        self.mask = torch.tensor(masks, device=device)
        self.last = torch.tensor([sum(m) - 1 for m in masks], device=device)  # the pooled token (num_tokens - 1)
        self.rows = torch.arange(len(ids), device=device)
        self.where = (torch.tensor([s[0] for s in self.slots], device=device, dtype=torch.long),
                      torch.tensor([s[1] for s in self.slots], device=device, dtype=torch.long))
        self.sources = [_vector_source(v, device) for _, _, v in self.slots]

    def vectors(self) -> torch.Tensor:
        """The learned vectors as they are now (the live parameters, so gradients reach them)."""
        vectors = torch.stack([param[row] if row is not None else param for param, row in self.sources])
        return vectors.to(self.ids.device, torch.float32)  # no-op once the parameters are on the device

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states [P, L, D] float32, pooled [P, D] or None), as SDClipModel.forward returns them."""
        model = self.clip.transformer.text_model
        x = model.embeddings.token_embedding(self.ids, out_dtype=torch.float32)
        if self.slots:
            x = x.index_put(self.where, self.vectors())
        x = x + comfy.ops.cast_to(model.embeddings.position_embedding.weight, dtype=x.dtype, device=x.device)
        n = x.shape[1]
        mask = torch.full((n, n), -torch.finfo(x.dtype).max, dtype=x.dtype, device=x.device).triu_(1)
        if self.use_mask:
            pad = 1.0 - self.mask.to(x.dtype).view(-1, 1, 1, n).expand(-1, 1, n, n)
            mask = pad.masked_fill(pad.to(torch.bool), -torch.finfo(x.dtype).max) + mask
        x, hidden = model.encoder(x, mask=mask, intermediate_output=self.layer_idx)
        x = model.final_layer_norm(x)
        if hidden is not None and self.norm_hidden:
            hidden = model.final_layer_norm(hidden)
        pooled = x[self.rows, self.last]
        z = (x if self.layer == "last" else hidden).float()
        if self.zero_out_masked:
            z = z * self.mask.unsqueeze(-1).float()
        out_pooled = pooled.float() if not self.projected else self.clip.transformer.text_projection(pooled).float()
        return z, out_pooled


def _vector_source(view: torch.Tensor, device) -> tuple[torch.Tensor, int | None]:
    """(tensor, row): a row of a learned [n, D] parameter (so the call reads its current value), or a constant."""
    base = view._base
    if base is not None and base.dim() == 2 and base.shape[1] == view.shape[0]:
        row = (view.data_ptr() - base.data_ptr()) // (base.stride(0) * base.element_size())
        if 0 <= row < base.shape[0] and base[row].data_ptr() == view.data_ptr():
            return base, row
    return view.detach().to(device), None


class DevicePromptEncoder:
    """``encoder(size)`` -> Conditioning of every prompt (rows in ``prompts`` order), by device work only."""

    def __init__(self, prompts: Sequence[str], encoders: dict[str, _EncoderPrompts], sdxl: bool, adm: Adm | None):
        self.prompts, self._encoders, self._sdxl, self._adm = list(prompts), encoders, sdxl, adm
        self._size_part: dict = {}

    def __call__(self, size: tuple[int, int]) -> Conditioning:
        outs = {name: enc() for name, enc in self._encoders.items()}
        if self._sdxl:
            (l_out, _), (g_out, pooled) = outs["l"], outs["g"]
            cut = min(l_out.shape[1], g_out.shape[1])
            context = torch.cat([l_out[:, :cut], g_out[:, :cut]], dim=-1)
        else:
            (context, pooled), = outs.values()
        y = None
        if self._adm is not None:
            if size not in self._size_part:  # SDXL's y = [pooled, size/crop embeddings]: the second part is fixed
                zeros = torch.zeros(1, pooled.shape[-1])
                self._size_part[size] = self._adm(zeros, size)[:, pooled.shape[-1]:].to(pooled.device)
            y = torch.cat([pooled, self._size_part[size].expand(pooled.shape[0], -1).to(pooled.dtype)], dim=-1)
        return Conditioning(context, y)


def build(clip, prompts: Sequence[str], device: torch.device, adm: Adm | None,
          reference: Callable[[Sequence[str], tuple[int, int]], Conditioning], size: tuple[int, int]
          ) -> DevicePromptEncoder | None:
    """The device encoder for ``prompts``, or None where ComfyUI's path must be used (logged)."""
    model = clip.cond_stage_model
    sdxl = isinstance(model, comfy.sdxl_clip.SDXLClipModel)
    if not (sdxl or isinstance(model, comfy.sd1_clip.SD1ClipModel)):
        log.info("text encoding stays on ComfyUI's path (%s)", type(model).__name__)
        return None
    names = ("l", "g") if sdxl else (model.clip_name,)
    tokens = [clip.tokenize(p) for p in prompts]
    try:
        for t in tokens:
            for name in names:
                if len(t[name]) != 1 or any(item[1] != 1.0 for item in t[name][0]):
                    raise _Unsupported("prompt weights or more than 77 tokens")
        model.reset_clip_options()  # the options encode_from_tokens would use
        if clip.layer_idx is not None:
            model.set_clip_options({"layer": clip.layer_idx})
        encoders = {name: _EncoderPrompts(getattr(model, f"clip_{name}"), [t[name][0] for t in tokens], device)
                    for name in names}
        encoder = DevicePromptEncoder(prompts, encoders, sdxl, adm)
        with torch.no_grad():
            ours, theirs = encoder(size), reference(prompts, size).to(device)
    except _Unsupported as e:
        log.info("text encoding stays on ComfyUI's path: %s", e)
        return None
    same = ours.context.shape == theirs.context.shape and torch.allclose(ours.context, theirs.context, atol=1e-3,
                                                                          rtol=1e-3)
    if same and theirs.y is not None:
        same = ours.y is not None and torch.allclose(ours.y, theirs.y.to(ours.y.dtype), atol=1e-3, rtol=1e-3)
    if not same:
        log.warning("device text encoding differs from ComfyUI's for these prompts; training uses ComfyUI's path "
                    "(slower; the step cannot be a CUDA graph)")
        return None
    return encoder
