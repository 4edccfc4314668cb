"""Rank by Reward: sort a batch by per-image scores (best first), keep the top k and/or those above a threshold,
and carry a LATENT and a MASK along in the same order. Works with any per-image FLOAT list, e.g. ImageReward
Score's scores output."""
from __future__ import annotations

import logging

import torch
from comfy_api.latest import io, ui
from comfy_execution.graph_utils import ExecutionBlocker

from ..scoring.ranking import rank
from ..training.errors import InputError

log = logging.getLogger(__name__)

IF_NONE_PASS = ("error", "keep best", "stop quietly")


def single(values, name: str):
    """Inputs arrive as lists (the node takes the whole FLOAT list): widgets and single sockets give one item."""
    if not values:
        raise InputError(name, "is empty")
    return values[0]


def _batch(parts: list, name: str) -> torch.Tensor:
    """One IMAGE/MASK batch; several (an upstream list) are joined when their sizes match."""
    parts = [p.unsqueeze(0) if name == "mask" and p.dim() == 2 else p for p in parts]
    if len(parts) == 1:
        return parts[0]
    if len({tuple(p.shape[1:]) for p in parts}) != 1:
        raise InputError(name, f"got a list of {len(parts)} batches of different sizes; rank one batch at a time")
    return torch.cat(parts)


def _latent(parts: list, count: int) -> dict:
    if len(parts) > 1:
        if any(set(p) != {"samples"} for p in parts):
            raise InputError("latent", "got a list of latents with masks or batch indices; rank one batch at a time")
        parts = [{"samples": torch.cat([p["samples"] for p in parts])}]
    latent = parts[0]
    if not isinstance(latent, dict) or "samples" not in latent:
        raise InputError("latent", "is not a LATENT; connect the latent the images were decoded from")
    if latent["samples"].shape[0] != count:
        raise InputError("latent", f"has {latent['samples'].shape[0]} latents for {count} images; connect the "
                                   "latent the images were decoded from")
    return latent


def reorder_latent(latent: dict, order: list[int]) -> dict:
    """The LATENT with its batch in ``order``; a per-image noise_mask and batch_index follow the samples."""
    out = dict(latent)
    index = torch.tensor(order, dtype=torch.long)
    out["samples"] = latent["samples"][index]
    mask = latent.get("noise_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() > 2 and mask.shape[0] == latent["samples"].shape[0] > 1:
        out["noise_mask"] = mask[index]
    if "batch_index" in latent:
        out["batch_index"] = [latent["batch_index"][i] for i in order]
    return out


def reorder_mask(mask: torch.Tensor, order: list[int], count: int) -> torch.Tensor:
    """A MASK [B,H,W] in ``order``; a single mask applies to every image and is returned as it is."""
    if mask.shape[0] == 1 and count != 1:
        return mask
    if mask.shape[0] != count:
        raise InputError("mask", f"has {mask.shape[0]} masks for {count} images; give one mask or one per image")
    return mask[torch.tensor(order, dtype=torch.long)]


def select(scores: list[float], top_k: int, threshold: float | None, if_none_pass: str) -> tuple[list[int], str]:
    """Indices to keep (best first) and a note when the threshold kept nothing; raises for mode "error"."""
    if if_none_pass not in IF_NONE_PASS:
        raise InputError("if_none_pass", f"must be one of {list(IF_NONE_PASS)}, got {if_none_pass!r}")
    order = rank(scores, top_k, threshold)
    if order:
        return order, ""
    best = rank(scores, 1)[0]
    why = f"no image scored {threshold:g} or more (best: image {best} with {scores[best]:.4f})"
    if if_none_pass == "error":
        raise InputError("threshold", f"{why}; lower the threshold, turn use_threshold off, or set if_none_pass "
                                      "to 'keep best' or 'stop quietly'")
    if if_none_pass == "keep best":
        return [best], f"{why}: kept the best image"
    return [], f"{why}: stopped; nodes that use these outputs did not run"


class PersonalizeRankByReward(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PersonalizeRankByReward",
            display_name="Rank by Reward",
            category="personalize/reward",
            description="Sorts the images by their scores (best first, numerically; ties keep batch order), keeps "
                        "those scoring at least the threshold (when use_threshold is on), then the best top_k. "
                        "A latent and masks connected here are reordered and filtered the same way.",
            inputs=[
                io.Image.Input("images"),
                io.Float.Input("scores", force_input=True, tooltip="One score per image, in batch order "
                                                                   "(the scores output of ImageReward Score)."),
                io.Int.Input("top_k", default=2, min=0, max=4096, tooltip="How many to keep; 0 keeps all."),
                io.Boolean.Input("use_threshold", default=False,
                                 tooltip="Also drop images scoring below threshold (before top_k)."),
                io.Float.Input("threshold", default=0.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="With use_threshold: keep images scoring at least this. ImageReward is "
                                       "roughly normal: 0 is average, +1 is better than ~84% of SD 1.4 images."),
                io.Combo.Input("if_none_pass", options=list(IF_NONE_PASS), default="error",
                               tooltip="When the threshold keeps nothing: fail with the best score, keep the best "
                                       "image anyway, or stop the nodes downstream without an error."),
                io.Latent.Input("latent", optional=True),
                io.Mask.Input("mask", optional=True),
            ],
            outputs=[
                io.Image.Output(display_name="images"),
                io.Latent.Output(display_name="latent"),
                io.Mask.Output(display_name="mask"),
                io.Int.Output(display_name="indices", is_output_list=True,
                              tooltip="The kept images' positions in the input batch, best first."),
                io.Float.Output(display_name="scores", is_output_list=True, tooltip="Their scores, best first."),
            ],
            is_input_list=True,
        )

    @classmethod
    def execute(cls, images, scores, top_k, use_threshold, threshold, if_none_pass, latent=None,
                mask=None) -> io.NodeOutput:
        batch = _batch(images, "images")
        count = batch.shape[0]
        if count == 0:
            raise InputError("images", "the batch is empty")
        values = [float(s) for s in scores]
        if len(values) != count:
            raise InputError("scores", f"got {len(values)} scores for {count} images; connect the scores of "
                                       "these images (ImageReward Score's scores output)")
        limit = single(threshold, "threshold") if single(use_threshold, "use_threshold") else None
        order, note = select(values, single(top_k, "top_k"), limit, single(if_none_pass, "if_none_pass"))
        carried_latent = None if latent is None else _latent(latent, count)
        carried_mask = None if mask is None else _batch(mask, "mask")
        if not order:  # "stop quietly": block everything downstream, silently
            log.warning("Rank by Reward: %s", note)
            blocked = ExecutionBlocker(None)
            return io.NodeOutput(blocked, blocked, blocked, blocked, blocked, ui=ui.PreviewText(note))

        index = torch.tensor(order, dtype=torch.long, device=batch.device)
        missing = "Rank by Reward: connect its {} input to use its {} output"
        out_latent = (reorder_latent(carried_latent, order) if carried_latent is not None
                      else ExecutionBlocker(missing.format("latent", "latent")))
        out_mask = (reorder_mask(carried_mask, order, count) if carried_mask is not None
                    else ExecutionBlocker(missing.format("mask", "mask")))
        kept = [values[i] for i in order]
        lines = [f"kept {len(order)} of {count}" + (f" (threshold {limit:g})" if limit is not None else "")]
        if note:
            lines.append(note)
            log.warning("Rank by Reward: %s", note)
        lines += [f"#{k} image {i}: {values[i]:+.4f}" for k, i in enumerate(order, 1)]  # rank, batch position
        return io.NodeOutput(batch[index], out_latent, out_mask, order, kept, ui=ui.PreviewText("\n".join(lines)))


NODES = [PersonalizeRankByReward]
