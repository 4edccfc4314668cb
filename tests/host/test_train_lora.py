"""Train LoRA inside real ComfyUI: host untouched, stock LoraLoader reproduces our MODEL, bad inputs named."""

import pytest
import torch
from comfy_tiny import weights_hash
from safetensors import safe_open
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def pack_nodes(comfy):
    from comfyui_personalize.nodes.save_lora import PersonalizeSaveLoRA
    from comfyui_personalize.nodes.train_lora import PersonalizeTrainLoRA
    return PersonalizeTrainLoRA, PersonalizeSaveLoRA


def subject_images(n=2, size=64):
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():  # IMAGE tensors arrive as inference tensors from upstream nodes
        return torch.rand(n, size, size, 3, generator=g)


def run_node(node_cls, **kwargs):
    """Execute a V3 node the way ComfyUI's executor does (class clone + hidden inputs, inference mode)."""
    from comfy_api.latest import io

    cls = node_cls
    if hasattr(node_cls, "PREPARE_CLASS_CLONE"):
        cls = node_cls.PREPARE_CLASS_CLONE({io.Hidden.unique_id: "7"})
    with torch.inference_mode():
        out = cls.execute(**kwargs)
    assert isinstance(out, io.NodeOutput)
    return out


def dataset(images=None, caption="a photo of zwx dog", **options):
    """What Personalize Instance Dataset hands a trainer: images (as ComfyUI gives them) with captions."""
    from comfyui_personalize.training.data import expand_captions, prepare_images
    from comfyui_personalize.training.datasets import InstanceDataset

    images = prepare_images(subject_images() if images is None else images)
    with torch.inference_mode(False):
        parts = tuple(im.clone() for im in images)
    return InstanceDataset(parts, tuple(expand_captions(caption, len(parts))), **{"resolution": 64, **options})


TRAIN_ARGS = dict(steps=3, learning_rate=1e-3, rank=4, alpha=4.0, targets="attention", train_text_encoder=False,
                  batch_size=2, seed=0, dtype="auto", gradient_checkpointing=False)


def ksample(comfy, model, clip, seed=3, prompt="a photo of zwx dog"):
    pos = comfy.nodes.CLIPTextEncode().encode(clip, prompt)[0]
    neg = comfy.nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    with torch.inference_mode():
        return comfy.nodes.common_ksampler(model, seed, 4, 5.0, "euler", "normal", pos, neg, latent)[0]["samples"]


def test_train_save_and_stock_loraloader_reproduce_the_model(comfy, tiny_sd15, pack_nodes):
    train_node, save_node = pack_nodes
    model, clip, vae = tiny_sd15
    import comfy.model_management as mm
    mm.unload_all_models()
    before_unet, before_clip = weights_hash(model.model), weights_hash(clip.cond_stage_model)
    patches_before = dict(model.patches)

    trained_model, trained_clip, lora, loss = run_node(train_node, model=model, clip=clip, vae=vae,
                                                       dataset=dataset(), **TRAIN_ARGS).result
    assert len(loss["loss"]) == 3 and all(torch.isfinite(torch.tensor(loss["loss"])))
    assert all(k.startswith("lora_unet_down_blocks_") or k.startswith("lora_unet_up_blocks_")
               or k.startswith("lora_unet_mid_block_") for k in lora)
    assert any(k.endswith("attn2_to_out_0.lora_up.weight") for k in lora)
    assert model.patches == patches_before and trained_model is not model  # input MODEL not patched
    assert len(trained_model.patches) == len(lora) // 3  # every module of the file applied

    name = run_node(save_node, lora=lora, name="dog", subfolder="tests", save_dtype="fp32",
                    if_exists="increment").result[0]
    assert name == "tests/dog.safetensors"
    path = comfy.models / "loras" / name
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(lora)
    assert meta["ss_network_dim"] == "4" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"

    loaded_model, loaded_clip = comfy.nodes.LoraLoader().load_lora(model, clip, name, 1.0, 1.0)
    ours = ksample(comfy, trained_model, trained_clip)
    stock = ksample(comfy, loaded_model, loaded_clip)
    base = ksample(comfy, model, clip)
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-5)
    assert (ours - base).abs().max() > 1e-4  # the LoRA changes the output at all

    import comfy.model_management as mm
    mm.unload_all_models()  # ComfyUI restores patched weights when a model leaves the device
    assert weights_hash(model.model) == before_unet
    assert weights_hash(clip.cond_stage_model) == before_clip
    assert not any(m._forward_hooks for m in model.model.modules())


def test_text_encoder_lora_trains_and_loads(comfy, tiny_sd15, pack_nodes):
    train_node, save_node = pack_nodes
    model, clip, vae = tiny_sd15
    args = dict(TRAIN_ARGS, train_text_encoder=True, steps=2)
    trained_model, trained_clip, lora, _ = run_node(train_node, model=model, clip=clip, vae=vae,
                                                    dataset=dataset(), **args).result
    te_keys = [k for k in lora if k.startswith("lora_te_text_model_encoder_layers_")]
    assert te_keys and any(lora[k].abs().sum() > 0 for k in te_keys if k.endswith("lora_up.weight"))
    assert trained_clip is not clip and len(trained_clip.patcher.patches) == len(te_keys) // 3
    name = run_node(save_node, lora=lora, name="dog_te", subfolder="", save_dtype="fp32",
                    if_exists="increment").result[0]
    loaded_model, loaded_clip = comfy.nodes.LoraLoader().load_lora(model, clip, name, 1.0, 1.0)
    torch.testing.assert_close(ksample(comfy, trained_model, trained_clip), ksample(comfy, loaded_model, loaded_clip),
                               rtol=0, atol=1e-5)


def test_entrypoint_registers_the_nodes(comfy):
    import comfyui_personalize.nodes as pack_nodes_module
    ids = {n.define_schema().node_id for n in pack_nodes_module.NODE_LIST}
    assert {"PersonalizeTrainLoRA", "PersonalizeSaveLoRA"} <= ids


def test_every_widget_of_every_node_explains_itself(comfy):
    """A user hovering an input sees what it does: steps, learning_rate, rank... had no tooltip."""
    from comfy_api.latest import io

    import comfyui_personalize.nodes as pack_nodes_module
    widgets = (io.Int.Input, io.Float.Input, io.String.Input, io.Combo.Input, io.Boolean.Input)
    bare = [f"{schema.node_id}.{i.id}" for schema in (n.define_schema() for n in pack_nodes_module.NODE_LIST)
            for i in schema.inputs if isinstance(i, widgets) and not i.tooltip]
    assert bare == []


@pytest.mark.parametrize("override,input_name", [
    ({"dataset": "not a dataset"}, "dataset"),
    ({"rank": 0}, "rank"),
    ({"steps": 0}, "steps"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"resume_from": "missing.safetensors"}, "resume_from"),
])
def test_bad_inputs_name_the_input(comfy, tiny_sd15, pack_nodes, override, input_name):
    from comfyui_personalize.training.errors import InputError
    model, clip, vae = tiny_sd15
    args = dict(TRAIN_ARGS, dataset=dataset())
    args.update(override)
    with pytest.raises(InputError) as e:
        run_node(pack_nodes[0], model=model, clip=clip, vae=vae, **args)
    assert e.value.input_name == input_name


def test_non_sd_model_is_refused(comfy, tiny_sd15, pack_nodes):
    from comfyui_personalize.training.errors import InputError
    model, clip, vae = tiny_sd15
    other = model.clone()
    other.add_object_patch("model_sampling", _flow_sampling(model))
    with pytest.raises(InputError, match="model: .*sampling is not supported"):
        run_node(pack_nodes[0], model=other, clip=clip, vae=vae, dataset=dataset(), **TRAIN_ARGS)


@pytest.mark.parametrize("sampling,prediction", [("eps", "eps"), ("v_prediction", "v"), ("x0", None),
                                                 ("img_to_img", None), ("lcm", None)])
def test_prediction_follows_comfyuis_model_sampling_node(comfy, tiny_sd15, sampling, prediction):
    """x0, img_to_img and lcm are EPS subclasses in ComfyUI: they must be refused, not trained toward the noise."""
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    from comfyui_personalize.nodes.comfy_adapter import model_prediction
    from comfyui_personalize.training.errors import InputError
    patched = ModelSamplingDiscrete().patch(tiny_sd15[0], sampling, False)[0]
    if prediction is None:
        with pytest.raises(InputError, match="model: .*set ModelSamplingDiscrete to eps or v_prediction"):
            model_prediction(patched)
    else:
        assert model_prediction(patched) == prediction


def _flow_sampling(model):
    import comfy.model_sampling

    class Flow(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass
    return Flow(model.model.model_config)


def test_save_refuses_escaping_names(comfy, pack_nodes):
    from comfyui_personalize.training.errors import InputError
    lora = {"lora_unet_x.alpha": torch.tensor(1.0)}
    for kwargs in ({"name": "../evil", "subfolder": ""}, {"name": "ok", "subfolder": "../../etc"},
                   {"name": "a/b", "subfolder": ""}):
        with pytest.raises(InputError):
            run_node(pack_nodes[1], lora=lora, save_dtype="fp16", if_exists="increment", **kwargs)
    # nothing written anywhere the names point: inside models/, beside it, or at ../../etc
    assert not list(comfy.models.glob("**/evil*")) and not list(comfy.models.parent.glob("evil*"))
    assert not list(comfy.models.glob("**/ok*")) and not (comfy.models.parent / "etc").exists()


def test_cancel_stops_training_and_leaves_nothing_behind(comfy, tiny_sd15, pack_nodes):
    import comfy.model_management as mm
    model, clip, vae = tiny_sd15
    mm.unload_all_models()  # earlier tests may have left a LoRA-patched clone loaded (weights patched in place)
    before = weights_hash(model.model)
    files_before = sorted((comfy.models / "loras").rglob("*"))
    mm.interrupt_current_processing(True)  # what the UI's Cancel button does
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run_node(pack_nodes[0], model=model, clip=clip, vae=vae, dataset=dataset(),
                     **dict(TRAIN_ARGS, steps=50))
    finally:
        mm.interrupt_current_processing(False)
    assert sorted((comfy.models / "loras").rglob("*")) == files_before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.model.modules())
    mm.unload_all_models()
    assert weights_hash(model.model) == before


def test_gradient_checkpointing_stores_fewer_activations(comfy, tiny_sd15):
    from comfyui_personalize.nodes.comfy_adapter import ComfyHost
    from comfyui_personalize.training.backward_memory import gradient_checkpointing
    from comfyui_personalize.training.lora import LoRANetwork

    model, clip, vae = tiny_sd15
    host = ComfyHost(model, clip, vae)
    with torch.inference_mode(False), torch.enable_grad():
        cond = host.encode_text(["a photo of zwx dog"], (64, 64)).clone()
        host.load_for_training(False)
        dev = host.model.load_device
        net = LoRANetwork(host.unet_lora_targets("attention"), 4, 4).to(dev)
        x, t = torch.randn(1, 4, 8, 8, device=dev), torch.tensor([500], device=dev)

        def saved_bytes(enabled):
            total = []

            def pack(tensor):
                total.append(tensor.numel() * tensor.element_size())
                return tensor

            with net.attached(), gradient_checkpointing(host.task().checkpoint_blocks, enabled), \
                    torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                out = host.predict(x, t, cond)
                saved = sum(total)
                out.float().mean().backward()  # the recompute must run and match the forward pass
            assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0
            net.zero_grad(set_to_none=True)
            return saved

        plain, checkpointed = saved_bytes(False), saved_bytes(True)
    assert checkpointed < 0.5 * plain, (plain, checkpointed)


def test_channels_last_training_layout_is_exact_and_restored(comfy, tiny_sd15):
    from comfyui_personalize.nodes.comfy_adapter import ComfyHost
    model, clip, vae = tiny_sd15
    host = ComfyHost(model, clip, vae)
    with torch.inference_mode(False):
        cond = host.encode_text(["a photo of zwx dog"], (64, 64)).clone()
        host.load_for_training(False)
        weights = {n: p for n, p in host.diffusion_model.named_parameters()}
        dev = host.model.load_device
        x, t, pair = torch.randn(2, 4, 8, 8, device=dev), torch.tensor([10, 900], device=dev), torch.tensor([0, 0])
        plain = host.predict(x, t, cond.select(pair))
        with host.channels_last():
            convs = [m.weight for m in host.diffusion_model.modules() if isinstance(m, torch.nn.Conv2d)]
            assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
            nhwc = host.predict(x, t, cond.select(pair))
    tol = 1e-4 if dev.type == "cpu" else 2e-2  # fp16 NHWC kernels differ from NCHW ones in rounding
    torch.testing.assert_close(nhwc.float(), plain.float(), rtol=tol, atol=tol)
    assert all(p is weights[n] for n, p in host.diffusion_model.named_parameters())  # the host's own tensors back


def test_trains_after_comfyui_moved_the_weights(comfy, tiny_sd15, pack_nodes):
    """Moving a model (Module.to, as ComfyUI's loader does on a GPU) assigns ``param.data`` to Parameters made
    in inference mode: they stop reporting is_inference() yet still lack the version counter autograd needs."""
    model, clip, vae = tiny_sd15
    with torch.no_grad():
        for p in model.model.diffusion_model.parameters():
            p.data = p.data.clone()
    assert not any(p.is_inference() for p in model.model.diffusion_model.parameters())
    _, _, lora, loss = run_node(pack_nodes[0], model=model, clip=clip, vae=vae, dataset=dataset(),
                                **dict(TRAIN_ARGS, steps=2)).result
    assert len(loss["loss"]) == 2 and any(v.abs().sum() > 0 for k, v in lora.items() if k.endswith("up.weight"))


def test_training_asks_comfyui_to_clear_the_device_of_other_models(comfy, tiny_sd15, pack_nodes, monkeypatch):
    """Training asked for room for the model alone (memory_required 0): other loaded models (a second checkpoint,
    the ImageReward scorer) stayed on the GPU beside the fp32 copies, gradients and optimiser state."""
    import comfy.model_management as mm

    calls, load = [], mm.load_models_gpu
    monkeypatch.setattr(mm, "load_models_gpu", lambda models, *a, **k: calls.append(k) or load(models, *a, **k))
    model, clip, vae = tiny_sd15
    run_node(pack_nodes[0], model=model, clip=clip, vae=vae, dataset=dataset(), **dict(TRAIN_ARGS, steps=1))
    assert any(k.get("memory_required", 0) >= 1e20 and k.get("force_full_load") for k in calls), calls


def test_prior_prediction_targets_come_from_the_frozen_text_encoder_too(comfy, tiny_sd15, pack_nodes, monkeypatch):
    """With train_text_encoder the class prompt was encoded by the trained encoder for the 'frozen' target, so the
    text encoder's drift on the class prompt was never penalised."""
    from comfyui_personalize.nodes import comfy_adapter
    from comfyui_personalize.training.datasets import PriorPreservation

    model, clip, vae = tiny_sd15
    targets = []
    predict = comfy_adapter.ComfyHost.predict

    def spy(self, x_t, t, cond):
        if not torch.is_grad_enabled():  # the frozen model's prediction (the prior target)
            targets.append(cond.context[0].detach().float().cpu().clone())
        return predict(self, x_t, t, cond)

    monkeypatch.setattr(comfy_adapter.ComfyHost, "predict", spy)
    run_node(pack_nodes[0], model=model, clip=clip, vae=vae, dataset=dataset(),
             prior=PriorPreservation("prior_prediction", "a photo of a dog"),
             **dict(TRAIN_ARGS, steps=4, learning_rate=5e-2, train_text_encoder=True))
    frozen = comfy.nodes.CLIPTextEncode().encode(clip, "a photo of a dog")[0][0][0][0].float().cpu()
    assert len(targets) == 4
    for context in targets:
        torch.testing.assert_close(context, frozen, rtol=0, atol=1e-4)


def test_resume_refuses_a_file_with_adapters_the_run_drops_and_keeps_the_files_alpha(comfy, tiny_sd15, pack_nodes):
    """A text-encoder LoRA resumed without the text encoder lost those adapters silently; a different alpha was
    replaced by the file's while the metadata kept the node's."""
    from comfyui_personalize.training.errors import InputError
    train, save = pack_nodes
    model, clip, vae = tiny_sd15
    args = dict(TRAIN_ARGS, dataset=dataset(), steps=1, batch_size=1)
    lora = run_node(train, model=model, clip=clip, vae=vae, **dict(args, train_text_encoder=True)).result[2]
    name = run_node(save, lora=lora, name="resume_te", subfolder="", save_dtype="fp32",
                    if_exists="overwrite").result[0]
    with pytest.raises(InputError, match="adapters this run does not train") as e:
        run_node(train, model=model, clip=clip, vae=vae, **dict(args, resume_from=name))
    assert e.value.input_name == "resume_from"
    resumed = run_node(train, model=model, clip=clip, vae=vae,
                       **dict(args, train_text_encoder=True, resume_from=name, alpha=2.0)).result[2]
    assert {float(v) for k, v in resumed.items() if k.endswith(".alpha")} == {4.0}  # TRAIN_ARGS' alpha, the file's
    assert resumed.metadata["ss_network_alpha"] == "4.0"
    # the same LoRA with a pivotal word bundled in (Save LoRA's bundle_embedding) resumes: the word is no adapter
    path = comfy.models / "loras" / name
    save_file({**load_file(str(path)), "bundle_emb.zwx.clip_l": torch.zeros(1, 768)}, str(path))
    bundled = run_node(train, model=model, clip=clip, vae=vae,
                       **dict(args, train_text_encoder=True, resume_from=name, alpha=2.0)).result[2]
    assert bundled.keys() == resumed.keys()


def test_resume_from_a_file_that_is_no_lora_names_the_input(comfy, tiny_sd15, pack_nodes):
    """A truncated file raised safetensors' header error; a checkpoint or a diffusers LoRA was told to change
    targets and rank, which no setting could fix; .pt files were offered though only .safetensors are read."""

    from comfyui_personalize.nodes.train_lora import lora_files
    from comfyui_personalize.training.errors import InputError
    loras = comfy.models / "loras"
    (loras / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, str(loras / "ckpt.safetensors"))
    (loras / "old.pt").write_bytes(b"pickle")
    try:
        assert "old.pt" not in lora_files() and "ckpt.safetensors" in lora_files()
        model, clip, vae = tiny_sd15
        for name, message in (("broken.safetensors", "cannot read broken.safetensors"),
                              ("ckpt.safetensors", "not a kohya-format LoRA")):
            with pytest.raises(InputError, match=message) as e:
                run_node(pack_nodes[0], model=model, clip=clip, vae=vae, dataset=dataset(), resume_from=name,
                         **dict(TRAIN_ARGS, steps=1))
            assert e.value.input_name == "resume_from"
    finally:
        for name in ("broken.safetensors", "ckpt.safetensors", "old.pt"):
            (loras / name).unlink()
