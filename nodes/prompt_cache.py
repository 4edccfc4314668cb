"""Per-run caches of what depends only on the prompts and the weights: cross-attention k/v and what patches build
from them. ComfyUI recomputes k/v of the same prompts at every step; a patch that edits them (the dual-path pair,
P2P's gathered source keys and mixed values) would redo its edit at every step too, each a kernel launch per
layer, which is what a launch-bound sampler pays for. Within one run a batch of conditionings (ComfyUI gives each
a uuid per run) has the same context at every step, so the edit is built at its first step and reused: in a layer
whose attn2 replace ComfyUI calls directly (a replace that wraps ours may hand it other k/v at every call, e.g. a
second blend's soft and hard paths, or P2P inside and outside its window), in model calls with no attn2_patch that
may change the prompt (the model's, a conditioning's or a hook's: noted per model call by a wrapper), and outside
context windows (they slice the prompt per window under the same uuid)."""
from __future__ import annotations

import weakref
from typing import Callable, NamedTuple

import comfy.patcher_extension
import torch

from .attention_hooks import existing_replace

KEEPS_PROMPT = "personalize_keeps_prompt"  # attribute of an attn2_patch that never changes the context


def keeps_prompt(patch: Callable) -> Callable:
    """Mark an attn2_patch of ours that leaves the prompt alone (it only reads it)."""
    setattr(patch, KEEPS_PROMPT, True)
    return patch


def keeps_the_prompt(transformer_options: dict) -> bool:
    """True when none of these attn2_patches may change the prompt between steps (another node's may: a windowed
    reweight scales the values inside its window only). Then equal uuids mean equal k/v for the whole run."""
    return all(getattr(p, KEEPS_PROMPT, False) for p in transformer_options.get("patches", {}).get("attn2_patch", ()))


PROMPT_FIXED = "personalize_prompt_fixed"  # set per model call by ``note_prompt_patches``


def note_prompt_patches(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: note in this model call's transformer_options whether all its attn2_patches (the
    model's, a conditioning's, a hook's: they only meet there) keep the prompt. A replace's extra_options carry the
    note but not the patches (ComfyUI leaves them out), so the cache reads the note."""
    options = kwargs.get("transformer_options", args[5] if len(args) > 5 else None)  # UNetModel.forward's 6th
    if isinstance(options, dict):
        options[PROMPT_FIXED] = keeps_the_prompt(options)
    return executor(*args, **kwargs)


def cache_budget(model) -> int:
    """Bytes a node may keep per run: 8% of the model's weights (at least 64 MiB), so that with the transient
    tensors a patch stays within ~10% of plain sampling's peak (which the weights are part of). The kept k/v grow
    with the batch where each row is kept (SDXL, 4 images with CFG: 0.41 GB for every layer's dual-path pair, about
    its budget; the direct layer keeps a repeated prompt once, ``find_distinct_rows``); past the budget they are built
    per call."""
    return max(int(0.08 * model.model_size()), 64 * 2**20)


def _nbytes(value) -> int:
    tensors = value if isinstance(value, (tuple, list)) else (value,)
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _layer(extra_options: dict) -> tuple | None:
    block = extra_options.get("block")
    return None if block is None else (block[0], block[1], extra_options.get("block_index", 0))


class PromptCache:
    """Values keyed by the layer, the batch of conditionings (uuids), its layout (cond_or_uncond), a tensor's shape,
    device and dtype, and a tag; one per node, shared by its layers. ``watch`` names the layers and the replace the
    node installed in each. Dropped at every run start (ON_PRE_RUN, which also decides where the run may cache),
    when hooks re-patch the weights within a run (ON_APPLY_HOOKS) and when the run ends (ON_CLEANUP: nothing of it
    stays on the device between runs). Elsewhere, in a model call whose attn2_patches may change the prompt, or
    past ``max_bytes``, ``get_or_make`` builds every time. Values of ``keep_for_run`` (merged weights) give way to
    k/v when the budget runs out: k/v built at every step cost more launches than a layer without merged weights."""

    def __init__(self, max_bytes: int = 0):
        self.max_bytes = max_bytes
        self._replaces: dict[tuple, weakref.WeakSet] = {}  # block key -> attn2 replaces this node installed there
        self._layers: dict[tuple, list[Callable]] = {}  # block key -> tests: is our layer the one ComfyUI calls?
        self._called: set[tuple] = set()  # the layers where ComfyUI calls that replace (or layer) itself, this run
        self._values: dict = {}
        self._rows: dict = {}  # batch layout -> DistinctRows | None, for the run
        self._yielding: dict = {}  # keys of keep_for_run values -> their bytes, evicted first (newest first)
        self._versions: dict = {}  # keys of get_or_make values -> (version, bytes)
        self._used = 0

    def install(self, model) -> None:
        """Register the resets on ``model`` (a clone; clones made from it downstream carry them)."""
        model.add_callback(comfy.patcher_extension.CallbacksMP.ON_PRE_RUN, self.reset)
        model.add_callback(comfy.patcher_extension.CallbacksMP.ON_APPLY_HOOKS, self.weights_changed)
        model.add_callback(comfy.patcher_extension.CallbacksMP.ON_CLEANUP, self.release)
        wrappers = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
        if note_prompt_patches not in model.get_wrappers(wrappers, PROMPT_FIXED):
            model.add_wrapper_with_key(wrappers, PROMPT_FIXED, note_prompt_patches)

    def watch(self, model, block_keys) -> None:
        """Record the attn2 replace just installed on ``model`` for each block key (weakly: a clone that made one,
        e.g. where our direct layer went back to the replace route, may be dropped)."""
        for key in map(tuple, block_keys):
            self._replaces.setdefault(key, weakref.WeakSet()).add(existing_replace(model, "attn2", key))

    def watch_layer(self, key, called: Callable) -> None:
        """Cache in layer ``key`` in the runs of a patcher for which ``called(patcher)`` holds: a direct layer of ours
        (an object patch) that ComfyUI calls itself there."""
        self._layers.setdefault(tuple(key), []).append(called)

    def _called_directly(self, patcher, key: tuple) -> bool:
        replace = existing_replace(patcher, "attn2", key)
        if replace is not None:
            return replace in self._replaces.get(key, ())
        return any(called(patcher) for called in self._layers.get(key, ()))

    def weights_changed(self, *_) -> None:
        """ON_APPLY_HOOKS: what was built from the weights goes; the row maps (of the prompts alone) stay, as hooks
        that differ between cond and uncond re-patch the weights before every model call."""
        self._values.clear()
        self._yielding.clear()
        self._versions.clear()
        self._used = 0

    def reset(self, patcher=None, *_) -> None:
        self.weights_changed()
        self._rows.clear()
        if patcher is not None and hasattr(patcher, "model_options"):  # ON_PRE_RUN: the patcher that samples
            keys = set(self._replaces) | set(self._layers)
            self._called = {key for key in keys if self._called_directly(patcher, key)}

    def release(self, *_) -> None:
        self.reset()
        self._called = set()

    def keep_for_run(self, extra_options: dict, tag, make: Callable, still_valid: Callable | None = None):
        """A value of this layer that depends on the weights only (e.g. W + dW), made once per run in a layer that
        ComfyUI calls itself: ``make()`` returns (value, bytes it adds); past the budget, or once k/v needed its room,
        None is kept for the run instead. ``still_valid(value)`` false (the weights it read were moved or replaced)
        makes it anew. None elsewhere: the caller then takes a path that needs none (making it at every call would
        cost more than it saves)."""
        key = (_layer(extra_options), tag)
        if key in self._values:
            value = self._values[key]
            if value is None or still_valid is None or still_valid(value):
                return value
            self._used -= self._yielding.pop(key, 0)
            del self._values[key]
        if key[0] not in self._called:
            return None
        value, size = make()
        if value is None or self._used + size > self.max_bytes:
            value, size = None, 0
        self._values[key] = value
        if size:
            self._used += size
            self._yielding[key] = size
        return value

    def _caches_in(self, extra_options: dict, layer) -> bool:
        return bool(extra_options.get("uuids")) and layer in self._called and (
            extra_options.get("context_window") is None and extra_options.get(PROMPT_FIXED) is True)

    def distinct_rows(self, extra_options: dict, context: torch.Tensor, labels: Callable[[], list]
                      ) -> DistinctRows | None:
        """The rows of ``context`` that repeat an earlier row with the same label (``find_distinct_rows``; ``labels()``
        a label per row, fixed by the layout), found once per run and batch of conditionings and shared by the layers
        (a UNet hands every block the same context); None where this layer builds its k/v at every call anyway, or
        no row repeats."""
        if not self._caches_in(extra_options, _layer(extra_options)):
            return None
        key = (tuple(extra_options["uuids"]), tuple(extra_options.get("cond_or_uncond") or ()),
               tuple(context.shape), context.device, context.dtype)
        if key not in self._rows:  # a few indices: outside the budget
            self._rows[key] = find_distinct_rows(context, labels())
        return self._rows[key]

    def _key(self, extra_options: dict, layer, like: torch.Tensor, tag) -> tuple:
        return (layer, tuple(extra_options["uuids"]), tuple(extra_options.get("cond_or_uncond") or ()),
                tuple(like.shape), like.device, like.dtype, tag)

    def discard(self, extra_options: dict, like: torch.Tensor, tag=None) -> None:
        """Drop what ``get_or_make`` keeps under ``tag`` for this call (a state that has passed), freeing its room."""
        layer = _layer(extra_options)
        if self._caches_in(extra_options, layer):
            key = self._key(extra_options, layer, like, tag)
            if key in self._versions:
                del self._values[key]
                self._used -= self._versions.pop(key)[1]

    def get_or_make(self, extra_options: dict, like: torch.Tensor, make: Callable, tag=None, version=None):
        """``make()``, kept for the run in a layer ComfyUI calls itself with a fixed prompt (past the budget, built
        every time). ``version`` (e.g. a window state): a value kept under another version is replaced, not kept
        beside it, so states that have passed (sigma only falls) do not hold the budget."""
        layer = _layer(extra_options)
        if not self._caches_in(extra_options, layer):
            return make()
        key = self._key(extra_options, layer, like, tag)
        if key in self._values:
            kept, kept_size = self._versions[key]
            if kept == version:
                return self._values[key]
            del self._values[key], self._versions[key]
            self._used -= kept_size
        value = make()
        size = _nbytes(value)
        while self._used + size > self.max_bytes and self._yielding:  # merged weights give way to k/v
            evicted, freed = self._yielding.popitem()
            self._values[evicted] = None  # that layer runs on its modules for the rest of the run
            self._used -= freed
        if self._used + size <= self.max_bytes:
            self._values[key] = value
            self._versions[key] = (version, size)
            self._used += size
        return value


class DistinctRows(NamedTuple):
    """Of a batch of B rows: ``firsts`` the first row of each distinct row, ``first_index`` the same on the batch's
    device, ``index`` [B] each row's distinct row, ``pair_index`` [2B] the same over a [soft; hard] stack of the
    distinct rows. Indices on the device: a list index would copy from the host, a sync, in every layer."""
    firsts: list[int]
    first_index: torch.Tensor
    index: torch.Tensor
    pair_index: torch.Tensor


def find_distinct_rows(context: torch.Tensor, labels: list) -> DistinctRows | None:
    """Rows of ``context`` [B, ...] equal in value to an earlier row with the same label (ComfyUI repeats a prompt
    over the latent batch: 4 images with CFG are 2 distinct rows of 8). One host sync; None if no row repeats."""
    flat = context.flatten(1)
    same = torch.stack([(flat == row).all(1) for row in flat]).tolist()  # [B, B]
    firsts, index = [], []
    for i, label in enumerate(labels):
        match = next((n for n, first in enumerate(firsts) if labels[first] == label and same[i][first]), None)
        if match is None:
            firsts.append(i)
            match = len(firsts) - 1
        index.append(match)
    if len(firsts) == len(labels):
        return None
    on_device = torch.tensor(index + firsts, device=context.device)  # one copy
    row_index, first_index = on_device[:len(index)], on_device[len(index):]
    return DistinctRows(firsts, first_index, row_index, torch.cat([row_index, row_index + len(firsts)]))
