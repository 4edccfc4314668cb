"""Best-first ranking of scores: numeric, stable (ties keep batch order), with top-k and a threshold."""
from __future__ import annotations

import math
from typing import Iterable

import torch

from ..training.errors import InputError


def _as_floats(scores: Iterable) -> list[float]:
    if isinstance(scores, torch.Tensor):
        values = scores.detach().float().cpu().flatten().tolist()
    else:
        try:
            values = [float(s) for s in scores]  # strings like "10" become numbers, never sorted as text
        except (TypeError, ValueError) as e:
            raise InputError("scores", f"must be numbers: {e}") from e
    bad = [i for i, v in enumerate(values) if math.isnan(v)]
    if bad:
        raise InputError("scores", f"score {', '.join(map(str, bad[:10]))} is NaN; score the images again "
                         "(in bfloat16 or float32)")
    return values


def rank(scores, top_k: int = 0, threshold: float | None = None) -> list[int]:
    """Indices into ``scores``, best first. ``top_k`` 0 keeps all; ``threshold`` keeps scores >= it (applied
    before top_k, so fewer than top_k may remain)."""
    values = _as_floats(scores)
    if top_k < 0:
        raise InputError("top_k", f"must be 0 (all) or more, got {top_k}")
    if threshold is not None and math.isnan(threshold):
        raise InputError("threshold", "is NaN; give a number or leave it unset")
    # sorted() is stable: equal scores keep their batch order, so the result never depends on anything else.
    order = sorted(range(len(values)), key=lambda i: -values[i])
    if threshold is not None:
        order = [i for i in order if values[i] >= threshold]
    return order[:top_k] if top_k else order
