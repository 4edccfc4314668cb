"""The training loop shared by every trainer: noise, target per parameterisation, loss, optimiser step."""
from __future__ import annotations

import functools
import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import cuda_graph
from .backward_memory import gradient_checkpointing, gradients_only_for
from .batches import BucketBatchSampler, TrainingData, class_plan
from .errors import InputError, TrainingDiverged
from .objective import LR_SCHEDULES, Objective, lr_factor, per_sample_mse, prior_preservation_loss
from .optimizers import OPTIMIZERS, FusedBackward, capturable, make_optimizer
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
    max_grad_norm: float = 1.0  # 0: no clipping
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    gradient_accumulation: int = 1  # micro-batches per optimiser step
    ema_decay: float = 0.0  # 0: off; else the trained weights returned are the exponential moving average
    objective: Objective = Objective()
    report_every: int = 10  # how often losses are read back from the device (each read is a sync)
    check_every: int = 0  # save steps: read back (stop on a non-finite loss) and hand progress the EMA weights
    cuda_graph: bool = True  # replay the step as a CUDA graph when the run allows it (see cuda_graph.py)
    optimizer: str = "adamw"  # optimizers.OPTIMIZERS

    def validate(self, num_timesteps: int = 1000) -> None:
        if self.steps < 1:
            raise InputError("steps", f"must be at least 1, got {self.steps}")
        if not self.learning_rate > 0:
            raise InputError("learning_rate", f"must be positive, got {self.learning_rate}")
        if self.batch_size < 1:
            raise InputError("batch_size", f"must be at least 1, got {self.batch_size}")
        if self.dtype not in DTYPES:
            raise InputError("dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise InputError("lr_schedule", f"must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.warmup_steps < 0 or (self.warmup_steps and self.warmup_steps >= self.steps):
            raise InputError("warmup_steps", f"must be below steps ({self.steps}), got {self.warmup_steps}")
        if self.gradient_accumulation < 1:
            raise InputError("gradient_accumulation", f"must be at least 1, got {self.gradient_accumulation}")
        if not 0 <= self.ema_decay < 1:
            raise InputError("ema_decay", f"must be 0 (off) or in (0, 1), got {self.ema_decay}")
        if not self.max_grad_norm >= 0:  # NaN too: it turned clipping off
            raise InputError("max_grad_norm", f"must be 0 (off) or positive, got {self.max_grad_norm}")
        if self.optimizer not in OPTIMIZERS:
            raise InputError("optimizer", f"must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.optimizer == "adafactor_fused" and self.gradient_accumulation > 1:
            raise InputError("gradient_accumulation", "adafactor_fused updates each weight as soon as backward has "
                                                      "its gradient, so gradients cannot add up over micro-batches; "
                                                      "set it to 1 or choose adafactor")
        self.objective.validate(num_timesteps)


@dataclass(frozen=True)
class ParamGroup:
    """Parameters trained with their own learning rate (pivotal tuning: embedding and LoRA)."""

    params: Sequence[nn.Parameter]
    learning_rate: float


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


Progress = Callable[[int, list[float]], None]


def train(task: DiffusionTask, data: TrainingData, params: Sequence[nn.Parameter] | Sequence[ParamGroup],
          cfg: TrainConfig, progress: Progress | None = None,
          frozen: Callable[[], ContextManager] | None = None,
          regularizer: Callable[[], torch.Tensor] | None = None) -> list[float]:
    """Minimise the objective over ``params`` on ``data``; returns the per-step diffusion loss. ``regularizer()``,
    a term on the trained parameters alone, is added to the objective once per optimiser step (not reported).

    The step runs as a CUDA graph when everything it reads is on the device: cached conditioning and one
    bucket. ``frozen()`` must switch the trained adapters off for its block (the "prior_prediction" mode's
    target). ``progress(step_done, losses_so_far)`` runs after every step and may raise to cancel.
    """
    cfg.validate(task.schedule.num_timesteps)
    if data.prior == "prior_prediction" and frozen is None:
        raise InputError("prior", "prior_prediction needs the frozen model, which this trainer cannot give; "
                                  "use class images")
    device, obj = task.device, cfg.objective
    schedule = NoiseSchedule(task.schedule.alphas_cumprod.to(device), task.schedule.prediction)
    precision = resolve_precision(cfg.dtype, device, task.weight_dtype)
    if precision.grad_scaling and cfg.optimizer == "adafactor_fused":  # an overflow is seen only after backward
        raise InputError("optimizer", "adafactor_fused cannot skip a step that overflowed in fp16, so it needs bf16 "
                                      "or fp32 training (dtype); choose adafactor for fp16")
    buckets = [b.to(device) for b in data.buckets]
    on_gpu = device.type == "cuda"
    device_text = data.prompt_encoder is not None and not data.cached  # the text side trains, on the device
    graphed = (cfg.cuda_graph and on_gpu and (data.cached or device_text) and len(buckets) == 1
               and capturable(cfg.optimizer))
    groups = [g if isinstance(g, ParamGroup) else None for g in params]
    groups = ([ParamGroup([p for p in g.params if p.requires_grad], g.learning_rate) for g in groups]
              if all(groups) else [ParamGroup([p for p in params if p.requires_grad], cfg.learning_rate)])
    flat = [p for g in groups for p in g.params]
    optimizer = make_optimizer(cfg.optimizer, [(g.params, g.learning_rate) for g in groups], device, graphed,
                               cfg.max_grad_norm)
    fused = isinstance(optimizer, FusedBackward)  # it steps inside backward
    base_lrs = ([g.learning_rate for g in groups for _ in g.params] if fused  # an optimiser group per weight
                else [g.learning_rate for g in groups])
    scaler = torch.amp.GradScaler(device.type, enabled=precision.grad_scaling)
    ema = [p.detach().clone() for p in flat] if cfg.ema_decay > 0 else None
    ema_dtypes = {e.dtype for e in ema or ()}

    scheduled = cfg.lr_schedule != "constant" or cfg.warmup_steps > 0  # else the lr never changes
    accum, bs = cfg.gradient_accumulation, cfg.batch_size
    sampler = BucketBatchSampler([b.latents.shape[0] for b in buckets], bs, cfg.seed)
    plan = [[sampler.next() for _ in range(accum)] for _ in range(cfg.steps)]  # fixed by the seed
    plan_rows = torch.tensor([[rows for _, rows in micro] for micro in plan]).to(device)  # [steps, accum, bs]
    n_class = buckets[0].class_latents.shape[0] if data.prior == "class_images" else 1
    class_rows = class_plan(cfg.steps * accum, bs, n_class, cfg.seed).view(cfg.steps, accum, bs).to(device)
    step_counter = torch.zeros(1, dtype=torch.long, device=device)  # advanced on the device, inside the step
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    losses_dev = torch.zeros(cfg.steps, device=device)
    autocast = functools.partial(torch.autocast, device.type, dtype=precision.autocast,
                                 enabled=precision.autocast is not None, cache_enabled=False)

    if device_text:  # which encoded prompt each row, "" and the class prompt are
        index = {p: i for i, p in enumerate(data.prompt_encoder.prompts)}
        prompt_rows = [torch.tensor([index[c] for c in b.captions], device=device) for b in buckets]
        empty_row = torch.tensor([index[""]], device=device) if data.caption_dropout > 0 else None
        class_row = torch.tensor([index[data.class_prompt]], device=device) if data.prior else None

    def conditioning(bucket_id: int, rows: torch.Tensor, host_rows: list[int] | None, n: int):
        """(per-sample conditioning, class prompt conditioning) for a micro-batch."""
        bucket = buckets[bucket_id]
        if bucket.cond is not None:
            cond, empty, klass = bucket.cond.select(rows), bucket.empty_cond, bucket.class_cond
        elif device_text:  # the text side trains: every prompt in one call, no host work
            everything = data.prompt_encoder(bucket.size)
            cond = everything.select(prompt_rows[bucket_id].index_select(0, rows))
            empty = everything.select(empty_row) if empty_row is not None else None
            klass = everything.select(class_row) if class_row is not None else None
        else:  # the text side trains: encode with gradients, all in one call
            extra = ([""] if data.caption_dropout > 0 else []) + ([data.class_prompt] if data.prior else [])
            everything = data.encode([bucket.captions[i] for i in host_rows] + extra, bucket.size)
            cond, rest = everything.split(n)
            empty = rest.split(1)[0] if data.caption_dropout > 0 else None
            klass = rest.split(len(rest) - 1)[1] if data.prior else None
        if data.caption_dropout > 0:
            drop = torch.rand(n, generator=generator, device=device) < data.caption_dropout
            cond = cond.where(drop, empty.expand(n))
        return cond, klass

    # prior_prediction's target is the frozen model's, its text encoder included: where the text side trains, the
    # class prompt is encoded once with the adapters off (encoded each step, it would follow the trained encoder)
    frozen_class = {}
    if data.prior == "prior_prediction" and any(b.cond is None for b in buckets):
        with torch.no_grad(), frozen():
            for i, b in enumerate(buckets):
                if b.cond is None:
                    frozen_class[i] = (data.prompt_encoder(b.size).select(class_row) if device_text
                                       else data.encode([data.class_prompt], b.size))

    def micro_step(k: int, bucket_id: int, host_rows: list[int] | None) -> torch.Tensor:
        bucket = buckets[bucket_id]
        rows = plan_rows.index_select(0, step_counter)[0, k]
        x0 = bucket.latents.index_select(0, rows)
        micro = None if bucket.micro is None else bucket.micro.index_select(0, rows)  # SDXL size/crop, per row
        if bucket.flipped is not None:
            mirror = torch.rand(bs, generator=generator, device=device) < 0.5
            x0 = torch.where(mirror.view(-1, 1, 1, 1), bucket.flipped.index_select(0, rows), x0)
            if micro is not None:
                micro = torch.where(mirror.view(-1, 1), bucket.flipped_micro.index_select(0, rows), micro)
        cond, class_cond = conditioning(bucket_id, rows, host_rows, bs)
        cond = cond.with_y_tail(micro)
        class_micro = micro  # prior_prediction's class half is the subject images again
        if data.prior == "class_images":
            crows = class_rows.index_select(0, step_counter)[0, k]
            x0 = torch.cat([x0, bucket.class_latents.index_select(0, crows)])
            class_micro = None if bucket.class_micro is None else bucket.class_micro.index_select(0, crows)
        elif data.prior == "prior_prediction":
            x0 = torch.cat([x0, x0])
        if data.prior:
            cond = Conditioning.cat([cond, class_cond.expand(bs).with_y_tail(class_micro)])
        noise = obj.noise(x0.shape, generator, device)
        t = obj.timesteps(x0.shape[0], generator, device)
        x_t = schedule.add_noise(x0, noise, t)
        target = schedule.target(x0, noise, t)
        if data.prior == "prior_prediction":
            with torch.no_grad(), frozen(), autocast():
                prior_target = task.predict(x_t[bs:], t[bs:],
                                            frozen_class.get(bucket_id, class_cond).expand(bs).with_y_tail(micro))
            target = torch.cat([target[:bs], prior_target.float()])
        with autocast():
            pred = task.predict(x_t, t, cond)
        if data.prior is None and obj.min_snr_gamma <= 0:  # the plain case in fewer kernels (small batches)
            loss = F.mse_loss(pred.float(), target)
        else:
            weights = obj.sample_weights(schedule.alphas_cumprod[t], schedule.prediction)
            loss = prior_preservation_loss(per_sample_mse(pred, target), weights, bs, data.prior_weight)
        if accum > 1:
            loss = loss / accum
        objective = loss if regularizer is None or k else loss + regularizer().to(loss.device, loss.dtype)
        scaler.scale(objective).backward()
        return loss.detach()  # the reported loss stays the diffusion loss, comparable across trainers

    def step(i: int | None = None) -> None:
        """One optimiser step; ``i`` (the host's step index) is None when recorded into a CUDA graph."""
        # Fused AdamW updates the weights without bumping their version counter: caches keyed on it (the LoRA's
        # cast to the compute dtype) would keep serving the first step's weights. Bumping it here also makes a
        # capture record the cast, so every replay recomputes it.
        torch.autograd.graph.increment_version(flat)
        if graphed and scheduled:
            factor = lr_factor(step_counter, cfg.steps, cfg.lr_schedule, cfg.warmup_steps)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"].copy_(base * factor.view(()))
        total = None
        for k in range(accum):
            bucket_id, host_rows = (0, None) if i is None else plan[i][k]
            loss = micro_step(k, bucket_id, None if data.cached or device_text else host_rows)
            total = loss if total is None else total + loss
        if not fused:
            if cfg.max_grad_norm > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(flat, cfg.max_grad_norm, foreach=on_gpu or None)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            # the decay warms up as in diffusers' EMAModel, min(decay, (1 + t) / (10 + t)): a fixed 0.999 would
            # return 61% of the untrained start after 500 steps. On the device, so a CUDA graph replays it.
            t = step_counter.to(torch.float32)
            follow = 1.0 - torch.clamp((1.0 + t) / (10.0 + t), max=cfg.ema_decay).view(())
            by_dtype = {dtype: follow.to(dtype) for dtype in ema_dtypes}
            torch._foreach_lerp_(ema, [p.detach() for p in flat], [by_dtype[e.dtype] for e in ema])
        losses_dev.index_copy_(0, step_counter, total.view(1))
        step_counter.add_(1)

    log.info("training %d parameters for %d steps (batch %d x %d%s, %s%s) on %s", sum(p.numel() for p in flat),
             cfg.steps, bs, accum, f", prior {data.prior}" if data.prior else "",
             precision.autocast or task.weight_dtype, ", CUDA graph" if graphed else "", device)
    losses: list[float] = []
    graph, transient = None, 0
    side = torch.cuda.Stream(device) if graphed else None  # warm-up before capture runs on a side stream
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(device))  # the data copies above ran on the default stream
    with gradient_checkpointing(task.checkpoint_blocks, cfg.gradient_checkpointing), \
            gradients_only_for(task.frozen_modules, flat), optimizer if fused else nullcontext():
        for i in range(cfg.steps):
            if not graphed and scheduled:
                factor = float(lr_factor(torch.tensor(i), cfg.steps, cfg.lr_schedule, cfg.warmup_steps))
                for group, base in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = base * factor
            if side is not None and i == _GRAPH_WARMUP_STEPS:
                torch.cuda.current_stream(device).wait_stream(side)
                warmup_stream, side = side, None
                # The warm-up's freed blocks stay cached in the general pool, which the graph's private pool
                # cannot use: hand them back first, or a run near the memory limit fails at capture.
                torch.cuda.synchronize(device)
                # Two upper bounds of the step's transient memory; the smaller is the tighter one. The peak may be
                # older than the step (model setup); the cached blocks may include setup's leftovers.
                transient = min(transient, torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
                torch.cuda.empty_cache()
                if cuda_graph.capture_fits(transient, device):
                    graph = cuda_graph.capture(step, generator, warmup_stream)
                    if graph is None:  # a failed capture leaves the generator bound to it: continue on a fresh one
                        generator = torch.Generator(device=device).manual_seed(cfg.seed + i)
                        torch.cuda.empty_cache()
            if graph is not None:
                graph.replay()
            else:
                before = torch.cuda.memory_allocated(device) if side is not None else 0
                with torch.cuda.stream(side) if side is not None else nullcontext():
                    step(i)
                if side is not None:
                    transient = torch.cuda.max_memory_allocated(device) - before
            if ((i + 1) % cfg.report_every == 0 or i + 1 == cfg.steps
                    or (cfg.check_every and (i + 1) % cfg.check_every == 0)):
                if on_gpu:
                    torch.cuda.synchronize(device)
                losses.extend(_read_back(losses_dev, len(losses), i + 1))
            if progress is not None:
                # at a save step (check_every) the weights are the EMA while progress saves them, as the result
                # will be; the losses were just read back, so every stream is synchronised
                swap = ema is not None and cfg.check_every and (i + 1) % cfg.check_every == 0 and i + 1 < cfg.steps
                if swap:
                    _swap_values(flat, ema)
                try:
                    progress(i + 1, losses)
                finally:
                    if swap:
                        _swap_values(flat, ema)
    if ema is not None:
        with torch.no_grad():
            torch._foreach_copy_(flat, ema)
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


@torch.no_grad()
def _swap_values(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> None:
    """Exchange the values of two tensor lists in place (addresses kept: a CUDA graph reads them), one tensor's
    worth of memory at a time."""
    for x, y in zip(a, b):
        held = x.detach().clone()
        x.detach().copy_(y)
        y.copy_(held)


def _read_back(losses_dev: torch.Tensor, start: int, end: int) -> list[float]:
    """Copy a window of losses to the host and stop at the first non-finite one."""
    chunk = losses_dev[start:end].tolist()
    for i, value in enumerate(chunk):
        if not math.isfinite(value):
            raise TrainingDiverged(start + i, value)
    return chunk
