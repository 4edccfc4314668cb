"""A loss chart drawn with PIL alone (no matplotlib: ComfyUI does not ship it), and PIL -> IMAGE tensors."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

RAW_COLOUR = (150, 185, 230)
EMA_COLOUR = (200, 30, 30)
AXIS_COLOUR = (60, 60, 60)
GRID_COLOUR = (228, 228, 228)
CLIP_COLOUR = (230, 120, 0)
EMA_ALPHA = 0.1
MARGINS = (64, 34, 16, 40)  # left, top, right, bottom: room for tick labels, title and legend


def plot_area(size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The chart's inner box (x0, y0, x1, y1) in pixels for an image of ``size``."""
    left, top, right, bottom = MARGINS
    return left, top, size[0] - right, size[1] - bottom


def ema(values: Sequence[float], alpha: float = EMA_ALPHA) -> list[float]:
    """Bias-corrected exponential moving average: without the correction it starts near 0, not at the loss.
    A NaN/inf value is skipped (the average holds; NaN until the first finite value)."""
    out, avg, seen = [], 0.0, 0
    for v in values:
        if math.isfinite(v):
            avg, seen = alpha * v + (1 - alpha) * avg, seen + 1
        out.append(avg / (1 - (1 - alpha) ** seen) if seen else math.nan)
    return out


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round-numbered ticks (1, 2 or 5 x 10^k apart) inside [lo, hi]."""
    raw = (hi - lo) / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _step_ticks(n: int) -> list[int]:
    """Step numbers to label: round numbers, plus step 1 unless a round number sits right beside it."""
    ticks = [int(s) for s in nice_ticks(0, n, 6) if s == int(s) and 1 <= s <= n]
    if not ticks or ticks[0] > 1 and (ticks[0] - 1) / (n - 1) >= 0.06:
        ticks.insert(0, 1)
    return ticks


def _y_range(raw: np.ndarray) -> tuple[float, float]:
    """The data's range, except that values far beyond the 1st-99th percentile band are left off the chart:
    one spike must not flatten the curve. (The EMA always lies within the raw loss's range.)"""
    lo, hi = float(raw.min()), float(raw.max())
    if len(raw) >= 10:  # "higher"/"lower": a single outlier cannot drag the percentile towards itself
        core_lo, core_hi = np.percentile(raw, 1, method="higher"), np.percentile(raw, 99, method="lower")
        slack = 0.25 * (core_hi - core_lo)
        lo, hi = max(lo, float(core_lo - slack)), min(hi, float(core_hi + slack))
    if hi - lo <= 1e-6 * max(abs(hi), abs(lo)):  # constant loss (up to float rounding): show a band around it
        return lo - max(abs(lo) * 0.1, 1e-3), hi + max(abs(hi) * 0.1, 1e-3)
    pad = (hi - lo) * 0.05
    return lo - pad, hi + pad


def loss_plot(losses: Sequence[float], title: str = "training loss",
              size: tuple[int, int] = (640, 360)) -> Image.Image:
    """Per-step loss (light) with its EMA (bold), robust y range, step and loss ticks, title and legend. NaN/inf
    steps (ComfyUI's own trainer does not stop on them) break the line and are marked at the top."""
    if not any(math.isfinite(v) for v in losses):
        raise ValueError("losses: no finite value")
    if size[0] < 200 or size[1] < 120:
        raise ValueError(f"size: at least 200x120 leaves room for the axes, got {size[0]}x{size[1]}")
    raw = np.asarray(losses, dtype=np.float64)
    smooth = np.asarray(ema(raw))
    finite = np.isfinite(raw)
    lo, hi = _y_range(raw[finite])
    x0, y0, x1, y1 = plot_area(size)
    n = len(raw)

    def px(i: int) -> float:
        return x0 + (x1 - x0) * (i / (n - 1) if n > 1 else 0.5)

    def py(v: float) -> float:
        return y1 - (y1 - y0) * (min(max(v, lo), hi) - lo) / (hi - lo)

    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font, small = ImageFont.load_default(size=14), ImageFont.load_default(size=11)

    for v in nice_ticks(lo, hi):
        y = py(v)
        draw.line([(x0, y), (x1, y)], fill=GRID_COLOUR)
        draw.text((x0 - 6, y), f"{v:.4g}", fill=AXIS_COLOUR, font=small, anchor="rm")
    for step in _step_ticks(n):
        x = px(step - 1)
        draw.line([(x, y1), (x, y1 + 4)], fill=AXIS_COLOUR)
        draw.text((x, y1 + 6), str(step), fill=AXIS_COLOUR, font=small, anchor="mt")
    draw.text(((x0 + x1) / 2, size[1] - 4), "step", fill=AXIS_COLOUR, font=small, anchor="mb")

    for run in _finite_runs(raw):
        if len(run) > 1:
            draw.line([(px(i), py(raw[i])) for i in run], fill=RAW_COLOUR, width=1)
            draw.line([(px(i), py(smooth[i])) for i in run], fill=EMA_COLOUR, width=3, joint="curve")
        else:
            i = run[0]
            draw.ellipse([px(i) - 3, py(raw[i]) - 3, px(i) + 3, py(raw[i]) + 3], fill=EMA_COLOUR)

    # Values outside the shown range are drawn at the edge; mark them so a clipped spike is not mistaken for data.
    clipped = [(i, v) for i, v in enumerate(raw) if not lo <= v <= hi]
    for i, v in clipped:
        y = y1 if v < lo else y0  # NaN at the top too
        tip = y - 5 if v > hi else y + 5
        draw.polygon([(px(i) - 4, y), (px(i) + 4, y), (px(i), tip)], fill=CLIP_COLOUR)

    draw.rectangle([x0, y0, x1, y1], outline=AXIS_COLOUR)
    draw.text((x0, y0 - 8), title, fill=(0, 0, 0), font=font, anchor="ls")
    _legend(draw, small, x1, y0 - 10, len(clipped))
    return img


def _finite_runs(values: np.ndarray) -> list[list[int]]:
    """Indices of the stretches of consecutive finite values."""
    runs: list[list[int]] = []
    for i, v in enumerate(values):
        if not math.isfinite(v):
            continue
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _legend(draw: ImageDraw.ImageDraw, font, right: float, y: float, n_clipped: int) -> None:
    """Right-aligned in the header band, above the chart, so it never covers the curve."""
    entries = [(RAW_COLOUR, 1, "loss"), (EMA_COLOUR, 3, f"EMA ({EMA_ALPHA:g})")]
    if n_clipped:
        entries.append((CLIP_COLOUR, 3, f"{n_clipped} step{'s' if n_clipped > 1 else ''} off scale or NaN"))
    x = right
    for colour, width, label in reversed(entries):
        x -= draw.textlength(label, font=font)
        draw.text((x, y), label, fill=AXIS_COLOUR, font=font, anchor="lm")
        x -= 22
        draw.line([(x, y), (x + 16, y)], fill=colour, width=width)
        x -= 12


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> [1, H, W, 3] float32 in 0..1 (ComfyUI's IMAGE layout)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).unsqueeze(0)
