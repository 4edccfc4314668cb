"""The optimisers a trainer can use. AdamW keeps two fp32 moments per weight; Adafactor factors its second moment
into a row and a column vector per matrix and keeps no first moment, so a full fine-tune needs about half the
memory (SDXL DreamBooth: the weights' fp32 copies and gradients, not their AdamW states).

Adafactor is transformers' with kohya's settings (``scale_parameter=False, relative_step=False``): the learning
rate is the step size, as for AdamW. torch's own Adafactor always scales the step by each weight's RMS (a
different learning rate) and reads that RMS back to the host for every tensor at every step.

``adafactor_fused`` steps each weight from a hook as soon as backward has its whole gradient, then frees that
gradient (kohya's ``--fused_backward_pass``; PyTorch's "optimizer step in backward" recipe): the gradients of a
full fine-tune never all exist at once (SDXL DreamBooth 12.4 GiB against Adafactor's 20.9). The per-weight steps
run on the autograd thread between backward's kernels, which makes a step 1.2-1.5x Adafactor's. Each weight's
gradient is clipped on its own (the global norm is only known after backward), and gradients cannot accumulate
over micro-batches."""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch

OPTIMIZERS = ("adamw", "adafactor", "adafactor_fused")
# Memory per trained weight besides the optimiser's state (state_bytes): its fp32 copy (4 bytes) and its fp32
# gradient (4, except fused, where one tensor's gradient lives at a time).
BYTES_PER_WEIGHT = {"adamw": 8, "adafactor": 8, "adafactor_fused": 4}
# kohya's ss_optimizer values
METADATA_NAMES = {"adamw": "torch.optim.AdamW", "adafactor": "transformers.optimization.Adafactor",
                  "adafactor_fused": "transformers.optimization.Adafactor"}


def state_bytes(name: str, shapes: Sequence[torch.Size]) -> int:
    """The optimiser's fp32 state for weights of these shapes: AdamW two moments per weight; Adafactor a row and a
    column vector over the last two dimensions (a 3x3 convolution's are each a third of the weight: a UNet rich in
    convolutions, such as SD1.5's, keeps ~2 bytes per weight, SDXL's ~0.4), one value per weight of a vector."""
    if name == "adamw":
        return 8 * sum(math.prod(s) for s in shapes)
    return 4 * sum(math.prod(s[:-1]) + math.prod(s[:-2]) * s[-1] if len(s) >= 2 else math.prod(s) for s in shapes)


def capturable(name: str) -> bool:
    """Whether a CUDA graph can replay this optimiser's step (fused AdamW can; Adafactor counts its steps in
    Python)."""
    return name == "adamw"


def make_optimizer(name: str, groups: Sequence[tuple[list[torch.Tensor], float]], device: torch.device,
                   graphed: bool, max_grad_norm: float = 0.0) -> torch.optim.Optimizer | FusedBackward:
    """``groups``: (parameters, learning rate). Graphed, the learning rate is a device tensor so the replayed step
    applies the schedule itself (fused AdamW reads it on the device). ``max_grad_norm`` is for the fused kind
    only, which clips inside backward; the caller clips the others."""
    if name == "adafactor_fused":
        return FusedBackward(groups, max_grad_norm)
    on_gpu = device.type == "cuda"
    param_groups = [{"params": params, "lr": torch.tensor(lr, device=device) if graphed else lr}
                    for params, lr in groups]
    if name == "adafactor":
        return _adafactor(param_groups)
    return torch.optim.AdamW(param_groups, fused=on_gpu or None, capturable=graphed)


def _adafactor(param_groups: list[dict]) -> torch.optim.Optimizer:
    from transformers.optimization import Adafactor  # ComfyUI ships transformers

    return Adafactor(param_groups, lr=param_groups[0]["lr"], scale_parameter=False, relative_step=False,
                     warmup_init=False)


class FusedBackward:
    """Adafactor stepped inside backward: one optimiser per weight, run by the weight's post-accumulate-grad hook
    (after backward has summed every contribution, so nothing later in backward reads the old value). ``step`` and
    ``zero_grad`` have nothing left to do; ``param_groups`` are the per-weight groups (the lr schedule sets them).
    The hooks exist only inside ``with`` (removed also on an error or Cancel)."""

    def __init__(self, groups: Sequence[tuple[list[torch.Tensor], float]], max_grad_norm: float):
        self._optimizers = [_adafactor([{"params": [p], "lr": lr}]) for params, lr in groups for p in params]
        self.param_groups = [o.param_groups[0] for o in self._optimizers]
        self._max_grad_norm = max_grad_norm
        self._hooks: list = []

    def __enter__(self) -> "FusedBackward":
        self._hooks = [o.param_groups[0]["params"][0].register_post_accumulate_grad_hook(
            functools.partial(self._step, o, self._max_grad_norm)) for o in self._optimizers]
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @staticmethod
    def _step(optimizer: torch.optim.Optimizer, max_grad_norm: float, weight: torch.Tensor) -> None:
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([weight], max_grad_norm)
        optimizer.step()
        weight.grad = None
