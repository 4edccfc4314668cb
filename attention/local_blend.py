"""Prompt-to-prompt's local blend: edit only where the chosen words attend, keep the source elsewhere.

The paper sums the chosen words' cross-attention maps of the 16x16 layers (SD at 512 px, i.e. latent / 4) over
layers and steps, max-pools 3x3, upsamples, normalises by the maximum and thresholds (0.3); the mask is the
union of the source words' and target words' masks and x_t = x_src + mask (x_tgt - x_src). Only the chosen
token columns of the maps are computed, by attention over values that select them (``edits.word_map_values``).

One deliberate difference: the target words' maps here are the target's own. The official code stores the maps
after its edit, so inside the cross-attention window a target word's map is the source's carried over by the
mapper, and its own map counts only after the window. Here the target words' own attention counts at every step,
so the region may also take in where a new word itself attends (a swapped-in object whose shape differs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .edits import head_maps, word_map_values


class LocalBlend:
    def __init__(self, source_columns: torch.Tensor, target_columns: torch.Tensor, threshold: float = 0.3):
        if len(source_columns) == 0 and len(target_columns) == 0:
            raise ValueError("local blend needs at least one word")
        self.source_columns, self.target_columns = source_columns.long(), target_columns.long()
        self.threshold = threshold
        self._sums: dict[int, torch.Tensor] = {}  # head count -> [2, pairs, h, w, heads] float32 sums over layers
        self._values: dict = {}

    def reset(self) -> None:
        self._sums = {}

    @property
    def maps(self) -> torch.Tensor | None:
        """[pairs, 2, h, w] (source words, target words): each layer's maps averaged over its heads, summed over
        the layers; None before any was recorded."""
        if not self._sums:
            return None
        return sum(sums.sum(-1) / sums.shape[-1] for sums in self._sums.values()).transpose(0, 1)

    def values(self, pairs: int, length: int, channels: int, like: torch.Tensor) -> torch.Tensor:
        """The pairs' word-map values (``edits.word_map_values``): source rows select the source words' keys,
        target rows the target words'; rows laid out as the pairs' sources, then their targets. Made once per
        shape, device and dtype: a host-to-device copy in every layer would wait for the GPU."""
        key = (pairs, length, channels, like.device, like.dtype)
        if key not in self._values:
            select = torch.zeros(2 * pairs, length)
            for rows, columns in ((slice(0, pairs), self.source_columns), (slice(pairs, None), self.target_columns)):
                select[rows, columns[columns < length]] = 1.0
            self._values[key] = word_map_values(select, length, channels, like)
        return self._values[key]

    def record(self, out: torch.Tensor, hw: tuple[int, int], heads: int) -> None:
        """Add one layer's maps, from attention over ``values`` (``out`` [2 pairs, Nq, heads * d]): one operation, an
        add of each head's map into float32 sums kept per head count (averaged over heads only in ``maps``)."""
        per_head = head_maps(out, heads).view(2, out.shape[0] // 2, *hw, heads)
        sums = self._sums.get(heads)
        if any(kept.shape[:4] != per_head.shape[:4] for kept in self._sums.values()):
            self._sums, sums = {}, None  # a new image size: a new run
        if sums is None:
            sums = self._sums[heads] = torch.zeros(per_head.shape, dtype=torch.float32, device=out.device)
        sums.add_(per_head)

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
