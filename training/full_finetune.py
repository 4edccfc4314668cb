"""Full fine-tuning (DreamBooth) without touching the host's weights.

Every parameter of the trained module gets a trainable fp32 copy (the master weights: DreamBooth's learning
rates of ~5e-6 are below bf16/fp16 resolution, so updates to half-precision weights would round away). The
copies are put into the modules' parameter slots only while ``swapped_in()`` runs and the host's weights are
put back afterwards (from CPU copies, so the GPU holds one UNet while training, not two). The result is the
difference to the starting weights, which ComfyUI applies as ``diff`` patches (what a ``.diff`` LoRA file does)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

import torch
from torch import nn


class FullFineTune(nn.Module):
    """Trainable copies of every parameter under ``root``. ``channels_last``: 4-D weights are stored NHWC (the
    layout cuDNN's half-precision convolutions want), values unchanged.

    Memory: the copies are made when ``swapped_in()`` first puts them in place, one weight at a time, each right
    after its host tensor leaves the module; when the block ends, each copy becomes its difference to the start, in
    ``delta_dtype`` on the CPU, before its host tensor comes back. Made all at once, or kept while the host's
    weights return, the host's UNet and the fp32 copies shared the device (SDXL: 4.8 + 9.6 GiB, more than
    Adafactor's fused step needs to train: 12.4). Outside the block the parameters (the objects an optimiser is
    given) are empty."""

    def __init__(self, root: nn.Module, device: torch.device | str, channels_last: bool = False,
                 delta_dtype: torch.dtype = torch.float32):
        super().__init__()
        self._slots: list[tuple[nn.Module, str, str]] = []
        self._device, self._channels_last, self._delta_dtype = torch.device(device), channels_last, delta_dtype
        self._deltas: dict[str, torch.Tensor] = {}  # trained - start, after a swap ended
        copies, start = {}, {}
        with torch.no_grad():
            for module_name, module in root.named_modules():
                for pname, p in module._parameters.items():
                    if p is None:
                        continue
                    name = f"{module_name}.{pname}" if module_name else pname
                    copies[name.replace(".", "/")] = nn.Parameter(torch.empty(0, device=device))
                    start[name] = p.detach().to("cpu", copy=True)  # kept in the host's dtype
                    self._slots.append((module, pname, name))
        self.weights = nn.ParameterDict(copies)
        self._start = start

    def named_weights(self) -> Iterator[tuple[str, nn.Parameter]]:
        for _, _, name in self._slots:
            yield name, self.weights[name.replace(".", "/")]

    @torch.no_grad()
    def _make(self, copy: nn.Parameter, name: str) -> None:
        """The fp32 master weight (the start plus what an earlier swap trained) into the parameter object the
        optimiser holds."""
        w = self._start[name].to(self._device, torch.float32, copy=True)
        if name in self._deltas:
            w += self._deltas[name].to(self._device, torch.float32)
        if self._channels_last and w.dim() == 4:
            w = w.contiguous(memory_format=torch.channels_last)
        copy.data = w

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Our copies in the modules' slots for the block. The host's tensors are not kept meanwhile (on a GPU
        that frees a whole second UNet): they are put back from the CPU copies taken at construction, the same
        values on the same device, when the block ends, also on an error or Cancel."""
        placed = []
        try:
            for module, pname, name in self._slots:
                original = module._parameters[pname]
                placed.append((module, pname, name, original.device, original.requires_grad))
                module._parameters[pname] = None  # the host's tensor goes before its copy is made
                del original
                copy = self.weights[name.replace(".", "/")]
                self._make(copy, name)
                module._parameters[pname] = copy
            yield
        finally:
            with torch.no_grad():
                for module, pname, name, device, requires_grad in placed:
                    copy = self.weights[name.replace(".", "/")]
                    if copy.numel():  # (a copy that failed to be made keeps the earlier difference)
                        self._deltas[name] = (copy.detach() - self._start[name].to(copy.device, torch.float32)).to(
                            "cpu", self._delta_dtype).contiguous()
                    copy.data = torch.empty(0, device=self._device)
                    module._parameters[pname] = nn.Parameter(self._start[name].to(device, copy=True),
                                                             requires_grad=requires_grad)

    @torch.no_grad()
    def deltas(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        """{parameter name: trained - start}, contiguous on the CPU, in ``dtype``; during a swap from the copies,
        after it from the differences kept when it ended."""
        out = {}
        for name, w in self.named_weights():
            if w.numel():
                out[name] = (w.float().cpu() - self._start[name].float()).to(dtype).contiguous()
            else:
                out[name] = self._deltas.get(name, torch.zeros_like(self._start[name])).to(dtype).contiguous()
        return out


def diff_state_dict(deltas: dict[str, torch.Tensor], prefix: str,
                    names: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """ComfyUI's generic diff format: ``<prefix><module>.diff`` for a weight, ``.diff_b`` for a bias, other
    parameters as ``<prefix><name>.diff``. LoraLoader applies it as ``weight += strength * diff``. ``names`` renames
    modules (``<prefix><module>`` -> e.g. a kohya name, which A1111/Forge read too)."""
    names = names or {}
    out = {}
    for name, d in deltas.items():
        if name.endswith(".weight"):
            module, part = name[:-len(".weight")], "diff"
        elif name.endswith(".bias"):
            module, part = name[:-len(".bias")], "diff_b"
        else:
            module, part = name, "diff"
        out[f"{names.get(prefix + module, prefix + module)}.{part}"] = d
    return out
