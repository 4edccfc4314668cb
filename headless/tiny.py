"""Tiny diffusers/transformers models with random weights, and a CLIP tokenizer built offline.

Used by the unit tests, the demo and CPU smoke runs of the benchmarks. Nothing is downloaded: the tokenizer
vocabulary is the 256 byte symbols of CLIP's byte-level BPE plus a few whole words, written to a folder.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

WORDS = ("a", "photo", "of", "dog", "cat", "red", "blue", "circle", "square", "toy", "zwx", "style")
CONTEXT_DIM = 32


def _bytes_to_unicode() -> list[str]:
    """CLIP's reversible byte -> printable-unicode table (the GPT-2 scheme)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer_files(folder: Path) -> Path:
    """vocab.json + merges.txt for a CLIPTokenizer whose whole words are WORDS and everything else spells out."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _bytes_to_unicode()
    vocab = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in WORDS:  # merge letter by letter so each listed word becomes one token
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in vocab:
                vocab.append(pieces[0])
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(dict.fromkeys(vocab))}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return folder


@dataclass
class TinyParts:
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    vae: torch.nn.Module
    prediction: str


def build_tiny_parts(seed: int = 0, prediction: str = "eps") -> TinyParts:
    """A UNet2DConditionModel (~0.5 M params), a 2-layer CLIP text encoder and a 3x-downsampling VAE."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok_dir = write_tokenizer_files(Path(tempfile.mkdtemp(prefix="personalize-tok-")))
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CONTEXT_DIM, attention_head_dim=8, norm_num_groups=8,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=CONTEXT_DIM, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8,
    )
    for m in (unet, text_encoder, vae):
        m.eval().requires_grad_(False)
    return TinyParts(unet, text_encoder, tokenizer, vae, prediction)


@torch.no_grad()
def randomise_weights(module: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Finite random weights for a model built without a checkpoint (ComfyUI layers skip init): matrices and
    kernels ~ N(0, std), 1-D weights (norm scales) 1, biases 0. Speed and memory do not depend on the values."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=g) * std)
        elif name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.zero_()
