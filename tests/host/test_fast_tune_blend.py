"""Personalize Fast Tune through the Dual-Path blend (a_blend < 1, as DATE tunes): the trainer's forward is the
Dual-Path node's forward for the same LoRA, hard prompt and a; the hard captions are the captions with the learned
word's nearest real word; the frozen model and the previews are what they were; bad inputs are named."""
import shutil
from pathlib import Path

import pytest
import torch
from comfy_tiny import weights_hash
from test_fast_tune import tune
from test_sdxl import tiny_sdxl, tiny_sdxl_clip  # noqa: F401
from test_train_lora import run_node

from comfyui_personalize.training.errors import InputError

pytestmark = pytest.mark.host
SOFT, HARD = "a photo of zwx dog", "a photo of cat dog"


@pytest.fixture(scope="module")
def fast_tune(comfy):
    from comfyui_personalize.nodes.fast_tune import PersonalizeFastTune
    return PersonalizeFastTune


def tolerance():
    """Exact to float rounding on the CPU; a GPU's kernels sum in other orders (and the trainer's bf16 autocast)."""
    import comfy.model_management as mm
    return dict(atol=1e-5, rtol=1e-4) if mm.get_torch_device().type == "cpu" else dict(atol=2e-3, rtol=2e-3)


def training_host(tiny):
    """A host as a trainer holds it: the models on their device, their weights usable by autograd."""
    from comfyui_personalize.nodes.comfy_adapter import ComfyHost

    host = ComfyHost(*tiny)
    with torch.inference_mode(False):
        host.load_for_training(tiny[1] is not None)
    return host


def blend_setup(tiny, targets, a):
    """A host, a LoRA with every factor non-zero (a fresh one adds nothing) and its training blend."""
    from comfyui_personalize.nodes.dual_path_training import TrainingBlend
    from comfyui_personalize.training.lora import LoRANetwork

    host = training_host(tiny)
    net = LoRANetwork(host.unet_lora_targets(targets), 4, 4.0, seed=0)
    with torch.no_grad():
        net.weight.copy_(torch.randn(net.weight.shape, generator=torch.Generator().manual_seed(5)) * 0.2)
    return host, net.to(host.model.load_device), TrainingBlend(host, net, a)


def unet_inputs(host):
    g, dev = torch.Generator().manual_seed(1), host.model.load_device
    with torch.no_grad():
        cond = host.encode_text([SOFT], (64, 64)).with_hard(host.encode_text([HARD], (64, 64)))
    return torch.randn(1, 4, 8, 8, generator=g).to(dev), torch.tensor([500], device=dev), cond.to(dev)


def trainer_and_node_outputs(tiny, targets, paths):
    """The UNet output of one training call through the blend, and of the Dual-Path node's model for the same LoRA,
    hard prompt and a (the node on its sampling path, the trainer on the differentiable one)."""
    import comfy.model_management as mm

    from comfyui_personalize.nodes.dual_path import PersonalizeDualPathBlend
    from comfyui_personalize.training.lora import TrainedLoRA

    host, net, blend = blend_setup(tiny, targets, 0.7)
    x, t, cond = unet_inputs(host)
    with torch.no_grad():
        plain = host.predict(x, t, cond.plain())
        with blend.attached():
            trained = host.predict(x, t, cond)
        assert (trained - plain).abs().max() > 1e-3  # the blend and the LoRA do something
        lora = TrainedLoRA(net.kohya_state_dict(torch.float32))
        hard = [[cond.hard.context, {} if cond.y is None else {"pooled_output": cond.hard.y[:, :1280]}]]
        node_model = run_node(PersonalizeDualPathBlend, model=tiny[0], lora_name="none", a_blend=0.7, paths=paths,
                              start_percent=0.0, end_percent=1.0, hard=hard, lora=lora).result[0]
        mm.load_models_gpu([node_model])  # its direct cross-attention layers are object patches
        try:  # one positive call, as the sampler makes it (the wrappers: SDXL's pooled-vector blend)
            options = {**node_model.model_options["transformer_options"], "cond_or_uncond": [0],
                       "wrappers": node_model.wrappers}
            sampled = node_model.model.diffusion_model(x, t.float(), context=cond.context, y=cond.y,
                                                       transformer_options=options)
        finally:
            mm.unload_all_models()
    return trained, sampled


@pytest.mark.parametrize("targets, paths", [("attention", "self+cross"), ("cross_attention", "cross")])
def test_the_trainers_forward_is_the_dual_path_nodes_forward(comfy, tiny_sd15, targets, paths):
    """What is tuned is what the Dual-Path node samples."""
    torch.testing.assert_close(*trainer_and_node_outputs(tiny_sd15, targets, paths), **tolerance())


def test_on_sdxl_the_pooled_vector_is_blended_as_the_node_blends_it(comfy, tiny_sdxl, tiny_sdxl_clip):  # noqa: F811
    torch.testing.assert_close(*trainer_and_node_outputs((tiny_sdxl, tiny_sdxl_clip, None), "cross_attention",
                                                         "cross"), **tolerance())


def test_the_frozen_model_and_previews_are_the_plain_lora_ones_and_the_host_is_untouched(comfy, tiny_sd15):
    """Under the trainer's frozen() (prior_prediction's target) the blended call is the base model; a preview
    hooks the LoRA plainly (a = 1), as the node's MODEL output has it; leaving restores everything."""
    host, net, blend = blend_setup(tiny_sd15, "attention", 0.5)
    x, t, cond = unet_inputs(host)
    before = weights_hash(host.diffusion_model), repr(host.training_options)
    with torch.no_grad():
        base = host.predict(x, t, cond.plain())
        with net.attached():
            plain_lora = host.predict(x, t, cond.plain())
        with blend.attached():
            with net.disabled():
                torch.testing.assert_close(host.predict(x, t, cond), base, **tolerance())
            assert net.enabled
            # ComfyUI's sampling calls the UNet without the trainer's fixed attention kernel: equal to rounding
            with blend.preview():
                torch.testing.assert_close(host.diffusion_model(x, t.float(), context=cond.context), plain_lora,
                                           **tolerance())
            torch.testing.assert_close(host.diffusion_model(x, t.float(), context=cond.context), base,
                                       **tolerance())  # unhooked again
        assert (plain_lora - base).abs().max() > 1e-3
        torch.testing.assert_close(host.predict(x, t, cond.plain()), base, **tolerance())
    assert host.blend is None and (weights_hash(host.diffusion_model), repr(host.training_options)) == before


def test_the_hard_captions_are_the_captions_with_the_nearest_real_word(comfy, tiny_sd15, caplog):
    from comfyui_personalize.nodes.dual_path_training import with_hard_captions
    from comfyui_personalize.nodes.embeddings import clip_with_embeddings, init_ids, token_table
    from comfyui_personalize.training.batches import TrainingData

    host = training_host(tiny_sd15)
    encoder = host.clip.cond_stage_model.clip_l
    vectors = token_table(encoder)[init_ids(host.clip.tokenizer.clip_l, "cat")].detach().clone()
    learned = vectors + 1e-3  # near "cat", not on it
    host.clip = clip_with_embeddings(host.clip, {"zwx": {"clip_l": learned}})
    host.cache_tokens = False
    data = TrainingData.single(torch.zeros(2, 4, 8, 8), ["a photo of embedding:zwx dog", "embedding:zwx on grass"],
                               host.encode_text, caption_dropout=0.1)
    with caplog.at_level("INFO", logger="comfyui_personalize.nodes.dual_path_training"):
        data = with_hard_captions(data, host)
    assert "replace the learned word by l: cat" in caplog.text  # the word to use in a hand-wired hard prompt
    with torch.no_grad():
        got = data.encode(["a photo of embedding:zwx dog", ""], (64, 64))
        expected = host.encode_text([HARD, ""], (64, 64))
    torch.testing.assert_close(got.hard.context.cpu(), expected.context.cpu(), atol=0, rtol=0)
    assert (got.context[0] - expected.context[0]).abs().max() > 0  # the soft caption keeps the learned vectors
    # a caption first drawn after the word has moved (toward "car") still gets the start's word: fixed for the run
    with torch.no_grad():
        learned.copy_(token_table(encoder)[init_ids(host.clip.tokenizer.clip_l, "car")])
        late = data.encode(["embedding:zwx on grass"], (64, 64)).hard.context
        expected = host.encode_text(["cat on grass"], (64, 64)).context
    torch.testing.assert_close(late.cpu(), expected.cpu(), atol=0, rtol=0)


def test_tuning_through_the_blend_trains_and_records_it(comfy, tiny_sd15, fast_tune):
    import comfy.model_management as mm

    model, clip, _ = tiny_sd15
    mm.unload_all_models()
    before = weights_hash(model.model), weights_hash(clip.cond_stage_model)
    _, _, plain_lora, plain_word, _ = tune(fast_tune, tiny_sd15, 0.0, 0.0)
    _, _, lora, word, loss = tune(fast_tune, tiny_sd15, 0.0, 0.0, a_blend=0.6)
    assert all(torch.isfinite(torch.tensor(loss["loss"])))
    assert lora.metadata["personalize.fast_tune_a_blend"] == "0.6"
    ups = [k for k in lora if k.endswith("lora_up.weight")]
    assert all(lora[k].abs().max() > 0 for k in ups)  # every blended adapter got gradients
    assert (word["clip_l"] - plain_word["clip_l"]).abs().max() > 0  # the blend changed what was learned
    assert max((lora[k] - plain_lora[k]).abs().max() for k in ups) > 0
    mm.unload_all_models()
    assert (weights_hash(model.model), weights_hash(clip.cond_stage_model)) == before
    # the Dual-Path node says so when it samples the LoRA at another a, from the LORA output or the saved file
    from comfyui_personalize.nodes.save_lora import PersonalizeSaveLoRA
    name = run_node(PersonalizeSaveLoRA, lora=lora, name="blend_tuned", subfolder="", save_dtype="fp16",
                    if_exists="overwrite").result[0]
    hard = [[clip.encode_from_tokens(clip.tokenize("a photo of dog dog")), {}]]
    sft = "blend_tuned_copy.SFT"  # ComfyUI loads .sft files, in any case, as safetensors too
    import folder_paths
    shutil.copy(folder_paths.get_full_path("loras", name), Path(folder_paths.get_folder_paths("loras")[0], sft))
    for source in (dict(lora=lora, lora_name="none"), dict(lora_name=name), dict(lora_name=sft)):
        notes = [blend_notes(model, hard, a, source) for a in (0.6, 0.8)]
        assert "tuned through the blend at a = 0.60" not in notes[0]
        assert "at a_blend 0.80 the image shows more of the subject" in notes[1], notes[1]
    assert "tuned through the blend" not in blend_notes(model, hard, 0.8, dict(lora=plain_lora, lora_name="none"))


def blend_notes(model, hard, a, source) -> str:
    from comfyui_personalize.nodes.dual_path import PersonalizeDualPathBlend
    out = run_node(PersonalizeDualPathBlend, model=model, hard=hard, a_blend=a, paths="self+cross", start_percent=0.0,
                   end_percent=1.0, **source)
    return out.ui.as_dict()["text"][0] if out.ui is not None else ""


@pytest.mark.parametrize("override, input_name", [(dict(a_blend=0.0), "a_blend"),
                                                  (dict(a_blend=float("nan")), "a_blend"),
                                                  (dict(a_blend=0.5, targets="attention+feedforward"), "targets")])
def test_bad_blend_inputs_are_named(comfy, tiny_sd15, fast_tune, override, input_name):
    with pytest.raises(InputError) as e:
        tune(fast_tune, tiny_sd15, 0.01, 0.01, **override)
    assert e.value.input_name == input_name


def test_checkpointed_steps_and_previews_through_the_blend(comfy, tiny_sd15, fast_tune, monkeypatch):
    """Gradient checkpointing recomputes the blended blocks alike (the hard captions travel with the call), and a
    preview sample sees the blended adapters hooked onto their layers (a = 1), which training leaves unhooked."""
    from comfyui_personalize.nodes.session import TrainingSession
    from comfyui_personalize.training.options import TrainOptions

    hooked = []

    def sample(self, prompt, size, seed):
        layer = self.host.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_k
        hooked.append(len(layer._forward_hooks))

    monkeypatch.setattr(TrainingSession, "sample", sample)
    plain = tune(fast_tune, tiny_sd15, 0.01, 0.01, a_blend=0.6, options=TrainOptions(sample_every=2))[4]["loss"]
    assert hooked == [1, 1]
    checkpointed = tune(fast_tune, tiny_sd15, 0.01, 0.01, a_blend=0.6, gradient_checkpointing=True)[4]["loss"]
    assert checkpointed == pytest.approx(plain, rel=tolerance()["rtol"])
