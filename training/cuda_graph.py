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
