"""Personalize Dual-Path Attention Blend: out = a Block(soft prompt, W + dW) + (1 - a) Block(hard prompt, W),
inside each attention layer on the fused kernel (no second UNet pass). The math is ``attention/dual_path.py``;
here: which LoRA factors belong to which block, and the hooks. Cross-attention is blended by the layer itself
where nothing else replaces it (``dual_path_direct``), else on ComfyUI's replace route (pre-projection stash,
replace, output add), which self-attention always takes."""
from __future__ import annotations

import logging

import comfy.patcher_extension
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..attention.dual_path import (
    AttentionDeltas,
    OutUpdate,
    SamplingDeltas,
    blend_pairs,
    check_blend,
    cross_blend,
    self_blend,
    self_blend_for_sampling,
)
from ..training.errors import InputError
from .attention_hooks import (
    COND,
    Block,
    check_prompt_lengths,
    chunks,
    fused_attention,
    in_window,
    install_patch_first,
    install_patch_once,
    is_prompt,
    percent_window,
    sampled_prompts,
    set_replace,
    transformer_blocks,
)
from .attention_reweight import window_inputs
from .dual_path_direct import can_go_direct, check_not_bypassed, install_direct
from .dual_path_lora import already_applied, left_out_note, lora_parts, tuned_blend_note
from .dual_path_pooled import install_pooled_blend
from .embeddings import hard_tokens
from .prompt_cache import PromptCache, cache_budget, keeps_prompt

log = logging.getLogger(__name__)
NODE = "Personalize Dual-Path Attention Blend"
PATHS = ("cross", "self+cross")
_X, _CTX, _VALUE = "personalize_dual_x", "personalize_dual_ctx", "personalize_dual_value"
_OUT = "personalize_dual_out"


def _cond_rows(extra_options: dict, batch: int) -> list[slice]:
    return [rows for kind, rows in chunks(extra_options, batch) if kind == COND]


@keeps_prompt
def stash_patch(n, context, value, extra_options):
    """attn1/attn2_patch: keep what to_q / to_k / to_v read for the replace of this call."""
    extra_options[_X], extra_options[_CTX], extra_options[_VALUE] = n, context, value
    return n, context, value


def add_delta_out(n, extra_options):
    """attn1/attn2_output_patch, first in the list (``to_out``'s own output, before other packs' output patches
    reshape it): add a * dOut(soft attention) that the replace(s) left for this call."""
    for delta in extra_options.pop(_OUT, []):
        n = delta.apply_(n) if isinstance(delta, OutUpdate) else n + delta
    return n


def stashed_inputs(extra_options: dict, q, k, v) -> tuple:
    """(x, context, value) stashed for this call, checked against the projections: a patch that reshapes the
    attention input after the stash (HyperTile, ToMe applied after this node) would otherwise mix up rows."""
    x = extra_options.get(_X)
    context = extra_options.get(_CTX)
    value = extra_options.get(_VALUE)
    context = x if context is None else context  # attn1: ComfyUI passes the block input itself
    value = context if value is None else value
    for source, projection in ((x, q), (context, k), (value, v)):
        if source is not None and source.shape[:-1] != projection.shape[:-1]:
            raise InputError("model", "another patch reshapes this attention layer's input after the Dual-Path "
                             f"Attention Blend ({tuple(source.shape[:-1])} vs {tuple(projection.shape[:-1])} "
                             "tokens), e.g. HyperTile or ToMe applied after it; apply those to the model before "
                             "the Dual-Path Attention Blend")
    return x, context, value


def leave_out_delta(extra_options: dict, delta) -> None:
    if delta is not None:
        extra_options.setdefault(_OUT, []).append(delta)  # a list: chained blends each add theirs


def sampling() -> bool:
    """No autograd (ComfyUI samples under inference mode): the launch-lean path may run."""
    return not torch.is_grad_enabled()


class _Blend:
    """One block's blend. Sampling (no autograd) takes the launch-lean path of attention.dual_path; with autograd
    on, the differentiable functions. The hard prompt's base k/v are dropped by ``reset`` at every sampling run's
    start (ON_PRE_RUN), when hooks re-patch the weights within a run (ON_APPLY_HOOKS) and at its end (ON_CLEANUP);
    both paths' stacked k/v live in the node's ``PromptCache``, under the same rules."""

    def __init__(self, block: Block, deltas: AttentionDeltas, hard: torch.Tensor | None, a: float,
                 window: tuple[float, float], prompts: PromptCache | None = None):
        self.block, self.hard, self.a, self.window = block, hard, a, window
        self.prompts = PromptCache() if prompts is None else prompts  # one never installed builds every call
        self._deltas, self._placed, self._hard_placed, self._hard_kv = deltas, {}, {}, {}

    def reset(self, *_):
        self._hard_kv.clear()

    def deltas(self, like: torch.Tensor) -> AttentionDeltas:
        """The LoRA factors on the sampler's device and dtype, moved once (they are constants here)."""
        key = (like.device, like.dtype)
        if key not in self._placed:
            moved = {name: None if d is None else d.folded(*key) for name, d in vars(self._deltas).items()}
            self._placed[key] = AttentionDeltas(**moved)
        return self._placed[key]

    def sampling_deltas(self, like: torch.Tensor) -> SamplingDeltas:
        key = ("sampling", like.device, like.dtype)
        if key not in self._placed:
            self._placed[key] = SamplingDeltas.prepare(self._deltas, like.device, like.dtype)
        return self._placed[key]

    def hard_context(self, like: torch.Tensor, length: int) -> torch.Tensor:
        """The hard prompt [1, length, C] on the sampler's device and dtype, moved once: a host-to-device copy
        in every layer would wait for the GPU each time."""
        key = (like.device, like.dtype, length)
        if key not in self._hard_placed:
            if length % self.hard.shape[1]:
                raise InputError("hard", "the hard prompt's length differs from the soft prompt's; use the "
                                         "same prompt with the learned token replaced by one word")
            self._hard_placed[key] = self.hard.repeat(1, length // self.hard.shape[1], 1).to(like.device,
                                                                                              like.dtype)
        return self._hard_placed[key]

    def hard_kv(self, like: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """to_k / to_v of the hard prompt with the block's current weights: computed every call under autograd,
        once per sampling run otherwise."""
        attn, hard = self.block.module.attn2, self.hard_context(like, length)
        if not sampling():
            return attn.to_k(hard), attn.to_v(hard)
        key = (like.device, like.dtype, length)
        if key not in self._hard_kv:
            self._hard_kv[key] = attn.to_k(hard), attn.to_v(hard)
        return self._hard_kv[key]

    def positive_rows(self, extra_options: dict, like: torch.Tensor) -> torch.Tensor | None:
        """[B, 1, 1] bool on the device: the rows of positive chunks (which take the hard prompt), per layout;
        None when the call has no positive rows."""
        key = (tuple(extra_options.get("cond_or_uncond") or ()), like.shape[0], like.device)
        if key not in self._hard_placed:
            rows = torch.zeros(like.shape[0], 1, 1, dtype=torch.bool)
            for chunk in _cond_rows(extra_options, like.shape[0]):
                rows[chunk] = True
            self._hard_placed[key] = rows.to(like.device) if rows.any() else None
        return self._hard_placed[key]

    def hard_rows(self, positive: torch.Tensor | None, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        """The hard path's k/v: the hard prompt's on positive rows (``positive_rows``, or None: none); negative rows
        keep their own."""
        if positive is None:
            return k, v
        hard_k, hard_v = self.hard_kv(k, k.shape[1])
        return torch.where(positive, hard_k, k), torch.where(positive, hard_v, v)

    def kv_pair(self, extra_options: dict, q, k, v, context, value) -> tuple[torch.Tensor, torch.Tensor]:
        """k/v stacked [soft rows; hard rows] for one attention call over both paths, once per run and batch of
        conditionings (the prompts are fixed within a run)."""
        return self.prompts.get_or_make(extra_options, k, lambda: self.paired_kv(
            self.positive_rows(extra_options, q), k, v, context, value))

    def paired_kv(self, positive: torch.Tensor | None, k, v, context, value) -> tuple[torch.Tensor, torch.Tensor]:
        """[soft rows (k/v + their deltas); hard rows (``hard_rows``)], from the base projections of the prompt."""
        k_h, v_h = self.hard_rows(positive, k, v)
        pair = self.sampling_deltas(k).paired({"k": k, "v": v}, {"k": context, "v": value}, {"k": k_h, "v": v_h})
        return pair["k"], pair["v"]

    def through_replace(self, layer, x, context, value, transformer_options: dict) -> torch.Tensor:
        """What the replace route computes, from inside the direct layer: for the calls it does not take (autograd
        on, an attention mask, rows that do not pair with the prompt's)."""
        extra_options = {**transformer_options, "n_heads": layer.heads, "dim_head": layer.dim_head,
                         "attn_precision": layer.attn_precision}
        stash_patch(x, context, value, extra_options)
        out = self.cross(None)(layer.to_q(x), layer.to_k(context), layer.to_v(value), extra_options)
        return add_delta_out(layer.to_out(out), extra_options)

    def install_replace(self, model) -> None:
        """The cross-attention blend on ComfyUI's replace route of ``model`` (a clone), chaining a replace already on
        the block: the pre-projection stash, the replace, the out delta's output patch."""
        set_replace(model, "attn2", self.block, self.cross, NODE)
        self.prompts.watch(model, [self.block.key])
        install_patch_once(model, "attn2_patch", stash_patch)
        install_patch_first(model, "attn2_output_patch", add_delta_out)

    @staticmethod
    def lean() -> bool:
        return sampling()

    def a_now(self, extra_options) -> float:
        return self.a if in_window(extra_options, self.window) else 1.0  # outside the window: the tuned path

    def cross(self, previous):
        def replace(q, k, v, extra_options):
            attend, a = fused_attention(extra_options, previous), self.a_now(extra_options)
            x, context, value = stashed_inputs(extra_options, q, k, v)
            if sampling():
                deltas = self.sampling_deltas(q)
                k2, v2 = self.kv_pair(extra_options, q, k, v, context, value)
                q2 = deltas.paired_one("q", q, x)
                out, delta = blend_pairs(attend, q2, k2, v2, deltas, a, together=previous is None)
            else:
                k_h, v_h = self.hard_rows(self.positive_rows(extra_options, q), k, v) if a < 1.0 else (k, v)
                out, delta = cross_blend(attend, q, k, v, k_h, v_h, x, context, self.deltas(q), a, value)
            leave_out_delta(extra_options, delta)
            return out
        return replace

    def self(self, previous):
        def replace(q, k, v, extra_options):
            attend, a = fused_attention(extra_options, previous), self.a_now(extra_options)
            x, context, value = stashed_inputs(extra_options, q, k, v)
            if sampling():
                out, delta = self_blend_for_sampling(attend, q, k, v, x, context, value, self.sampling_deltas(q), a,
                                                     together=previous is None)
            else:
                out, delta = self_blend(attend, q, k, v, x, self.deltas(q), a, context, value)
            leave_out_delta(extra_options, delta)
            return out
        return replace


def warn_if_hard_is_sampled(model, hard_ctx: torch.Tensor, soft_ctx: torch.Tensor | None = None) -> None:
    """OUTER_SAMPLE wrapper: a warning when the positive sampled is the hard prompt itself (wired to the sampler by
    mistake): both paths then read real words, so the learned token has no part in the image. With a hard prompt
    computed from soft_text (``soft_ctx``), also when the positive is another prompt: the two paths would describe
    different images (soft_text left behind after the positive was edited)."""
    def wrapper(executor, *args, **kwargs):
        for soft in sampled_prompts(executor, COND):
            if is_prompt(soft[:1], hard_ctx):
                log.warning("Dual-Path Attention Blend: the sampler's positive is the hard prompt; connect the soft "
                            "prompt (with the learned token) as positive, the blend takes the hard one itself")
            elif soft_ctx is not None and not _same_prompt(soft[:1], soft_ctx):
                log.warning("Dual-Path Attention Blend: the sampler's positive is not the prompt in soft_text, from "
                            "which the hard prompt (1 - a of every layer) was computed; write the positive's text "
                            "in soft_text, or connect hard")
        return executor(*args, **kwargs)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "personalize_dual_hard", wrapper)


def _same_prompt(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """The same text encoded again (perhaps on another device, or from a half-precision copy of the embedding):
    equal up to rounding; another prompt differs by whole units."""
    return got.shape == expected.shape and torch.allclose(got.to(expected.device, expected.dtype), expected,
                                                          rtol=1e-2, atol=1e-2)


def automatic_hard_prompt(clip, soft_text: str):
    """(hard conditioning, soft_text's own context): each learned vector replaced by its nearest real token."""
    if clip is None or not (soft_text or "").strip():
        raise InputError("hard", "connect the hard prompt's CONDITIONING, or connect clip and write soft_text "
                                 "(the soft prompt with embedding:NAME) to compute it")
    tokens, words = hard_tokens(clip, soft_text)
    log.info("dual-path hard prompt: learned vectors replaced by their nearest words (%s)", "; ".join(words))
    soft = clip.encode_from_tokens_scheduled(clip.tokenize(soft_text))
    return clip.encode_from_tokens_scheduled(tokens), soft[0][0][:1].detach()


class PersonalizeDualPathBlend(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        loras = ["none"] + folder_paths.get_filename_list("loras")
        return io.Schema(
            node_id="PersonalizeDualPathBlend",
            display_name="Personalize Dual-Path Attention Blend",
            category="personalize/attention",
            description="Keeps the model's prior while personalising: each attention layer mixes a * (soft prompt "
                        "with the learned token, weights + LoRA) and (1 - a) * (hard prompt with a real word, base "
                        "weights). Sample with the soft prompt as positive.",
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("hard", optional=True,
                                      tooltip="The same prompt with the learned token replaced by a real word "
                                              "(e.g. 'a photo of a dog'). Leave it unconnected to compute it "
                                              "from clip + soft_text (nearest real word)."),
                io.Combo.Input("lora_name", options=loras, default="none",
                               tooltip="Attention LoRA file (models/loras); or connect a trained LORA below."),
                io.Float.Input("a_blend", default=0.7, min=0.0, max=1.0, step=0.01,
                               tooltip="1 = only the personalised path, 0 = only the base model."),
                io.Combo.Input("paths", options=list(PATHS), default="cross",
                               tooltip="cross: blend cross-attention only; self+cross: self-attention too."),
                *window_inputs(),
                io.LoraModel.Input("lora", optional=True),
                io.Clip.Input("clip", optional=True, tooltip="For the automatic hard prompt."),
                io.String.Input("soft_text", multiline=True, default="", optional=True,
                                tooltip="The soft prompt's text with embedding:NAME; without a hard prompt, each "
                                        "learned vector is replaced by its nearest real token."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, lora_name, a_blend, paths, start_percent, end_percent, hard=None, lora=None,
                clip=None, soft_text="") -> io.NodeOutput:
        if lora is None and lora_name == "none":
            raise InputError("lora_name", "pick an attention LoRA file or connect a trained LORA")
        a_blend = check_blend(a_blend, 1)  # the direct route never reaches the module route's check
        metadata = dict(getattr(lora, "metadata", None) or {})
        if lora is None:
            path = folder_paths.get_full_path("loras", lora_name)
            if path is None:
                raise InputError("lora_name", f"'{lora_name}' is not in models/loras")
            # ComfyUI's own rule for which files are safetensors (.sft, any case), and their header metadata
            try:
                lora, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
            except Exception as e:  # a truncated download: safetensors', torch's or pickle's own error
                raise InputError("lora_name", f"cannot read {lora_name} as a LoRA ({e}); download it again or pick "
                                              "another file") from e
            metadata = metadata or {}
        if paths not in PATHS:
            raise InputError("paths", f"must be one of {', '.join(PATHS)}")
        soft_ctx = None
        if not hard or hard[0][0] is None:
            hard, soft_ctx = automatic_hard_prompt(clip, soft_text)
        window = percent_window(model, start_percent, end_percent, ("start_percent", "end_percent"))
        blocks = {b.key: b for b in transformer_blocks(model)}
        m = model.clone()
        hard_ctx = hard[0][0][:1].detach()
        # in the layer a 154-token soft prompt would take a 77-token hard prompt repeated, as batching repeats it
        check_prompt_lengths(m, {COND: hard_ctx.shape[1]}, "hard", "the hard prompt",
                             "use the same prompt with the learned token replaced by one word, or leave hard "
                             "unconnected to compute it from clip + soft_text")
        warn_if_hard_is_sampled(m, hard_ctx, soft_ctx)
        install_pooled_blend(m, hard, a_blend, window)  # SDXL: the prompt also enters through y
        prompts = PromptCache(cache_budget(model))  # both paths' k/v, kept per run (shared by the layers)
        prompts.install(m)
        if already_applied(model, lora):
            raise InputError("model", "already carries this LoRA (a LoraLoader, or the trainer's MODEL output, before "
                                      "this node): the blend applies it itself, so it would count twice; connect the "
                                      "model from before the LoRA")
        parts = lora_parts(model, lora, list(blocks.values()))
        if not parts.count("attn2") and not parts.count("attn1"):
            raise InputError("lora_name", "the LoRA has no attention (q/k/v/out) factors for this model's blocks; "
                                          "train it with attention targets on this model family")
        if paths == "cross" and not parts.count("attn2"):
            raise InputError("paths", "the LoRA has factors on self-attention (attn1) only, which paths='cross' "
                                      "leaves out; use paths='self+cross'")
        direct = []
        for attn in ("attn2",) + (("attn1",) if paths == "self+cross" else ()):
            deltas = parts.deltas[attn]
            if attn == "attn2":  # every block takes the hard prompt on its base path, with factors or without
                deltas = {key: deltas.get(key, AttentionDeltas()) for key in blocks}
            for key, d in deltas.items():
                blend = _Blend(blocks[key], d, hard_ctx, a_blend, window, prompts)
                if attn == "attn1":
                    set_replace(m, attn, blocks[key], blend.self, NODE)
                    install_patch_once(m, "attn1_patch", stash_patch)
                    install_patch_first(m, "attn1_output_patch", add_delta_out)
                elif can_go_direct(m, blocks[key]):
                    direct.append(install_direct(m, blocks[key], blend))
                else:
                    blend.install_replace(m)
                # weights change between runs and, with scheduled hooks, within one: drop the cached hard k/v
                for when in ("ON_PRE_RUN", "ON_APPLY_HOOKS", "ON_CLEANUP"):
                    m.add_callback(getattr(comfy.patcher_extension.CallbacksMP, when), blend.reset)
        if direct:
            m.add_callback(comfy.patcher_extension.CallbacksMP.ON_PRE_RUN, check_not_bypassed(direct))
        log.info("dual-path blend (a=%.2f): LoRA factors on %d cross- and %d self-attention layers", a_blend,
                 parts.count("attn2"), parts.count("attn1") if paths == "self+cross" else 0)
        notes = [n for n in (left_out_note(parts, paths), _patched_attention_note(model),
                             tuned_blend_note(metadata, a_blend)) if n]
        for note in notes:
            log.warning("Dual-Path Attention Blend: %s", note)
        if notes:
            return io.NodeOutput(m, ui=ui.PreviewText("\n".join(f"note: {n}" for n in notes)))
        return io.NodeOutput(m)


def _patched_attention_note(model) -> str:
    """The hard path is meant to be the base model: a LoRA already loaded on the MODEL (often this same LoRA,
    through LoraLoader) patches both paths, so a = 0 is not the model without it."""
    patched = sum(1 for key, patches in model.patches.items()
                  if any(f".{a}.to_" in key for a in ("attn1", "attn2")) and any(p[0] != 0 for p in patches))
    if not patched:
        return ""
    return (f"the MODEL already has weight patches on {patched} attention projections (a LoRA loaded before this "
            "node): both paths carry them, so a = 0 is not the base model; connect the model from before the "
            "LoRA loader, the blend applies its LoRA itself")


NODES = [PersonalizeDualPathBlend]
