"""Prompts for the attention nodes: token positions from ComfyUI's tokenizer, conditioning, the paired batch."""
from __future__ import annotations

import hashlib
import inspect
import logging
import re

import comfy.utils
import torch
from comfy.patcher_extension import WrappersMP

from ..attention.tokens import PromptTokens
from ..training.errors import InputError

log = logging.getLogger(__name__)
CHUNK = 77


def _first_encoder(tokens: dict) -> list:
    # Every encoder of a CLIP (SDXL: l and g) tokenizes the same text with the same BPE, so positions agree.
    return tokens["l"] if "l" in tokens else next(iter(tokens.values()))


def _require(clip) -> None:
    if clip is None or getattr(clip, "tokenizer", None) is None:
        raise InputError("clip", "is missing; connect the CLIP output of the checkpoint loader")


def _token_id(token) -> int:
    """A token's id; an embedding's vector (a tensor token) gets a negative id from its values, which no real token
    has and which differs between embeddings (one placeholder for all would make any embedding match any other)."""
    if isinstance(token, int):
        return token
    if isinstance(token, torch.Tensor):
        digest = hashlib.blake2b(token.detach().float().cpu().numpy().tobytes(), digest_size=7).digest()
        return -1 - int.from_bytes(digest, "big")
    return -1


def prompt_tokens(clip, text: str) -> PromptTokens:
    """The prompt's token ids per 77-token chunk; word id 0 marks BOS/EOS/padding (never matched)."""
    _require(clip)
    chunks = _first_encoder(clip.tokenize(text, return_word_ids=True))
    ids, content = [], []
    for chunk in chunks:
        if len(chunk) != CHUNK:
            raise InputError("clip", f"this tokenizer makes chunks of {len(chunk)} tokens, not {CHUNK}; "
                                     "attention control supports CLIP text encoders (SD1.x, SD2.x, SDXL)")
        ids.append(tuple(_token_id(t) for t, _w, _word in chunk))
        content.append(tuple(word != 0 for _t, _w, word in chunk))
    return PromptTokens.from_chunks(ids, content, _word_ends(clip))


_WORD_END = "</w>"
_LATIN_PIECE = re.compile(r"[a-z0-9]$")


def _word_ends(clip):
    """``ends_word(id)`` for the first encoder's BPE: a token ends a word unless it is a piece of a Latin word that
    goes on (no ``</w>``, ending in a letter or digit: "sea" of "seahorse"). Scripts written without spaces (CJK,
    Thai) are one BPE word per phrase, so their characters may each start a match; an embedding's vectors count as
    words of their own. None for a tokenizer without the marker. Read each time (about 20 ms): a cache keyed by
    the tokenizer object could outlive it."""
    tokenizer = getattr(clip.tokenizer, "clip_l", None) or next(
        (getattr(clip.tokenizer, a) for a in ("clip_g", "clip_h") if hasattr(clip.tokenizer, a)), None)
    vocab_of = getattr(getattr(tokenizer, "tokenizer", None), "get_vocab", None)
    vocab = vocab_of() if vocab_of else {}
    if not any(t.endswith(_WORD_END) for t in vocab):
        return None
    goes_on = frozenset(i for t, i in vocab.items() if not t.endswith(_WORD_END) and _LATIN_PIECE.search(t))
    return lambda token_id: token_id not in goes_on


def word_tokenizer(clip):
    """word -> its content token ids, tokenized alone the way the prompt's words are."""
    _require(clip)

    def ids(word: str) -> list[int]:
        chunk = _first_encoder(clip.tokenize(word, return_word_ids=True))[0]
        return [_token_id(t) for t, _w, w in chunk if w != 0]
    return ids


def words_with_positions(clip, text: str, tokens: PromptTokens, input_name: str) -> list[tuple[list[int], list[int]]]:
    """(token ids, global positions) of each space-separated word, in order (CLIP's BPE splits at spaces, so a
    word tokenized alone gives the tokens it has in the prompt)."""
    ids_of = word_tokenizer(clip)
    content = list(zip(tokens.content_ids(), tokens.content_positions()))
    out, at = [], 0
    for word in text.split():
        ids = ids_of(word)
        if [i for i, _ in content[at:at + len(ids)]] != ids:
            raise InputError(input_name, f"could not place the word '{word}' in the tokenized prompt; remove "
                                         "weights in parentheses and embedding: names for word swaps")
        out.append((ids, [p for _, p in content[at:at + len(ids)]]))
        at += len(ids)
    return out


def encode(clip, text: str) -> list:
    """CLIPTextEncode's output for ``text``."""
    _require(clip)
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def paired_conditioning(source: list, target: list) -> list:
    """One conditioning whose batch is [source, target] (pooled output too): ComfyUI repeats it over the latent
    batch, so latent rows [src0, tgt0, src1, tgt1, ...] each get their prompt. A CLIP with scheduled hooks encodes a
    prompt as one entry per keyframe: the entries are paired one by one."""
    if len(source) != len(target):
        raise InputError("target", f"the source prompt was encoded as {len(source)} conditionings and the target "
                                   f"as {len(target)} (a CLIP with scheduled hooks makes one per keyframe); give "
                                   "both the same CLIP")
    return [_paired_entry(s, t) for s, t in zip(source, target)]


def _paired_entry(source: list, target: list) -> list:
    (c_src, o_src), (c_tgt, o_tgt) = source, target
    if c_src.shape[1] != c_tgt.shape[1]:
        raise InputError("target", f"the source prompt has {c_src.shape[1] // CHUNK} chunks of 77 tokens and the "
                                   f"target {c_tgt.shape[1] // CHUNK}; make their lengths similar")
    extra = dict(o_src)
    if o_src.get("pooled_output") is not None and o_tgt.get("pooled_output") is not None:
        extra["pooled_output"] = torch.cat([o_src["pooled_output"], o_tgt["pooled_output"]])
    return [torch.cat([c_src, c_tgt]), extra]


def paired_latent(latent: dict) -> dict:
    """Each latent twice in a row, with the same batch_index so both get the same initial noise."""
    samples = latent["samples"]
    n = samples.shape[0]
    out = {k: v for k, v in latent.items() if k not in ("samples", "batch_index", "noise_mask")}
    index = latent.get("batch_index") or list(range(n))
    out["samples"] = samples.repeat_interleave(2, dim=0)
    out["batch_index"] = [i for i in index for _ in range(2)]
    if latent.get("noise_mask") is not None:
        # first to the latent's batch as the sampler would (repeat or cut), so each pair's two rows share a mask
        mask = comfy.utils.repeat_to_batch_size(latent["noise_mask"], n)
        out["noise_mask"] = mask.repeat_interleave(2, dim=0)
    return out


# samplers that add fresh noise to every image at every step besides the ancestral and SDE ones (by name)
_FRESH_NOISE = {"ddpm", "lcm", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece"}
_BROWNIAN = ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde")  # their own default noise: a Brownian tree


def adds_fresh_noise(sampler_name: str) -> bool:
    return "ancestral" in sampler_name or "sde" in sampler_name or sampler_name in _FRESH_NOISE


def paired_noise_sampler(sampler_name: str, noise: torch.Tensor, sigmas: torch.Tensor, seed):
    """The sampler's own kind of per-step noise (a Brownian tree for the DPM++ SDE family, white noise otherwise,
    as ComfyUI seeds them), drawn for the first image of each pair and given to both: rows [s0, t0, s1, t1, ...]."""
    from comfy.k_diffusion.sampling import BrownianTreeNoiseSampler, default_noise_sampler

    half = noise[0::2]
    if sampler_name.startswith(_BROWNIAN):
        inner = BrownianTreeNoiseSampler(half, sigmas[sigmas > 0].min(), sigmas.max(), seed=seed,
                                         cpu=not sampler_name.endswith("_gpu"))
    else:
        inner = default_noise_sampler(half, seed=seed)
    return lambda sigma, sigma_next: inner(sigma, sigma_next).repeat_interleave(2, dim=0)


def refuse_second_pairing(model, node: str) -> None:
    """One paired edit per model: a second P2P (or p2p_locked Reweight) would re-pair the pairs with its own token
    map, applied to the other's prompts: duplicated images and a mis-mapped edit, silently."""
    if model.get_wrappers(WrappersMP.SAMPLER_SAMPLE, "personalize_paired_noise"):
        raise InputError("model", f"{node}: this MODEL already carries a paired edit (P2P or a p2p_locked "
                                  "Reweight); use one per model, from the model before that node")


def check_pairs_share_noise(noise: torch.Tensor, edit: str) -> None:
    """The paired batch starts each source and its target from one noise (``paired_latent``'s batch_index). A latent
    from elsewhere (an Empty Latent of batch 2) gives each its own: the edit then keeps no layout, silently."""
    if noise.shape[0] % 2:
        raise InputError("latent", f"{edit}: the sampler's latent has an odd batch ({noise.shape[0]}), so it is not "
                                   "this node's source/target pairs; connect this node's LATENT output to the sampler")
    if not torch.equal(noise[0::2], noise[1::2]):
        raise InputError("latent", f"{edit}: the sampler's latent is not this node's LATENT output (the source and "
                                   "target of a pair start from different noise, so the edit would not keep the "
                                   "layout); connect this node's LATENT output to the sampler")


def pair_fresh_noise(model, edit: str) -> None:
    """A SAMPLER_SAMPLE wrapper on ``model`` (a clone) for the paired batch: a sampler that adds fresh noise every
    step (ancestral, SDE, lcm, ...) gets one noise per pair (``paired_noise_sampler``), so the source and the edited
    image stay paired; where it cannot (a sampler without a noise_sampler option), a warning. A latent that is not
    the node's pairs is refused first (``check_pairs_share_noise``)."""
    def wrapper(executor, *args, **kwargs):
        sampler, (sigmas, extra_args, noise) = executor.class_obj, (args[1], args[2], args[4])
        check_pairs_share_noise(noise, edit)
        function = getattr(sampler, "sampler_function", None)
        name = getattr(function, "__name__", "").removeprefix("sample_")
        options = getattr(sampler, "extra_options", None)
        if (function is None or "noise_sampler" not in inspect.signature(function).parameters
                or not isinstance(options, dict) or options.get("noise_sampler") is not None):
            if adds_fresh_noise(name):
                log.warning("%s with %s: this sampler adds new noise to each image every step, so the edited "
                            "image loses the source's layout; feed the node's LATENT (pairs) to a sampler without a "
                            "noise sampler of its own, or use a deterministic one (euler, dpmpp_2m)", edit, name)
            return executor(*args, **kwargs)
        # a new dict for this run: KSAMPLERs share their default extra_options dict
        sampler.extra_options = {**options, "noise_sampler": paired_noise_sampler(name, noise, sigmas,
                                                                                  extra_args.get("seed"))}
        try:
            return executor(*args, **kwargs)
        finally:
            sampler.extra_options = options
    model.add_wrapper_with_key(WrappersMP.SAMPLER_SAMPLE, "personalize_paired_noise", wrapper)
