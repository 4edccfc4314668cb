"""Low-rank adapters on a host's Linear layers.

The adapters live in their own module tree and reach the host through forward hooks that are removed when
the ``attached()`` block ends, so the host's modules are never edited (the design rule for shared ComfyUI
models). Output = W x + (alpha / rank) * up(down(x)), the kohya/peft convention.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Collection, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError

# Module-name suffixes, identical in ComfyUI's LDM UNet and diffusers' UNet2DConditionModel.
_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
UNET_TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": tuple(f"attn{i}.{p}" for i in (1, 2) for p in _ATTN),
    "attention+feedforward": tuple(f"attn{i}.{p}" for i in (1, 2) for p in _ATTN) + ("ff.net.0.proj", "ff.net.2"),
    "cross_attention": tuple(f"attn2.{p}" for p in _ATTN),
}
# kohya's default text-encoder targets (CLIPAttention + CLIPMLP).
TEXT_ENCODER_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                        "mlp.fc1", "mlp.fc2")


def find_linear_targets(root: nn.Module, suffixes: tuple[str, ...]) -> dict[str, nn.Linear]:
    """Every Linear under ``root`` whose dotted path ends with one of ``suffixes``, by path."""
    found = {}
    for path, module in root.named_modules():
        if any(path == s or path.endswith("." + s) for s in suffixes):
            if not isinstance(module, nn.Linear):
                raise TypeError(f"LoRA target {path} is a {type(module).__name__}, not a Linear layer")
            found[path] = module
    return found


class LoRAAdapter:
    """One adapter's view of the network's flat weight: down [rank, in] (kaiming init), up [out, rank] (zeros),
    so training starts at W."""

    def __init__(self, network: "LoRANetwork", start: int, in_features: int, out_features: int):
        self._network, self._start = network, start
        self.in_features, self.out_features = in_features, out_features

    @property
    def rank(self) -> int:
        return self._network.rank

    @property
    def alpha(self) -> float:
        return self._network.alpha

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def _views(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r, i, o, s = self.rank, self.in_features, self.out_features, self._start
        return flat[s:s + r * i].view(r, i), flat[s + r * i:s + r * i + o * r].view(o, r)

    @property
    def down(self) -> torch.Tensor:
        return self._views(self._network.weight)[0]

    @property
    def up(self) -> torch.Tensor:
        return self._views(self._network.weight)[1]

    def factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) in the dtype the adapters compute in for input ``x`` (one cast per step, shared)."""
        return self._views(self._network.compute_weight(x))

    def add_to(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """output + scale * up(down(x)); the up-projection, scale and add are one addmm. Fewer kernels per
        step is what bounds small-batch training speed."""
        down, up = self.factors(x)
        h = F.linear(x, down)
        flat = torch.addmm(output.reshape(-1, output.shape[-1]), h.reshape(-1, h.shape[-1]), up.t(), alpha=self.scale)
        return flat.view(output.shape)

    def delta_weight(self) -> torch.Tensor:
        """The dense update this adapter adds to W (for checks and merging)."""
        return (self.up @ self.down) * self.scale


class LoRANetwork(nn.Module):
    """A set of adapters keyed by kohya module name (``lora_unet_..._to_q``), each bound to a host Linear.

    All adapter weights live in one flat fp32 parameter: per step that is one cast to the compute dtype, one
    gradient and one optimizer tensor instead of hundreds (each adapter is a view into it)."""

    def __init__(self, targets: Mapping[str, nn.Linear], rank: int, alpha: float, seed: int = 0):
        super().__init__()
        if rank < 1:
            raise InputError("rank", f"must be at least 1, got {rank}")
        if not alpha > 0:
            raise InputError("alpha", f"must be positive, got {alpha}")
        if not targets:
            raise InputError("targets", "matched no Linear layer in this model")
        self.rank, self.alpha = int(rank), float(alpha)
        self.adapters: dict[str, LoRAAdapter] = {}
        start = 0
        for name, m in targets.items():
            self.adapters[name] = LoRAAdapter(self, start, m.in_features, m.out_features)
            start += rank * (m.in_features + m.out_features)
        self.weight = nn.Parameter(torch.zeros(start))
        g = torch.Generator().manual_seed(seed)  # the run's seed fixes the initial adapters too
        with torch.no_grad():
            for a in self.adapters.values():
                nn.init.kaiming_uniform_(a.down, a=math.sqrt(5), generator=g)
        # A plain dict, not submodules: the host's layers must stay out of our parameters and state dict.
        self._targets = dict(targets)
        self._cast: tuple[tuple, torch.Tensor] | None = None
        self.enabled = True

    def compute_weight(self, x: torch.Tensor) -> torch.Tensor:
        """The flat weight in the dtype the adapters compute in, cast once per optimizer step (the cast is
        reused by every adapter until the weight changes)."""
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        if dtype == self.weight.dtype:
            return self.weight
        key = (dtype, self.weight._version, torch.is_grad_enabled())
        if self._cast is None or self._cast[0] != key:
            self._cast = (key, self.weight.to(dtype))
        return self._cast[1]

    @property
    def targets(self) -> dict[str, nn.Linear]:
        """The host layer of each adapter, by adapter name."""
        return dict(self._targets)

    @contextmanager
    def attached(self, names: Collection[str] | None = None) -> Iterator["LoRANetwork"]:
        """Hook every adapter (or those in ``names``) onto its host layer for the duration of the block."""
        handles = []
        try:
            for name, host in self._targets.items():
                if names is None or name in names:
                    handles.append(host.register_forward_hook(_adding_hook(self.adapters[name])))
            yield self
        finally:
            self._cast = None
            for h in handles:
                h.remove()

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The host's own output while the block runs (the frozen model, for prior-prediction targets)."""
        before, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = before

    def kohya_state_dict(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        """``{name}.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``: the layout kohya, A1111 and ComfyUI load."""
        out = {}
        for name, a in self.adapters.items():
            out[f"{name}.lora_down.weight"] = a.down.detach().to("cpu", dtype).contiguous()
            out[f"{name}.lora_up.weight"] = a.up.detach().to("cpu", dtype).contiguous()
            out[f"{name}.alpha"] = torch.tensor(a.alpha, dtype=dtype)
        return out

    def load_kohya_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        """Inverse of ``kohya_state_dict``; every adapter must be present with the same rank and one alpha."""
        expected = {f"{n}.{s}" for n in self.adapters for s in ("lora_down.weight", "lora_up.weight", "alpha")}
        missing, unexpected = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
        if missing or unexpected:
            raise ValueError(f"LoRA keys do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
        alphas = {float(sd[f"{n}.alpha"]) for n in self.adapters}
        if len(alphas) != 1:
            raise ValueError(f"LoRA file has several alpha values {sorted(alphas)}; this network has one")
        with torch.no_grad():
            for name, a in self.adapters.items():
                down, up = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"]
                if down.shape != a.down.shape or up.shape != a.up.shape:
                    raise ValueError(f"{name}: shapes {tuple(down.shape)}/{tuple(up.shape)} do not match this network")
                a.down.copy_(down)
                a.up.copy_(up)
        self.alpha = alphas.pop()


class TrainedLoRA(dict):
    """A kohya-key state dict (what ComfyUI's LORA_MODEL carries, so its own nodes accept it) plus the
    training metadata our Save node writes into the file."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None):
        super().__init__(tensors)
        self.metadata = dict(metadata or {})


def _adding_hook(adapter: LoRAAdapter):
    def hook(_module, args, output):
        return adapter.add_to(output, args[0]) if adapter._network.enabled else output

    return hook
