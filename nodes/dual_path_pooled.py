"""SDXL's pooled text vector in the Dual-Path blend. SDXL also reads the prompt outside attention: y starts with the
pooled CLIP-G output (added to the time embedding of every block), so the soft prompt's pooled vector would carry
the learned token into the hard path too, and a = 0 would not be the base model on the hard prompt. On positive
rows the pooled part of y becomes a y_soft + (1 - a) y_hard per model call (a = 1 outside the blend's window)."""
from __future__ import annotations

import comfy.model_base
from comfy.patcher_extension import WrappersMP

from .attention_hooks import COND, chunks, in_window


def install_pooled_blend(model, hard: list, a: float, window: tuple[float, float]) -> None:
    """On ``model`` (a clone) of the SDXL family with a hard conditioning that has a pooled output: a
    DIFFUSION_MODEL wrapper that blends y's pooled part. Other families have no pooled vector in y."""
    pooled = hard[0][1].get("pooled_output")
    if pooled is None or not isinstance(model.model, (comfy.model_base.SDXL, comfy.model_base.SDXLRefiner)):
        return
    pooled, placed = pooled[:1].detach(), {}

    def blend_pooled(executor, *args, **kwargs):
        args = list(args)
        y = kwargs.get("y", args[3] if len(args) > 3 else None)  # UNetModel._forward(x, t, context, y, ...)
        options = kwargs.get("transformer_options", args[5] if len(args) > 5 else {})
        a_now = a if in_window(options, window) else 1.0
        if y is not None and a_now != 1.0:
            key = (y.device, y.dtype)
            if key not in placed:  # moved once: a host copy per call would wait for the GPU
                placed[key] = pooled.to(y.device, y.dtype)
            hard_y, width = placed[key], pooled.shape[1]
            y = y.clone()
            for kind, rows in chunks(options, y.shape[0]):
                if kind == COND:
                    y[rows, :width] = a_now * y[rows, :width] + (1.0 - a_now) * hard_y
            if "y" in kwargs:
                kwargs["y"] = y
            else:
                args[3] = y
        return executor(*args, **kwargs)

    model.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "personalize_dual_pooled", blend_pooled)
