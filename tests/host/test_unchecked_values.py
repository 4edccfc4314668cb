"""Values ComfyUI's own range check lets through: NaN (its min/max comparisons are false for NaN) from an API
prompt, and anything out of range that arrives through a link. Each is refused naming the input; before, some
crashed deep in ComfyUI and others silently changed the result (a NaN image, an edit blended away)."""
import pytest
from test_attention_nodes import attention_lora, empty_latent, encode, nodes, p2p  # noqa: F401
from test_train_lora import run_node

from comfyui_personalize.training.errors import InputError

NAN = float("nan")
PROMPT = "a photo of a red car on a street"


@pytest.mark.parametrize("a", [NAN, 1.5, -0.5])
def test_dual_path_a_blend_outside_0_1(comfy, tiny_sd15, nodes, a):  # noqa: F811
    model, clip, _ = tiny_sd15
    with pytest.raises(InputError, match="a_blend: must be between 0"):
        run_node(nodes["dual"], model=model, hard=encode(comfy, clip, "a photo of a dog"), lora_name="none",
                 a_blend=a, paths="cross", start_percent=0.0, end_percent=1.0, lora=attention_lora(model))


def test_dual_path_lora_file_that_is_not_one(comfy, tiny_sd15, nodes):  # noqa: F811
    model, clip, _ = tiny_sd15
    broken = comfy.models / "loras" / "broken.safetensors"
    broken.write_bytes(b"<html>rate limited</html>" * 8)  # a failed download
    try:
        with pytest.raises(InputError, match="lora_name: cannot read broken.safetensors as a LoRA"):
            run_node(nodes["dual"], model=model, hard=encode(comfy, clip, "a dog"), lora_name="broken.safetensors",
                     a_blend=0.5, paths="cross", start_percent=0.0, end_percent=1.0)
    finally:
        broken.unlink()


@pytest.mark.parametrize("name", ["blend_threshold", "blend_start_percent"])
def test_p2p_local_blend_values(comfy, tiny_sd15, nodes, name):  # noqa: F811
    model, clip, _ = tiny_sd15
    with pytest.raises(InputError, match=f"{name}: must be between 0 and 1, got nan"):
        p2p(nodes, model, clip, PROMPT, PROMPT.replace("car", "bus"), blend_words="car, bus", **{name: NAN})


@pytest.mark.parametrize("at", [NAN, 1.0])
def test_attention_maps_at_percent(comfy, tiny_sd15, nodes, at):  # noqa: F811
    model, clip, _ = tiny_sd15
    with pytest.raises(InputError, match="at_percent: must be at least 0 and below 1"):
        run_node(nodes["maps"], model=model, clip=clip, text="a photo of a cat", words="cat", latent=empty_latent(),
                 resolution="all", at_percent=at, seed=0)


def test_reweight_self_end_percent(comfy, tiny_sd15, nodes):  # noqa: F811
    model, clip, _ = tiny_sd15
    with pytest.raises(InputError, match="self_end_percent: must be between 0 and 1"):
        run_node(nodes["reweight"], model=model, clip=clip, text=PROMPT, words="red:2", mode="p2p_locked",
                 apply_to="cond", start_percent=0.0, end_percent=1.0, latent=empty_latent(), negative_text="",
                 self_end_percent=NAN)
