"""The optimisers a trainer can use. AdamW keeps two fp32 moments per weight; Adafactor factors its second moment
into a row and a column vector per matrix and keeps no first moment, so a full fine-tune needs about half the
memory (SDXL DreamBooth: the weights' fp32 copies and gradients, not their AdamW states).

Adafactor is transformers' with kohya's settings (``scale_parameter=False, relative_step=False``): the learning
rate is the step size, as for AdamW. torch's own Adafactor always scales the step by each weight's RMS (a
different learning rate) and reads that RMS back to the host for every tensor at every step."""
from __future__ import annotations

from typing import Sequence

import torch

OPTIMIZERS = ("adamw", "adafactor")
# Memory per trained weight beyond its own fp32 copy and gradient (8 bytes): AdamW's two moments; Adafactor's
# factored state is a few bytes per row and column, about nothing per weight.
STATE_BYTES = {"adamw": 8, "adafactor": 0}
# kohya's ss_optimizer values
METADATA_NAMES = {"adamw": "torch.optim.AdamW", "adafactor": "transformers.optimization.Adafactor"}


def capturable(name: str) -> bool:
    """Whether a CUDA graph can replay this optimiser's step (fused AdamW can; Adafactor counts its steps in
    Python)."""
    return name == "adamw"


def make_optimizer(name: str, groups: Sequence[tuple[list[torch.Tensor], float]], device: torch.device,
                   graphed: bool) -> torch.optim.Optimizer:
    """``groups``: (parameters, learning rate). Graphed, the learning rate is a device tensor so the replayed step
    applies the schedule itself (fused AdamW reads it on the device)."""
    on_gpu = device.type == "cuda"
    param_groups = [{"params": params, "lr": torch.tensor(lr, device=device) if graphed else lr}
                    for params, lr in groups]
    if name == "adafactor":
        from transformers.optimization import Adafactor  # ComfyUI ships transformers

        return Adafactor(param_groups, lr=groups[0][1], scale_parameter=False, relative_step=False,
                         warmup_init=False)
    return torch.optim.AdamW(param_groups, fused=on_gpu or None, capturable=graphed)
