"""Replaying a whole training step (forward, backward, optimiser) as one CUDA graph.

A LoRA step on an SD UNet issues ~8k small kernels; launching them from Python costs far more than running them
(bench/results). A graph replays them with one launch. The step must be free of host syncs and read its
varying inputs from device tensors (batch indices, step counter), which the trainer arranges.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)


def capture(step: Callable[[], None], generator: torch.Generator,
            stream: torch.cuda.Stream | None = None) -> torch.cuda.CUDAGraph | None:
    """Record one call of ``step``; None (with a warning) if something in it cannot be captured.

    Nothing runs while recording: parameters and the step counter are untouched until the first replay. After a
    failure ``generator`` stays registered with the abandoned graph; the caller must not draw from it again.
    ``stream``: the stream the warm-up steps ran on. Autograd nodes that outlive a step (a parameter's
    AccumulateGrad) keep the stream they were made on; capturing on another one makes every gradient cross
    streams, and the allocator cannot reuse such blocks inside the capture (a 27 GiB pool for an SDXL LoRA step).
    """
    reserved = torch.cuda.memory_reserved()
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(generator)  # replays advance our seeded generator, not the global one
    try:
        with torch.cuda.graph(graph, stream=stream):
            step()
    except Exception as e:  # an op that syncs with the host, or a kernel that cannot be captured
        log.warning("training step could not be captured as a CUDA graph (%s); continuing without it", e)
        torch.cuda.synchronize()
        return None
    log.info("captured the training step as a CUDA graph (its memory pool: %.2f GiB)",
             (torch.cuda.memory_reserved() - reserved) / 2**30)
    return graph


POOL_MARGIN = 1.5  # the pool holds the step's transient memory and more (SDXL LoRA: 0.74 GiB for 0.55 eager)


def room_for_capture(step_transient: int, device_free: int, limit: int, reserved: int) -> bool:
    """Whether a graph pool the size of the step's transient memory (times a margin) fits: in the device's free
    memory and under the process's limit (``set_per_process_memory_fraction``) beside what is reserved now.
    A capture that runs out of memory leaves its half-made pool behind, so it is not attempted then."""
    return step_transient * POOL_MARGIN <= min(device_free, limit - reserved)


def capture_fits(step_transient: int, device: torch.device) -> bool:
    free, total = torch.cuda.mem_get_info(device)
    limit = int(total * torch.cuda.get_per_process_memory_fraction(device))
    fits = room_for_capture(step_transient, free, limit, torch.cuda.memory_reserved(device))
    if not fits:
        log.warning("not capturing the training step as a CUDA graph: its memory (~%.2f GiB) does not fit beside "
                    "%.2f GiB reserved (limit %.2f GiB, %.2f GiB free on the device); training continues eagerly, "
                    "more slowly", step_transient / 2**30, torch.cuda.memory_reserved(device) / 2**30,
                    limit / 2**30, free / 2**30)
    return fits
