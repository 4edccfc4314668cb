"""Prompt-to-prompt's local blend: edit only where the chosen words attend, keep the source elsewhere.

The paper sums the chosen words' cross-attention maps of the 16x16 layers (SD at 512 px, i.e. latent / 4) over
layers and steps, max-pools 3x3, upsamples, normalises by the maximum and thresholds (0.3); the mask is the
union of the source words' and target words' masks and x_t = x_src + mask (x_tgt - x_src). Only the chosen
token columns of the maps are kept (``edits.column_maps``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .edits import column_maps


class LocalBlend:
    def __init__(self, source_columns: torch.Tensor, target_columns: torch.Tensor, threshold: float = 0.3):
        if len(source_columns) == 0 and len(target_columns) == 0:
            raise ValueError("local blend needs at least one word")
        self.source_columns, self.target_columns = source_columns.long(), target_columns.long()
        self.threshold = threshold
        self.maps: torch.Tensor | None = None  # [pairs, 2, h, w] summed maps (source words, target words)
        self._on_device: dict = {}  # columns moved to the device once, not in every layer (a copy waits for it)

    def reset(self) -> None:
        self.maps = None

    def _selection(self, pairs: int, nk: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(columns, selector): the source words' columns then the target words', and [2 pairs, columns, 1] ones
        where a row counts a column (source rows their words, target rows theirs); moved to the device once (a
        copy in every layer would wait for it)."""
        key = (pairs, nk, device)
        if key not in self._on_device:
            src, tgt = (c[c < nk] for c in (self.source_columns, self.target_columns))
            selector = torch.zeros(2 * pairs, len(src) + len(tgt), 1)
            selector[:pairs, :len(src)] = 1.0
            selector[pairs:, len(src):] = 1.0
            self._on_device[key] = torch.cat([src, tgt]).to(device), selector.to(device)
        return self._on_device[key]

    def record(self, q: torch.Tensor, keys: torch.Tensor, heads: int, hw: tuple[int, int]) -> None:
        """Add one layer's maps. ``q`` [2 pairs, Nq, C]: the pairs' source rows, then their target rows; ``keys``:
        ``map_keys`` of the same rows' k. Source rows count the source words, target rows the target words."""
        pairs = q.shape[0] // 2
        columns, selector = self._selection(pairs, keys.shape[-1], q.device)
        maps = torch.bmm(column_maps(q, keys, heads, columns), selector).view(2, pairs, *hw).transpose(0, 1)
        if self.maps is not None and self.maps.shape != maps.shape:
            self.maps = None  # a new image size: a new run
        self.maps = maps if self.maps is None else self.maps + maps

    def mask(self, size: tuple[int, int]) -> torch.Tensor | None:
        """[pairs, 1, H, W] 0/1 mask at latent ``size``, or None before any map was recorded."""
        if self.maps is None:
            return None
        maps = F.max_pool2d(self.maps, kernel_size=3, stride=1, padding=1)
        maps = F.interpolate(maps, size=size)
        maps = maps / maps.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
        return (maps > self.threshold).any(dim=1, keepdim=True).float()


def blend(source: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The target where the mask is 1, the source elsewhere."""
    return source + mask.to(source) * (target - source)
