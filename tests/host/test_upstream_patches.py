"""A MODEL with sampling-time patches from upstream nodes (FreeU, attention patches, wrappers): the trainers call
the UNet without them, and say so, naming them (it was silent: the LoRA fitted another function than the
previews showed). What training reads (a LoRA loaded upstream, a sampling override) is not named."""
import pytest
import torch
from test_train_lora import TRAIN_ARGS, dataset, run_node

pytestmark = pytest.mark.host


def train(comfy, model, clip, vae, caplog):
    from comfyui_personalize.nodes.train_lora import PersonalizeTrainLoRA

    caplog.clear()
    with caplog.at_level("WARNING"):
        out = run_node(PersonalizeTrainLoRA, model=model, clip=clip, vae=vae, dataset=dataset(),
                       **dict(TRAIN_ARGS, steps=1))
    return out.result, [r.getMessage() for r in caplog.records if "from upstream nodes" in r.getMessage()]


def test_patches_that_change_the_prediction_are_named_and_left_out_of_training(comfy, tiny_sd15, caplog):
    from comfy.patcher_extension import WrappersMP
    from comfy_extras.nodes_freelunch import FreeU_V2

    model, clip, vae = tiny_sd15
    plain, warned = train(comfy, model, clip, vae, caplog)
    assert not warned
    patched = FreeU_V2().patch(model, 1.3, 1.4, 0.9, 0.2)[0]
    patched.set_model_attn1_patch(lambda q, k, v, extra_options: (q * 0, k, v))
    patched.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "upstream_pack", lambda executor, *a, **kw: executor(
        *a, **kw))
    patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, "sampling_only", lambda executor, *a, **kw: executor(
        *a, **kw))
    result, warned = train(comfy, patched, clip, vae, caplog)
    assert len(warned) == 1
    for name in ("output_block_patch", "attn1_patch", "diffusion_model wrapper 'upstream_pack'"):
        assert name in warned[0]
    assert "sampling_only" not in warned[0] and "connect the model from before those nodes" in warned[0]
    assert all(torch.equal(result[2][k], plain[2][k]) for k in plain[2])  # the UNet itself trained
    assert "output_block_patch" in result[0].model_options["transformer_options"]["patches"]  # kept downstream


def test_what_training_reads_is_not_named(comfy, tiny_sd15, caplog):
    """A sampling override (the schedule training uses) and a LoRA loaded upstream (weights it trains on top of)."""
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    from comfyui_personalize.nodes.save_lora import PersonalizeSaveLoRA

    model, clip, vae = tiny_sd15
    lora = train(comfy, model, clip, vae, caplog)[0][2]
    name = run_node(PersonalizeSaveLoRA, lora=lora, name="upstream", subfolder="", save_dtype="fp32",
                    if_exists="overwrite").result[0]
    v_model = ModelSamplingDiscrete().patch(model, "v_prediction", False)[0]
    with_lora, clip_lora = comfy.nodes.LoraLoader().load_lora(v_model, clip, name, 1.0, 1.0)
    assert not train(comfy, with_lora, clip_lora, vae, caplog)[1]
