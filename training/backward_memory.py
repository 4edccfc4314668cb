"""What backward keeps: activations recomputed instead of stored (gradient checkpointing), and no gradients for
the host's frozen weights."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed(forward):
    """``forward`` under non-reentrant checkpointing, each dict argument copied: the host may change one after the
    call (ComfyUI's UNet moves ``transformer_options["block"]`` on to the next block), and the recompute in backward
    must see it as the forward did (the block key picks the attention patches)."""
    def run(*args, **kwargs):
        args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
        kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


@contextmanager
def gradient_checkpointing(blocks: Sequence[nn.Module], enabled: bool = True) -> Iterator[None]:
    """Recompute each block's activations in backward instead of storing them. Shadows ``forward`` on the
    instance for the duration of the block only; the class and the block's weights are untouched."""
    wrapped = []
    try:
        if enabled:
            for block in blocks:
                block.forward = _checkpointed(block.forward)
                wrapped.append(block)
        yield
    finally:
        for block in wrapped:
            del block.forward


@contextmanager
def gradients_only_for(modules: Sequence[nn.Module], trained: Sequence[nn.Parameter]) -> Iterator[None]:
    """Switch ``requires_grad`` off for every parameter of ``modules`` that is not trained, for the block.

    Hosts build their networks with trainable Parameters (ComfyUI does, outside inference mode). Left on,
    backward computes and keeps a gradient for every frozen weight: a second copy of the UNet in memory
    and about a third more backward work."""
    keep = {id(p) for p in trained}
    # Inference-mode tensors never reach autograd (and their flag cannot be set back outside inference mode).
    switched = {id(p): p for m in modules for p in m.parameters()
                if p.requires_grad and id(p) not in keep and not p.is_inference()}
    for p in switched.values():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in switched.values():
            p.requires_grad_(True)
