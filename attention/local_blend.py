"""Prompt-to-prompt's local blend: edit only where the chosen words attend, keep the source elsewhere.

The paper sums the chosen words' cross-attention maps of the 16x16 layers (SD at 512 px, i.e. latent / 4) over
layers and steps, max-pools 3x3, upsamples, normalises by the maximum and thresholds (0.3); the mask is the
union of the source words' and target words' masks and x_t = x_src + mask (x_tgt - x_src). Only the chosen
token columns of the maps are kept (``edits.selected_maps``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .edits import selected_maps


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

    def _word_map(self, q, k, heads, columns, hw) -> torch.Tensor:
        if len(columns) == 0:
            return q.new_zeros(q.shape[0], *hw, dtype=torch.float32)
        key = (columns.data_ptr(), k.shape[1], q.device)
        if key not in self._on_device:
            self._on_device[key] = columns[columns < k.shape[1]].to(q.device)
        return selected_maps(q, k, heads, self._on_device[key]).sum(-1).view(q.shape[0], *hw)

    def record(self, q_src: torch.Tensor, k_src: torch.Tensor, q_tgt: torch.Tensor, k_tgt: torch.Tensor,
               heads: int, hw: tuple[int, int]) -> None:
        """Add one layer's maps: the source rows' maps of the source words, the targets' of the target words."""
        maps = torch.stack([self._word_map(q_src, k_src, heads, self.source_columns, hw),
                            self._word_map(q_tgt, k_tgt, heads, self.target_columns, hw)], dim=1)
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
