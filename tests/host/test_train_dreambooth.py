"""DreamBooth inside real ComfyUI: full fine-tune with prior preservation on clones of the host's weights; the
weight diff reproduces the model through the stock LoraLoader; the checkpoint holds the tuned weights."""
import pytest
import torch
from comfy_tiny import weights_hash
from safetensors.torch import load_file
from test_train_lora import dataset, ksample, run_node

pytestmark = pytest.mark.host
ARGS = dict(steps=2, learning_rate=1e-3, batch_size=1, seed=0, dtype="auto", gradient_checkpointing=False,
            train_text_encoder=False, text_encoder_lr=1e-4)


@pytest.fixture(scope="module")
def nodes(comfy):
    from comfyui_personalize.nodes.save_checkpoint import PersonalizeSaveCheckpoint
    from comfyui_personalize.nodes.save_lora import PersonalizeSaveLoRA
    from comfyui_personalize.nodes.train_dreambooth import PersonalizeTrainDreamBooth
    return PersonalizeTrainDreamBooth, PersonalizeSaveLoRA, PersonalizeSaveCheckpoint


def class_prior(n=3):
    from comfyui_personalize.training.datasets import PriorPreservation
    g = torch.Generator().manual_seed(9)
    return PriorPreservation("class_images", "a photo of a dog", 1.0, tuple(torch.rand(64, 64, 3, generator=g)
                                                                            for _ in range(n)))


def test_dreambooth_with_prior_tunes_a_copy_and_its_files_reproduce_it(comfy, tiny_sd15, nodes):
    train, save_lora, save_ckpt = nodes
    model, clip, vae = tiny_sd15
    import comfy.model_management as mm
    mm.unload_all_models()
    before = weights_hash(model.model), weights_hash(clip.cond_stage_model)
    out_model, out_clip, diff, loss = run_node(train, model=model, clip=clip, vae=vae, dataset=dataset(),
                                               prior=class_prior(), **ARGS).result
    assert len(loss["loss"]) == 2 and out_clip is clip
    assert all(k.startswith("diffusion_model.") and k.endswith((".diff", ".diff_b")) for k in diff)
    n_params = sum(1 for _ in model.model.diffusion_model.parameters())
    assert len(diff) == n_params and sum(float(v.abs().sum()) for v in diff.values()) > 0
    assert len(out_model.patches) == n_params  # every UNet tensor is patched
    mm.unload_all_models()
    assert (weights_hash(model.model), weights_hash(clip.cond_stage_model)) == before
    assert not any(m._forward_hooks for m in model.model.modules())

    name = run_node(save_lora, lora=diff, name="db_diff", subfolder="", save_dtype="fp32",
                    if_exists="overwrite").result[0]
    stock_model, _ = comfy.nodes.LoraLoader().load_lora(model, clip, name, 1.0, 1.0)
    ours = ksample(comfy, out_model, clip)
    torch.testing.assert_close(ours, ksample(comfy, stock_model, clip), rtol=0, atol=1e-5)
    assert (ours - ksample(comfy, model, clip)).abs().max() > 1e-4

    ckpt = run_node(save_ckpt, model=out_model, clip=clip, vae=vae, name="db", subfolder="tests",
                    if_exists="overwrite").result[0]
    sd = load_file(str(comfy.models / "checkpoints" / ckpt))
    assert not list((comfy.models / "checkpoints" / "tests").glob(".*tmp"))
    mm.unload_all_models()
    for k, d in list(diff.items())[:20]:
        param = k[len("diffusion_model."):].replace(".diff_b", ".bias").replace(".diff", ".weight")
        base = model.model.diffusion_model.get_parameter(param).detach().float()
        saved = sd["model.diffusion_model." + param].float()
        torch.testing.assert_close(saved, base + d.float(), rtol=1e-5, atol=1e-6)
    assert any(k.startswith("cond_stage_model.") for k in sd) and any(k.startswith("first_stage_model.") for k in sd)


def test_dreambooth_text_encoder_and_refusals(comfy, tiny_sd15, nodes):
    from comfyui_personalize.training.datasets import PriorPreservation
    from comfyui_personalize.training.errors import InputError
    train = nodes[0]
    model, clip, vae = tiny_sd15
    out_model, out_clip, diff, _ = run_node(train, model=model, clip=clip, vae=vae, dataset=dataset(),
                                            **dict(ARGS, train_text_encoder=True)).result
    assert any(k.startswith("text_encoders.") for k in diff) and out_clip is not clip
    assert len(out_clip.patcher.patches) > 0
    bad = [({"prior": PriorPreservation("prior_prediction", "a photo of a dog")}, "prior"),
           ({"text_encoder_lr": 0.0, "train_text_encoder": True}, "text_encoder_lr"), ({"steps": 0}, "steps")]
    for override, name in bad:
        with pytest.raises(InputError) as e:
            run_node(train, model=model, clip=clip, vae=vae, dataset=dataset(), **dict(ARGS, **override))
        assert e.value.input_name == name
