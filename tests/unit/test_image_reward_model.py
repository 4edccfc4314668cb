"""ImageReward port: the official key layout loads strictly, the port computes what the official code computes,
the normalisation constants, and batched scoring equals one-by-one scoring."""
import math

import pytest
import torch
import torch.nn.functional as F

from comfyui_personalize.headless.tiny_reward import TINY, official_layout, write_tiny_reward_files
from comfyui_personalize.scoring.checkpoint import official_to_port, read_checkpoint
from comfyui_personalize.scoring.model import IMAGE_SIZE, MAX_PROMPT_TOKENS, REWARD_MEAN, REWARD_STD, build_model
from comfyui_personalize.scoring.scorer import load_scorer, read_med_config
from comfyui_personalize.training.errors import InputError

OFFICIAL_PARAMS = 446_665_953  # research 1.1: the whole official module, 625 state-dict keys
PROJECTIONS = (1024 * 256 + 256) + (768 * 256 + 256)  # blip.vision_proj + blip.text_proj, unused by the reward


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    return write_tiny_reward_files(tmp_path_factory.mktemp("reward"))


@pytest.fixture(scope="module")
def scorer(tiny_files):
    return load_scorer(tiny_files)


def _meta(layout):
    return {k: torch.empty(shape, device="meta") for k, shape in layout.items()}


def test_official_layout_matches_the_published_counts():
    layout = official_layout()
    assert len(layout) == 625
    params = sum(math.prod(s) for k, s in layout.items() if not k.endswith("position_ids"))
    assert params == OFFICIAL_PARAMS


def test_official_key_layout_loads_strictly_at_full_size_on_meta():
    official = _meta(official_layout())
    model = build_model(official, device="meta")  # strict load inside; allocates nothing
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS - PROJECTIONS
    port = official_to_port(official)
    ours = model.state_dict()
    assert set(ours) == set(port)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in port.items()}
    # the sizes read from the shapes are the official ones, and the non-shape settings of research 1.7
    v, t = model.vision.config, model.text.config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.patch_size, v.image_size) == \
        (1024, 24, 16, 16, IMAGE_SIZE)
    assert v.layer_norm_eps == 1e-6 and t.layer_norm_eps == 1e-12
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.vocab_size) == (768, 12, 12, 30524)
    assert t.encoder_hidden_size == 1024 and all(hasattr(layer, "crossattention") for layer in model.text.encoder.layer)


def test_default_build_has_the_official_layout():
    port = official_to_port(_meta(official_layout()))
    ours = build_model(device="meta").state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in port.items()}


def test_key_map_follows_the_research_table():
    port = official_to_port(_meta(official_layout(vision_layers=1, text_layers=1)))
    for official, ours in [
        ("blip.visual_encoder.cls_token", "vision.embeddings.class_embedding"),
        ("blip.visual_encoder.pos_embed", "vision.embeddings.position_embedding"),
        ("blip.visual_encoder.patch_embed.proj.weight", "vision.embeddings.patch_embedding.weight"),
        ("blip.visual_encoder.blocks.0.norm1.bias", "vision.encoder.layers.0.layer_norm1.bias"),
        ("blip.visual_encoder.blocks.0.attn.qkv.weight", "vision.encoder.layers.0.self_attn.qkv.weight"),
        ("blip.visual_encoder.blocks.0.attn.proj.weight", "vision.encoder.layers.0.self_attn.projection.weight"),
        ("blip.visual_encoder.blocks.0.norm2.weight", "vision.encoder.layers.0.layer_norm2.weight"),
        ("blip.visual_encoder.blocks.0.mlp.fc2.bias", "vision.encoder.layers.0.mlp.fc2.bias"),
        ("blip.visual_encoder.norm.weight", "vision.post_layernorm.weight"),
        ("blip.text_encoder.encoder.layer.0.crossattention.self.key.weight",
         "text.encoder.layer.0.crossattention.self.key.weight"),
        ("mlp.layers.7.bias", "mlp.layers.7.bias"),
    ]:
        assert ours in port, official
    assert not any(k.endswith("position_ids") or "vision_proj" in k or "text_proj" in k for k in port)
    assert not any(k.startswith("blip.") for k in port)


@pytest.mark.parametrize("mutate", ["rename", "drop", "reshape", "extra"])
def test_a_wrong_name_or_shape_is_refused(mutate):
    official = _meta(official_layout())
    key = "blip.visual_encoder.blocks.3.attn.qkv.weight"
    if mutate == "rename":
        official["blip.visual_encoder.blocks.3.attn.in_proj.weight"] = official.pop(key)
    elif mutate == "drop":
        del official["blip.text_encoder.encoder.layer.11.crossattention.output.LayerNorm.bias"]
    elif mutate == "reshape":
        official[key] = torch.empty(1024, 1024, device="meta")
    else:
        official["blip.itm_head.weight"] = torch.empty(2, 768, device="meta")
    with pytest.raises(InputError) as e:
        build_model(official, device="meta")
    assert e.value.input_name == "checkpoint"


def test_normalisation_constants():
    assert REWARD_MEAN == 0.16717362830052426 and REWARD_STD == 1.0333394966054072
    assert MAX_PROMPT_TOKENS == 35 and IMAGE_SIZE == 224


def _reference_reward(state, pixels, ids, mask, vision_heads, text_heads):
    """The official forward written from BLIP's vit.py / med.py and ImageReward.score, on OFFICIAL keys."""
    s = {k: v.float() for k, v in state.items()}
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    x = F.conv2d(pixels, s[v + "patch_embed.proj.weight"], s[v + "patch_embed.proj.bias"], stride=16)
    x = torch.cat([s[v + "cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1)
    x = x + s[v + "pos_embed"][:, : x.shape[1]]

    def attend(q, k, val, heads, bias=None):
        b, n, c = q.shape
        q, k, val = (z.reshape(b, z.shape[1], heads, c // heads).transpose(1, 2) for z in (q, k, val))
        scores = q @ k.transpose(-1, -2) / math.sqrt(c // heads) + (0 if bias is None else bias)
        return (scores.softmax(-1) @ val).transpose(1, 2).reshape(b, n, c)

    def ln(z, p, eps):
        return F.layer_norm(z, z.shape[-1:], s[p + ".weight"], s[p + ".bias"], eps)

    def lin(z, p):
        return F.linear(z, s[p + ".weight"], s[p + ".bias"])

    blocks = len({k.split(".")[3] for k in s if k.startswith(v + "blocks.")})
    for i in range(blocks):
        p = f"{v}blocks.{i}."
        q, k, val = lin(ln(x, p + "norm1", 1e-6), p + "attn.qkv").chunk(3, -1)
        x = x + lin(attend(q, k, val, vision_heads), p + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, p + "norm2", 1e-6), p + "mlp.fc1")), p + "mlp.fc2")
    image = ln(x, v + "norm", 1e-6)

    h = s[t + "embeddings.word_embeddings.weight"][ids] + s[t + "embeddings.position_embeddings.weight"][
        : ids.shape[1]]
    h = ln(h, t + "embeddings.LayerNorm", 1e-12)
    bias = (1.0 - mask[:, None, None, :].float()) * -10000.0  # med.py's extended mask, bidirectional
    layers = len({k.split(".")[4] for k in s if k.startswith(t + "encoder.layer.")})
    for i in range(layers):
        p = f"{t}encoder.layer.{i}."
        for kind, source, b in (("attention", h, bias), ("crossattention", image, None)):
            a = p + kind + "."
            ctx = attend(lin(h, a + "self.query"), lin(source, a + "self.key"), lin(source, a + "self.value"),
                         text_heads, b)
            h = ln(lin(ctx, a + "output.dense") + h, a + "output.LayerNorm", 1e-12)
        h = ln(lin(F.gelu(lin(h, p + "intermediate.dense")), p + "output.dense") + h, p + "output.LayerNorm", 1e-12)
    r = h[:, 0]
    for i in (0, 2, 4, 6, 7):
        r = lin(r, f"mlp.layers.{i}")
    return ((r - REWARD_MEAN) / REWARD_STD).squeeze(-1)


def test_port_computes_the_official_forward(tiny_files, scorer):
    official = read_checkpoint(tiny_files.checkpoint)
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    ids, mask, _ = scorer.tokenize(["a photo of a dog", "", "red car on a bridge at night, cinematic lighting"])
    expected = _reference_reward(official, pixels, ids, mask, TINY["vision_width"] // 64, TINY["text_heads"])
    got = scorer.model(pixels, ids, mask)
    assert got.dtype == torch.float32 and got.shape == (3,)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got, expected)
    assert expected.std() > 0.05  # the tiny model's scores depend on the input, so the comparison means something


def test_reward_is_the_normalised_head_output(scorer):
    raw = []
    handle = scorer.model.mlp.register_forward_hook(lambda m, i, o: raw.append(o))
    ids, mask, _ = scorer.tokenize(["a cat"])
    reward = scorer.model(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE), ids, mask)
    handle.remove()
    assert torch.allclose(reward * REWARD_STD + REWARD_MEAN, raw[0], atol=1e-6)


def test_batch_scores_equal_one_by_one(scorer):
    images = torch.rand(5, 240, 300, 3, generator=torch.Generator().manual_seed(0))
    prompts = ["a photo of a dog", "a cat", "", "a red car", "a blue boat on the sea"]
    batched = scorer.score(images, prompts, batch_size=64)
    chunked = scorer.score(images, prompts, batch_size=2)
    single = torch.cat([scorer.score(images[i:i + 1], [prompts[i]]) for i in range(5)])
    assert batched.dtype == torch.float32 and batched.device.type == "cpu"
    assert (batched - single).abs().max() <= 1e-5 and (batched - chunked).abs().max() <= 1e-5
    assert batched.std() > 0.05
    shared = scorer.score(images, "a photo of a dog")
    assert abs(shared[0] - batched[0]) <= 1e-5 and (shared[1:] - batched[1:]).abs().max() > 1e-3


def test_prompt_count_must_be_one_or_one_per_image(scorer):
    with pytest.raises(InputError, match="got 2 prompts for 3 images") as e:
        scorer.score(torch.rand(3, 32, 32, 3), ["a", "b"])
    assert e.value.input_name == "prompt"
    with pytest.raises(InputError, match="got 0 prompts"):
        scorer.score(torch.rand(3, 32, 32, 3), [])


def test_long_prompts_are_truncated_with_a_note(scorer):
    long = "a photo of a dog " * 20
    ids, mask, notes = scorer.tokenize([long, "a dog"])
    assert ids.shape == (2, MAX_PROMPT_TOKENS) and mask[1].sum() == 4 and ids[1, 4:].eq(0).all()
    assert ids[0, 0] == scorer.tokenizer.cls_token_id and ids[0, -1] == scorer.tokenizer.sep_token_id
    assert len(notes) == 1 and "the prompt of image 0 " in notes[0]


def test_nan_scores_name_the_image(scorer, monkeypatch):
    forward = scorer.model.forward
    monkeypatch.setattr(scorer.model, "forward",
                        lambda *a: forward(*a).index_fill(0, torch.tensor([1]), float("nan")))
    with pytest.raises(InputError, match="image 1 scored nan"):
        scorer.score(torch.rand(3, 32, 32, 3), "a dog")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keeps_the_head_in_float32(tiny_files, scorer, dtype):
    half = load_scorer(tiny_files, dtype=dtype)
    assert half.model.vision.embeddings.patch_embedding.weight.dtype == dtype
    assert half.model.text.embeddings.word_embeddings.weight.dtype == dtype
    assert all(p.dtype == torch.float32 for p in half.model.mlp.parameters())
    images = torch.rand(2, 224, 224, 3, generator=torch.Generator().manual_seed(3))
    got, want = half.score(images, "a dog"), scorer.score(images, "a dog")
    assert got.dtype == torch.float32 and (got - want).abs().max() < 0.1


def test_med_config_that_contradicts_the_checkpoint_is_refused(tiny_files):
    state = read_checkpoint(tiny_files.checkpoint)
    med = read_med_config(tiny_files.med_config)
    assert build_model(state, med).text.config.num_attention_heads == TINY["text_heads"]
    with pytest.raises(InputError, match="hidden_size") as e:
        build_model(state, {**med, "hidden_size": 768})
    assert e.value.input_name == "med_config"
    with pytest.raises(InputError, match="num_attention_heads=5") as e:
        build_model(state, {**med, "num_attention_heads": 5})
    assert e.value.input_name == "med_config"
