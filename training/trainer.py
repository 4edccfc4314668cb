"""The training loop shared by every trainer: noise, target per parameterisation, loss, optimiser step."""
from __future__ import annotations

import functools
import logging
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import cuda_graph
from .errors import InputError, TrainingDiverged
from .schedule import NoiseSchedule
from .task import Conditioning, DiffusionTask

log = logging.getLogger(__name__)

DTYPES = ("auto", "bf16", "fp16", "fp32")
_GRAPH_WARMUP_STEPS = 3  # eager steps before capture (lazy optimiser state, kernel selection)
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    learning_rate: float
    batch_size: int = 1
    seed: int = 0
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    max_grad_norm: float = 1.0
    report_every: int = 10  # how often losses are read back from the device (each read is a sync)
    cuda_graph: bool = True  # replay the step as a CUDA graph when the run allows it (see cuda_graph.py)

    def validate(self) -> None:
        if self.steps < 1:
            raise InputError("steps", f"must be at least 1, got {self.steps}")
        if not self.learning_rate > 0:
            raise InputError("learning_rate", f"must be positive, got {self.learning_rate}")
        if self.batch_size < 1:
            raise InputError("batch_size", f"must be at least 1, got {self.batch_size}")
        if self.dtype not in DTYPES:
            raise InputError("dtype", f"must be one of {DTYPES}, got {self.dtype!r}")


@dataclass(frozen=True)
class Precision:
    autocast: torch.dtype | None  # None: run in the weights' own dtype
    grad_scaling: bool


def resolve_precision(requested: str, device: torch.device, weight_dtype: torch.dtype) -> Precision:
    """"auto": compute in the weights' own dtype when it is fp16/bf16 (no per-layer weight or activation casts;
    fp16 with loss scaling), fp32 weights in bf16 autocast on a GPU that has it, fp32 on the CPU. fp16 always
    gets loss scaling (GradScaler + fused AdamW skip bad steps on the device, so the step stays graph-capturable)."""
    if requested == "auto":
        if weight_dtype in (torch.float16, torch.bfloat16) or device.type != "cuda":
            return Precision(None, weight_dtype == torch.float16)
        requested = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested == "fp32" and weight_dtype != torch.float32:
        raise InputError("dtype", f"fp32 needs fp32 weights, but the model is loaded in {weight_dtype}; "
                                  "choose auto/bf16/fp16 or start ComfyUI with --force-fp32")
    wanted = _TORCH_DTYPES[requested]
    return Precision(None if wanted == weight_dtype else wanted, wanted == torch.float16)


@contextmanager
def gradient_checkpointing(blocks: Sequence[nn.Module], enabled: bool = True) -> Iterator[None]:
    """Recompute each block's activations in backward instead of storing them. Shadows ``forward`` on the
    instance for the duration of the block only; the class and the block's weights are untouched."""
    wrapped = []
    try:
        if enabled:
            for block in blocks:
                block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
                wrapped.append(block)
        yield
    finally:
        for block in wrapped:
            del block.forward


class BatchSampler:
    """Epochs of a seeded permutation, so every image is seen once per epoch."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next(self) -> torch.Tensor:
        picked = []
        while len(picked) < self.batch_size:
            if not self.order:
                self.order = torch.randperm(self.n, generator=self.generator).tolist()
            picked.append(self.order.pop())
        return torch.tensor(picked)


Progress = Callable[[int, list[float]], None]


def train(task: DiffusionTask, latents: torch.Tensor,
          conditioning: Conditioning | Callable[[torch.Tensor], Conditioning],
          params: Sequence[nn.Parameter], cfg: TrainConfig, progress: Progress | None = None) -> list[float]:
    """Minimise MSE(model(x_t, t, c), target) over ``params``; returns the per-step loss.

    ``conditioning`` is either every image's conditioning (fixed: the step can run as a CUDA graph) or a
    function of the batch's indices (e.g. encoding captions with gradients when the text encoder trains).
    ``progress(step_done, losses_so_far)`` runs after every step and may raise to cancel.
    """
    cfg.validate()
    device = task.device
    schedule = NoiseSchedule(task.schedule.alphas_cumprod.to(device), task.schedule.prediction)
    precision = resolve_precision(cfg.dtype, device, task.weight_dtype)
    fixed_cond = conditioning.to(device).clone() if isinstance(conditioning, Conditioning) else None
    graphed = cfg.cuda_graph and device.type == "cuda" and fixed_cond is not None
    params = [p for p in params if p.requires_grad]
    on_gpu = device.type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, fused=on_gpu or None, capturable=graphed)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.grad_scaling)
    sampler = BatchSampler(latents.shape[0], cfg.batch_size, cfg.seed)
    host_index = torch.stack([sampler.next() for _ in range(cfg.steps)])  # [steps, batch], fixed by the seed
    device_index = host_index.to(device)
    step_counter = torch.zeros(1, dtype=torch.long, device=device)  # advanced on the device, inside the step
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    x0_all = latents.to(device, torch.float32).clone()  # a normal tensor even if the host made it in inference mode
    losses_dev = torch.zeros(cfg.steps, device=device)

    def step(index_on_host: torch.Tensor | None = None) -> None:
        index = device_index.index_select(0, step_counter).view(-1)
        x0 = x0_all.index_select(0, index)
        noise = torch.randn(x0.shape, generator=generator, device=device)
        t = torch.randint(0, schedule.num_timesteps, (x0.shape[0],), generator=generator, device=device)
        cond = fixed_cond.select(index) if fixed_cond is not None else conditioning(index_on_host)
        with torch.autocast(device.type, dtype=precision.autocast, enabled=precision.autocast is not None,
                            cache_enabled=False):
            pred = task.predict(schedule.add_noise(x0, noise, t), t, cond)
        loss = F.mse_loss(pred.float(), schedule.target(x0, noise, t))
        scaler.scale(loss).backward()
        if cfg.max_grad_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm, foreach=on_gpu or None)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses_dev.index_copy_(0, step_counter, loss.detach().view(1))
        step_counter.add_(1)

    log.info("training %d parameters for %d steps (batch %d, %s%s) on %s", sum(p.numel() for p in params),
             cfg.steps, cfg.batch_size, precision.autocast or task.weight_dtype, ", CUDA graph" if graphed else "",
             device)
    losses: list[float] = []
    graph = None
    side = torch.cuda.Stream(device) if graphed else None  # warm-up before capture runs on a side stream
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(device))  # the data copies above ran on the default stream
    with gradient_checkpointing(task.checkpoint_blocks, cfg.gradient_checkpointing):
        for i in range(cfg.steps):
            if side is not None and i == _GRAPH_WARMUP_STEPS:
                torch.cuda.current_stream(device).wait_stream(side)
                side = None
                graph = cuda_graph.capture(step, generator)
            if graph is not None:
                graph.replay()
            else:
                with torch.cuda.stream(side) if side is not None else nullcontext():
                    step(host_index[i])
            if (i + 1) % cfg.report_every == 0 or i + 1 == cfg.steps:
                if on_gpu:
                    torch.cuda.synchronize(device)
                losses.extend(_read_back(losses_dev, len(losses), i + 1))
            if progress is not None:
                progress(i + 1, losses)
    return losses


@torch.no_grad()
def fixed_noise_loss(task: DiffusionTask, latents: torch.Tensor, cond: Conditioning, seed: int = 1234,
                     repeats: int = 4) -> float:
    """Loss on noise and timesteps fixed by ``seed``: comparable before and after training (validation loss)."""
    g = torch.Generator(device=task.device).manual_seed(seed)
    x0 = latents.to(task.device, torch.float32).repeat(repeats, 1, 1, 1)
    c = Conditioning.cat([cond] * repeats)
    noise = torch.randn(x0.shape, generator=g, device=task.device)
    t = torch.randint(0, task.schedule.num_timesteps, (x0.shape[0],), generator=g, device=task.device)
    pred = task.predict(task.schedule.add_noise(x0, noise, t), t, c)
    return F.mse_loss(pred.float(), task.schedule.target(x0, noise, t)).item()


def _read_back(losses_dev: torch.Tensor, start: int, end: int) -> list[float]:
    """Copy a window of losses to the host and stop at the first non-finite one."""
    chunk = losses_dev[start:end].tolist()
    for i, value in enumerate(chunk):
        if not math.isfinite(value):
            raise TrainingDiverged(start + i, value)
    return chunk
