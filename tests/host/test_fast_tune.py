"""Personalize Fast Tune inside real ComfyUI: one image, a few steps; the regularisers do what they say (the word
stays nearer real words, the LoRA nearer zero), the host is untouched, the LoRA loads in the stock LoraLoader."""
import pytest
import torch
import torch.nn.functional as F
from comfy_tiny import weights_hash
from test_train_lora import dataset, ksample, run_node, subject_images

pytestmark = pytest.mark.host
ARGS = dict(steps=4, learning_rate=5e-2, batch_size=1, seed=0, dtype="auto", gradient_checkpointing=False,
            token="zwx", init_word="dog", num_vectors=1, rank=4, alpha=4.0, targets="attention")


@pytest.fixture(scope="module")
def fast_tune(comfy):
    from comfyui_personalize.nodes.fast_tune import PersonalizeFastTune
    return PersonalizeFastTune


def tune(fast_tune, tiny_sd15, nn_weight, l2_weight, **overrides):
    model, clip, vae = tiny_sd15
    one_image = dataset(subject_images()[:1])
    return run_node(fast_tune, model=model, clip=clip, vae=vae, dataset=one_image, nn_weight=nn_weight,
                    l2_weight=l2_weight, **{**ARGS, **overrides}).result


def nearest_cosine(clip, vectors):
    table = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight.detach().float().cpu()
    return F.cosine_similarity(vectors.float()[:, None], table[None], dim=-1).max(dim=1).values


def lora_norm(lora):
    return sum(v.float().square().sum().item() for k, v in lora.items() if k.endswith(".weight"))


def test_regularisers_keep_the_word_near_real_words_and_the_lora_near_zero(comfy, tiny_sd15, fast_tune):
    import comfy.model_management as mm

    model, clip, _ = tiny_sd15
    mm.unload_all_models()  # an earlier test's LoRA clone may still be patched into the shared weights
    before = weights_hash(model.model), weights_hash(clip.cond_stage_model)
    _, _, free_lora, free_embedding, loss = tune(fast_tune, tiny_sd15, 0.0, 0.0, steps=8)
    held_embedding = tune(fast_tune, tiny_sd15, 10.0, 0.0, steps=8)[3]  # each regulariser on its own
    held_lora = tune(fast_tune, tiny_sd15, 0.0, 100.0, steps=8)[2]
    assert len(loss["loss"]) == 8
    free_cos, held_cos = nearest_cosine(clip, free_embedding["clip_l"]), nearest_cosine(clip, held_embedding["clip_l"])
    assert (held_cos > free_cos).all(), (held_cos, free_cos)
    table = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight.detach().float().cpu()
    longest = table.norm(dim=-1).max()  # at lr 5e-2 the free word grows to ~3.5x a real token's length
    assert held_embedding["clip_l"].norm(dim=-1).max() <= 1.2 * longest < free_embedding["clip_l"].norm(dim=-1).max()
    assert lora_norm(held_lora) < lora_norm(free_lora)
    assert held_lora.metadata["ss_network_dim"] == "4" and "fast_tune_nn_weight" in str(held_lora.metadata)
    mm.unload_all_models()
    assert (weights_hash(model.model), weights_hash(clip.cond_stage_model)) == before


def test_the_lora_loads_in_the_stock_loader_with_the_same_result(comfy, tiny_sd15, fast_tune):
    from comfyui_personalize.nodes.save_lora import PersonalizeSaveLoRA

    model, clip, _ = tiny_sd15
    out_model, out_clip, lora, _, _ = tune(fast_tune, tiny_sd15, 0.01, 0.01)
    name = run_node(PersonalizeSaveLoRA, lora=lora, name="fast", subfolder="", save_dtype="fp32",
                    if_exists="overwrite").result[0]
    stock_model, _ = comfy.nodes.LoraLoader().load_lora(model, clip, name, 1.0, 0.0)
    prompt = "a photo of a dog"  # the embedding is checked by the pivotal tests; here the LoRA alone
    try:
        torch.testing.assert_close(ksample(comfy, out_model, clip, prompt=prompt),
                                   ksample(comfy, stock_model, clip, prompt=prompt), rtol=0, atol=1e-5)
    finally:
        import comfy.model_management as mm
        mm.unload_all_models()  # the shared tiny model must not stay patched with this LoRA for later tests


@pytest.mark.parametrize("name", ["nn_weight", "l2_weight"])
def test_negative_weights_are_named(comfy, tiny_sd15, fast_tune, name):
    from comfyui_personalize.training.errors import InputError

    weights = {"nn_weight": 0.01, "l2_weight": 0.01, name: -1.0}
    with pytest.raises(InputError) as e:
        tune(fast_tune, tiny_sd15, **weights)
    assert e.value.input_name == name
