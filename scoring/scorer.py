"""Batched ImageReward scoring: tokenizer from a local vocab.txt, chunks of images through the port."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import torch
from transformers import BertTokenizer

from ..training.errors import InputError
from .checkpoint import read_checkpoint
from .files import RewardFiles
from .model import MAX_PROMPT_TOKENS, ImageRewardModel, build_model
from .preprocess import image_notes, preprocess

log = logging.getLogger(__name__)


def build_tokenizer(vocab) -> BertTokenizer:
    """bert-base-uncased's tokenizer from its vocab.txt, plus the two tokens BLIP adds ([DEC] as bos, [ENC]):
    they only change ids if a prompt contains them literally, but then ids match the official."""
    try:
        lines = Path(vocab).read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError("vocab", f"cannot read {vocab} as a BERT vocab.txt: {e}") from e
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    # token -> line number, later duplicates win: what BERT's own load_vocab does
    table = {token.rstrip("\r"): index for index, token in enumerate(lines)}
    missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in table]
    if missing:
        raise InputError("vocab", f"{vocab} lacks {', '.join(missing)}: not a BERT vocab.txt; use "
                         "bert-base-uncased's vocab.txt")
    tokenizer = BertTokenizer(vocab=table, do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def _prompt_list(prompts: Sequence[str] | str, count: int) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(prompts) not in (1, count):
        raise InputError("prompt", f"got {len(prompts)} prompts for {count} images; give one prompt for all "
                         "images or exactly one per image")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise InputError("prompt", f"prompt {i} is a {type(prompt).__name__}, not text")
    return prompts  # an empty string is allowed, as in the official ([CLS] [SEP] only)


class RewardScorer:
    """Holds the model (the nn.Module the nodes hand to ComfyUI's model management) and the tokenizer."""

    def __init__(self, model: ImageRewardModel, tokenizer, dtype=torch.float32):
        self.model = model
        self.tokenizer = tokenizer
        self.dtype = dtype
        rows = model.text.embeddings.word_embeddings.num_embeddings
        pad = tokenizer.convert_tokens_to_ids("[PAD]")
        if len(tokenizer) != rows or pad != model.text.config.pad_token_id:
            # a smaller or reordered vocab would load and score with the wrong token ids, silently
            raise InputError("vocab", f"has {len(tokenizer)} tokens ([PAD] = {pad}) but the checkpoint has {rows} "
                             f"rows ([PAD] = {model.text.config.pad_token_id}); use the bert-base-uncased "
                             "vocab.txt (30522 lines) that ImageReward was trained with")
        model.vision.to(dtype=dtype)
        model.text.to(dtype=dtype)
        model.mlp.float()  # the head and normalisation stay float32
        model.eval().requires_grad_(False)
        self.last_notes: list[str] = []

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(input_ids, attention_mask) [len(prompts), 35] as the official, and notes for truncated prompts
        (``prompts`` is one for all images, or image i's at i)."""
        encoded = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS,
                                 return_tensors="pt")
        lengths = [len(ids) for ids in self.tokenizer(prompts)["input_ids"]]
        long = [i for i, n in enumerate(lengths) if n > MAX_PROMPT_TOKENS]
        notes = []
        if long:
            images = f"image{'s' if len(long) > 1 else ''} {', '.join(map(str, long[:10]))}"
            which = "the prompt" if len(prompts) == 1 else f"the prompt of {images}"
            notes.append(f"{which} is longer than {MAX_PROMPT_TOKENS} tokens; only the first "
                         f"{MAX_PROMPT_TOKENS} count, as in the official ImageReward")
        return encoded["input_ids"], encoded["attention_mask"], notes

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """[B] float32 rewards on the CPU for a ComfyUI IMAGE batch; runs on the model's current device and
        dtype. Notes (alpha, one channel, upsampled, truncated prompts) are left in ``last_notes``."""
        if batch_size < 1:
            raise InputError("batch_size", f"must be at least 1, got {batch_size}")
        notes = image_notes(images)  # also checks the batch
        count = images.shape[0]
        prompt_list = _prompt_list(prompts, count)
        ids, mask, prompt_notes = self.tokenize(prompt_list)
        if len(prompt_list) == 1:
            ids, mask = ids.expand(count, -1), mask.expand(count, -1)
        weight = self.model.vision.embeddings.patch_embedding.weight
        device, dtype = weight.device, weight.dtype
        chunks = []
        for start in range(0, count, batch_size):
            stop = min(start + batch_size, count)
            pixels, _ = preprocess(images[start:stop])  # CPU work here overlaps the previous chunk's GPU work
            chunks.append(self.model(pixels.to(device, dtype), ids[start:stop].to(device),
                                     mask[start:stop].to(device)))
        scores = torch.cat(chunks).float().cpu()
        bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
        if bad:
            advice = ("in float16 the activations may overflow: load ImageReward in bfloat16 or float32"
                      if dtype == torch.float16 else "the checkpoint's weights may be broken")
            raise InputError("images", f"image {', '.join(map(str, bad[:10]))} scored {scores[bad[0]].item()}; "
                             f"{advice}")
        self.last_notes = notes + prompt_notes
        return scores


def read_med_config(path) -> dict | None:
    if path is None:
        return None
    try:
        config = json.loads(open(path, encoding="utf-8").read())
    except (OSError, ValueError) as e:
        raise InputError("med_config", f"cannot read {path} as JSON: {e}") from e
    if not isinstance(config, dict):
        raise InputError("med_config", f"{path} is not a JSON object like the official med_config.json")
    return config


def load_scorer(files: RewardFiles, device="cpu", dtype=torch.float32) -> RewardScorer:
    """Read, check and load the checkpoint (strict), build the tokenizer, move to ``device`` in ``dtype``."""
    med_config = read_med_config(files.med_config)
    tokenizer = build_tokenizer(files.vocab)
    model = build_model(read_checkpoint(files.checkpoint), med_config, device="cpu")
    model.vision.to(device=device, dtype=dtype)  # cast while moving: no full-precision copy on the device
    model.text.to(device=device, dtype=dtype)
    model.mlp.to(device=device, dtype=torch.float32)
    log.info("loaded ImageReward %s on %s in %s", files.checkpoint.name, device, dtype)
    return RewardScorer(model, tokenizer, dtype)
