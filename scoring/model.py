"""ImageReward (Xu et al. 2023) on transformers' own BLIP modules: BlipVisionModel (BLIP ViT) + BlipTextModel
(BLIP's med.py BERT with cross-attention) + the MLP head. Research 1.7: bit-identical to the official code on
the same weights.

Attention: transformers' BLIP attention classes compute attention with explicit matmul + softmax and do not go
through the attention-implementation switch, so ``attn_implementation="sdpa"`` is not available for them; the
port sets "eager" explicitly so the masks transformers builds are additive float masks, which is what those
classes add to their scores.
"""
from __future__ import annotations

import math
import re
from typing import Mapping

import torch
from torch import nn
from transformers import BlipTextConfig, BlipVisionConfig
from transformers.models.blip.modeling_blip import BlipVisionModel
from transformers.models.blip.modeling_blip_text import BlipTextModel

from ..training.errors import InputError

REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_PROMPT_TOKENS = 35
IMAGE_SIZE = 224
HEAD_DIM = 64  # ViT heads are not in the checkpoint's shapes; BLIP's ViT-B/L both use 64-wide heads

OFFICIAL_MED_CONFIG = {  # the released med_config.json (encoder_width is replaced by the vision width)
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "vocab_size": 30524, "max_position_embeddings": 512, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
    "pad_token_id": 0,
}
OFFICIAL_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                   "num_attention_heads": 16, "image_size": IMAGE_SIZE, "patch_size": 16}
OFFICIAL_HEAD = (1024, 128, 64, 16)
HEAD_INDICES = (0, 2, 4, 6, 7)  # Sequential positions of the Linears; Dropouts sit between the first four


class RewardHead(nn.Module):
    """``mlp.layers``: Linear 768-1024-128-64-16-1 with dropouts and NO activations (they are commented out in
    the official code), so its keys are layers.{0,2,4,6,7}. Always evaluated in float32."""

    def __init__(self, dims: tuple[int, ...]):
        super().__init__()
        linears = [nn.Linear(i, o) for i, o in zip(dims[:-1], dims[1:])]
        dropouts = [nn.Dropout(p) for p in (0.2, 0.2, 0.1)]
        self.layers = nn.Sequential(linears[0], dropouts[0], linears[1], dropouts[1], linears[2], dropouts[2],
                                    linears[3], linears[4])

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        x = feat.float()
        with torch.autocast(x.device.type, enabled=False):  # the head is tiny: keep it exact whatever the caller
            for index in HEAD_INDICES:
                layer = self.layers[index]
                x = nn.functional.linear(x, layer.weight.float(), layer.bias.float())
        return x.squeeze(-1)


class ImageRewardModel(nn.Module):
    def __init__(self, vision_config: BlipVisionConfig, text_config: BlipTextConfig, head_dims: tuple[int, ...]):
        super().__init__()
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = RewardHead(head_dims)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        """[B] normalised reward, float32. ViT and BERT run in their own dtype; the head in float32."""
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        # The official passes an all-ones encoder mask; None is the same (it would add exact zeros).
        # is_decoder=False: bidirectional self-attention, BLIP's 'multimodal' mode.
        text = self.text(input_ids=input_ids, attention_mask=attention_mask,
                         encoder_hidden_states=image_embeds, is_decoder=False)
        raw = self.mlp(text.last_hidden_state[:, 0])  # the [CLS] position
        return (raw - REWARD_MEAN) / REWARD_STD


def _count_layers(keys, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def _configs_from_state(state: Mapping[str, torch.Tensor], med_config: dict) -> tuple[dict, dict, tuple]:
    """Vision/text sizes and head dims read from the port-keyed shapes; heads/eps come from ``med_config``."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise InputError("checkpoint", f"has no {key!r}: it is not a complete ImageReward checkpoint")
        return tuple(state[key].shape)

    width = shape("vision.embeddings.class_embedding")[-1]
    patch = shape("vision.embeddings.patch_embedding.weight")[-1]
    grid = math.isqrt(shape("vision.embeddings.position_embedding")[1] - 1)
    vision = {"hidden_size": width, "patch_size": patch, "image_size": grid * patch,
              "num_hidden_layers": _count_layers(state, "vision.encoder.layers."),
              "intermediate_size": shape("vision.encoder.layers.0.mlp.fc1.weight")[0],
              "num_attention_heads": max(1, width // HEAD_DIM)}
    vocab, hidden = shape("text.embeddings.word_embeddings.weight")
    text = {"vocab_size": vocab, "hidden_size": hidden,
            "max_position_embeddings": shape("text.embeddings.position_embeddings.weight")[0],
            "num_hidden_layers": _count_layers(state, "text.encoder.layer."),
            "intermediate_size": shape("text.encoder.layer.0.intermediate.dense.weight")[0]}
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "max_position_embeddings"):
        if key in med_config and med_config[key] != text[key]:
            raise InputError("med_config", f"{key}={med_config[key]} but the checkpoint has {text[key]}; "
                             "use the med_config.json that came with this checkpoint (or remove it)")
    default_heads = OFFICIAL_MED_CONFIG["num_attention_heads"] if hidden == 768 else max(1, hidden // HEAD_DIM)
    heads = med_config.get("num_attention_heads", default_heads)
    if not isinstance(heads, int) or heads < 1 or hidden % heads:
        raise InputError("med_config", f"num_attention_heads={heads!r} does not divide the text width {hidden}; "
                         "use the med_config.json that came with this checkpoint (or remove it)")
    text["num_attention_heads"] = heads
    head = tuple(shape(f"mlp.layers.{i}.weight")[0] for i in HEAD_INDICES[:-1])
    return vision, text, (hidden, *head, 1)


def _make_configs(vision: dict, text: dict, med_config: dict) -> tuple[BlipVisionConfig, BlipTextConfig]:
    if vision["image_size"] != IMAGE_SIZE:
        raise InputError("checkpoint", f"expects {vision['image_size']} px images; ImageReward uses {IMAGE_SIZE}")
    vision_config = BlipVisionConfig(**vision, hidden_act="gelu", layer_norm_eps=1e-6,  # timm ViT eps, not 1e-5
                                     attention_dropout=0.0)
    text_config = BlipTextConfig(
        **text, encoder_hidden_size=vision["hidden_size"],  # BLIP overwrites encoder_width with the vision width
        hidden_act=med_config.get("hidden_act", "gelu"), layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
        pad_token_id=med_config.get("pad_token_id", 0), bos_token_id=None, eos_token_id=None, sep_token_id=None,
        is_decoder=True,  # only so that every BlipTextLayer builds .crossattention; forward uses is_decoder=False
    )
    for config in (vision_config, text_config):
        config._attn_implementation = "eager"
    return vision_config, text_config


@torch.no_grad()
def _restore_buffers(model: ImageRewardModel) -> None:
    """Non-persistent buffers are not in checkpoints; after a meta build they must be made again."""
    embeddings = model.text.embeddings
    device = embeddings.word_embeddings.weight.device
    embeddings.position_ids = torch.arange(embeddings.position_ids.shape[-1], device=device).unsqueeze(0)
    left = [name for name, b in model.named_buffers() if b.is_meta and device.type != "meta"]
    if left:
        raise RuntimeError(f"buffers not restored after loading: {left}")


def build_model(state_dict: dict | None = None, med_config: dict | None = None, device="cpu") -> ImageRewardModel:
    """The port, eval mode, gradients off. With ``state_dict`` (official or port keys) the sizes are read from
    its shapes (so a reduced-width test checkpoint works) and it is loaded strictly; without it, the official
    ViT-L/16 + BERT-base sizes with random init. ``med_config`` (the official med_config.json, as a dict)
    gives the text side's heads/eps (and its sizes when there is no state dict)."""
    from .checkpoint import official_to_port  # checkpoint imports this module's constants

    med = dict(med_config or {})
    if state_dict is None:
        vision = dict(OFFICIAL_VISION)
        text = {k: med.get(k, v) for k, v in OFFICIAL_MED_CONFIG.items()
                if k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                         "vocab_size", "max_position_embeddings")}
        vision_config, text_config = _make_configs(vision, text, {**OFFICIAL_MED_CONFIG, **med})
        with torch.device(device):
            model = ImageRewardModel(vision_config, text_config, (text["hidden_size"], *OFFICIAL_HEAD, 1))
        return model.eval().requires_grad_(False)

    state = official_to_port(state_dict)
    vision, text, head = _configs_from_state(state, med)
    vision_config, text_config = _make_configs(vision, text, med)
    with torch.device("meta"):  # no random init of weights that are overwritten right away
        model = ImageRewardModel(vision_config, text_config, head)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise InputError("checkpoint", f"does not fit the ImageReward architecture: {e}") from e
    _restore_buffers(model)
    return model.to(device).eval().requires_grad_(False)
