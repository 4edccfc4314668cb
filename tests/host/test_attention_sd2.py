"""The attention nodes on an SD2.x-shaped model: v-prediction, linear transformer projections, a 1024-wide
OpenCLIP-H-style text encoder whose tokenizer pads with id 0 (not EOS as SD1's does)."""
import functools

import pytest
import torch
from comfy_tiny import TINY_CLIP, TINY_UNET, randomise, tiny_unet_patcher
from test_attention_nodes import attention_lora, dual, empty_latent, encode, nodes, p2p, reweight, sample  # noqa: F401

pytestmark = pytest.mark.host
PROMPT = "a photo of a red car on a street"


@pytest.fixture(scope="module")
def tiny_sd2(comfy):
    from comfy import model_base, sd, sd1_clip, supported_models
    from comfy.supported_models_base import ClipTarget
    from comfy.text_encoders import sd2_clip

    class TinySD2V(supported_models.SD20):
        def model_type(self, state_dict, prefix=""):
            return model_base.ModelType.V_PREDICTION

    unet = dict(TINY_UNET, context_dim=1024, use_linear_in_transformer=True, num_heads=-1, num_head_channels=16)
    model = tiny_unet_patcher(TinySD2V, unet, seed=8)
    h_config = dict(TINY_CLIP, hidden_size=1024, projection_dim=1024, pad_token_id=0, num_hidden_layers=3)
    clip_h = functools.partial(sd1_clip.SDClipModel, layer="hidden", layer_idx=-2, textmodel_json_config=h_config,
                               special_tokens={"start": 49406, "end": 49407, "pad": 0}, return_projected_pooled=True)
    target = ClipTarget(sd2_clip.SD2Tokenizer, functools.partial(sd1_clip.SD1ClipModel, clip_name="h",
                                                                  clip_model=clip_h))
    with torch.inference_mode():
        clip = sd.CLIP(target=target)
    randomise(clip.cond_stage_model, 9)
    return model, clip


def test_attention_nodes_work_on_sd2(comfy, tiny_sd2, nodes):  # noqa: F811
    from comfy import model_base

    model, clip = tiny_sd2
    assert model.model.model_type == model_base.ModelType.V_PREDICTION
    assert clip.tokenize(PROMPT)["h"][0][-1][0] == 0  # padded with id 0
    positive = encode(comfy, clip, PROMPT)
    plain = sample(comfy, model, positive, empty_latent(), clip)
    for mode in ("value", "renormalized"):
        m, pos, _ = reweight(nodes, model, clip, "red:1", mode=mode)
        torch.testing.assert_close(sample(comfy, m, pos, empty_latent(), clip), plain, atol=1e-5, rtol=1e-5)
        m, pos, _ = reweight(nodes, model, clip, "red:3", mode=mode)
        assert (sample(comfy, m, pos, empty_latent(), clip) - plain).abs().max() > 1e-3
    m, paired, latent = p2p(nodes, model, clip, PROMPT, PROMPT)
    pair = sample(comfy, m, paired, latent, clip)
    torch.testing.assert_close(pair[1], pair[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pair[:1], plain, atol=1e-4, rtol=1e-4)
    m, paired, latent = p2p(nodes, model, clip, PROMPT, PROMPT.replace("car", "bus"))
    swapped = sample(comfy, m, paired, latent, clip)
    assert (swapped[1] - swapped[0]).abs().max() > 1e-3
    hard = encode(comfy, clip, "a photo of a dog")
    base_on_hard = sample(comfy, model, hard, empty_latent(), clip)
    blended = dual(nodes, model, hard, attention_lora(model), 0.0)
    torch.testing.assert_close(sample(comfy, blended, encode(comfy, clip, "a photo of zwx dog"), empty_latent(),
                                      clip), base_on_hard, atol=1e-4, rtol=1e-4)
