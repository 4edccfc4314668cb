"""A small random-weight ImageReward checkpoint in the OFFICIAL key layout, for tests and the headless demo.

``official_layout`` writes the state-dict names and shapes of the official ``ImageReward`` module (BLIP's
timm-style ViT ``blip.visual_encoder``, BLIP's med.py BERT ``blip.text_encoder`` with cross-attention in every
layer, ``blip.vision_proj``/``blip.text_proj`` and the MLP head) straight from that architecture, not from the
port's key map, so a checkpoint written from it really tests the map. Nothing is downloaded.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from ..scoring.files import RewardFiles
from ..training.files import save_safetensors_atomic

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # [PAD] = 0 as in bert-base-uncased
WORDS = """
a an the of in on at with and or by for from to over under near behind beside inside outside above below
photo photograph picture painting drawing sketch illustration render portrait landscape closeup close up
shot view scene image art artwork style oil watercolor digital pencil ink anime cartoon realistic
photorealistic detailed highly high quality best masterpiece sharp focus soft light lighting dramatic
cinematic studio natural sunlight sunset sunrise night day morning evening golden hour moon sun sky
cloud clouds rain snow fog mist storm wind water sea ocean river lake beach wave waves mountain mountains
hill forest tree trees flower flowers garden field grass leaf leaves rock stone sand desert island city
street road bridge building house castle tower room window door table chair bed car train boat ship plane
bicycle dog dogs cat cats bird birds horse fish cow sheep lion tiger bear fox wolf rabbit deer owl
butterfly dragon robot person man woman boy girl child baby people face eyes hair hand hands smile
wearing hat dress shirt jacket glasses red orange yellow green blue purple pink brown black white gray
grey gold silver dark bright colorful vibrant pastel small large big tiny huge tall old young new
ancient modern futuristic vintage beautiful cute happy sad scary epic fantasy magic sci fi space planet
star stars galaxy universe fire smoke ice crystal glass metal wood wooden paper toy toys cup bottle book
food apple cake pizza coffee fruit bowl plate vase clock lamp candle mirror statue sculpture
mountainous depth field effect bokeh wide angle lens macro aerial top down side front back one two three
four five many some is are was sitting standing running flying walking swimming playing holding looking
painted drawn made covered filled made by trending artstation unreal engine octane 4k 8k hd hdr
zwx sks
"""
TINY = dict(vision_width=128, vision_layers=2, vision_mlp=256, patch=16, image_size=224,
            text_width=32, text_layers=2, text_ffn=64, text_heads=2, max_positions=64, head=(64, 32, 16, 8))


def write_vocab(path: Path, size: int | None = None) -> list[str]:
    """A WordPiece vocab: specials, punctuation, digits, letters and ``##`` letters (any lowercase word
    tokenizes without [UNK]), then whole words so common prompt words are single tokens. ``size``: padded with
    ``[unused N]`` lines to that many (30522 for an official-size model's embedding table)."""
    letters = list(string.ascii_lowercase)
    tokens = list(dict.fromkeys([*SPECIAL_TOKENS, *string.punctuation, *string.digits, *letters,
                                 *(f"##{c}" for c in letters + list(string.digits)), *WORDS.split()]))
    if size is not None:
        tokens += [f"[unused{i}]" for i in range(size - len(tokens))]
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return tokens


def official_layout(vision_width: int = 1024, vision_layers: int = 24, vision_mlp: int = 4096, patch: int = 16,
                    image_size: int = 224, text_width: int = 768, text_layers: int = 12, text_ffn: int = 3072,
                    vocab_size: int = 30524, max_positions: int = 512, head: tuple[int, ...] = (1024, 128, 64, 16),
                    proj_dim: int = 256) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the official ``ImageReward`` state dict (defaults: the released model, 625 keys)."""
    v, t = "blip.visual_encoder", "blip.text_encoder"
    grid = image_size // patch
    shapes: dict[str, tuple[int, ...]] = {
        f"{v}.cls_token": (1, 1, vision_width),
        f"{v}.pos_embed": (1, grid * grid + 1, vision_width),
        f"{v}.patch_embed.proj.weight": (vision_width, 3, patch, patch),
        f"{v}.patch_embed.proj.bias": (vision_width,),
    }
    for i in range(vision_layers):
        b = f"{v}.blocks.{i}"
        for name, out_dim, in_dim in (("attn.qkv", 3 * vision_width, vision_width),
                                      ("attn.proj", vision_width, vision_width),
                                      ("mlp.fc1", vision_mlp, vision_width), ("mlp.fc2", vision_width, vision_mlp)):
            shapes[f"{b}.{name}.weight"] = (out_dim, in_dim)
            shapes[f"{b}.{name}.bias"] = (out_dim,)
        for norm in ("norm1", "norm2"):
            shapes[f"{b}.{norm}.weight"] = shapes[f"{b}.{norm}.bias"] = (vision_width,)
    shapes[f"{v}.norm.weight"] = shapes[f"{v}.norm.bias"] = (vision_width,)

    shapes[f"{t}.embeddings.position_ids"] = (1, max_positions)  # a buffer, saved by BLIP's med.py
    shapes[f"{t}.embeddings.word_embeddings.weight"] = (vocab_size, text_width)
    shapes[f"{t}.embeddings.position_embeddings.weight"] = (max_positions, text_width)
    shapes[f"{t}.embeddings.LayerNorm.weight"] = shapes[f"{t}.embeddings.LayerNorm.bias"] = (text_width,)
    for i in range(text_layers):
        b = f"{t}.encoder.layer.{i}"
        for attn, kv_in in (("attention", text_width), ("crossattention", vision_width)):
            for name, in_dim in (("self.query", text_width), ("self.key", kv_in), ("self.value", kv_in),
                                 ("output.dense", text_width)):
                shapes[f"{b}.{attn}.{name}.weight"] = (text_width, in_dim)
                shapes[f"{b}.{attn}.{name}.bias"] = (text_width,)
            shapes[f"{b}.{attn}.output.LayerNorm.weight"] = (text_width,)
            shapes[f"{b}.{attn}.output.LayerNorm.bias"] = (text_width,)
        shapes[f"{b}.intermediate.dense.weight"] = (text_ffn, text_width)
        shapes[f"{b}.intermediate.dense.bias"] = (text_ffn,)
        shapes[f"{b}.output.dense.weight"] = (text_width, text_ffn)
        shapes[f"{b}.output.dense.bias"] = (text_width,)
        shapes[f"{b}.output.LayerNorm.weight"] = shapes[f"{b}.output.LayerNorm.bias"] = (text_width,)

    for name, in_dim in (("vision_proj", vision_width), ("text_proj", text_width)):
        shapes[f"blip.{name}.weight"] = (proj_dim, in_dim)
        shapes[f"blip.{name}.bias"] = (proj_dim,)
    dims = (text_width, *head, 1)
    for index, (in_dim, out_dim) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:])):  # Dropouts sit between
        shapes[f"mlp.layers.{index}.weight"] = (out_dim, in_dim)
        shapes[f"mlp.layers.{index}.bias"] = (out_dim,)
    return shapes


def tiny_med_config(vocab_size: int) -> dict:
    """The official med_config.json's fields at the tiny text sizes (encoder_width is overwritten by the
    vision width in the official code, so like the official file it does not match it)."""
    return {
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": TINY["text_width"], "initializer_range": 0.02,
        "intermediate_size": TINY["text_ffn"], "layer_norm_eps": 1e-12,
        "max_position_embeddings": TINY["max_positions"], "model_type": "bert",
        "num_attention_heads": TINY["text_heads"], "num_hidden_layers": TINY["text_layers"], "pad_token_id": 0,
        "type_vocab_size": 2, "vocab_size": vocab_size, "encoder_width": TINY["text_width"],
        "add_cross_attention": True,
    }


def tiny_state_dict(vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the official layout. Cross-attention and the head get large weights so that scores
    clearly depend on the image and differ between images."""
    layout = official_layout(**{k: v for k, v in TINY.items() if k != "text_heads"}, vocab_size=vocab_size)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in layout.items():
        if name.endswith("position_ids"):
            state[name] = torch.arange(shape[1]).unsqueeze(0)
        elif "norm" in name.lower():  # near 1/0, but distinct per norm so a swapped norm changes the scores
            state[name] = (1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(shape, generator=g)
        elif name.startswith("mlp."):
            fan_in = shape[-1] if len(shape) == 2 else 1
            state[name] = torch.randn(shape, generator=g) / fan_in ** 0.5 * (1.0 if len(shape) == 2 else 0.1)
        else:
            std = 0.2 if ".crossattention." in name else 0.05
            state[name] = torch.randn(shape, generator=g) * std
    return state


def write_tiny_reward_files(folder: Path, seed: int = 0,
                            name: str = "ImageReward-tiny.safetensors") -> RewardFiles:
    """``folder/<name>`` (official keys, ~0.6 M params, ~2.5 MB), ``folder/med_config.json`` and
    ``folder/bert-base-uncased/vocab.txt``; the layout ``find_reward_files`` expects."""
    folder = Path(folder)
    (folder / "bert-base-uncased").mkdir(parents=True, exist_ok=True)
    vocab_path = folder / "bert-base-uncased" / "vocab.txt"
    vocab_size = len(write_vocab(vocab_path)) + 2  # + [DEC] and [ENC], as the official tokenizer adds
    med_path = folder / "med_config.json"
    med_path.write_text(json.dumps(tiny_med_config(vocab_size), indent=2), encoding="utf-8")
    checkpoint = save_safetensors_atomic(tiny_state_dict(vocab_size, seed), folder / name,
                                         {"format": "pt", "personalize.note": "tiny random ImageReward for tests"})
    return RewardFiles(checkpoint=checkpoint, med_config=med_path, vocab=vocab_path)
