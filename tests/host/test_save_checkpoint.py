"""Personalize Save Checkpoint writes the markers ComfyUI's loader reads to set the sampling up again: a v-prediction
zero-terminal-SNR SDXL model must reload as one, not with the ordinary schedule."""
import pytest
import torch
from comfy_tiny import TINY_SDXL, tiny_unet_patcher
from safetensors import safe_open
from safetensors.torch import load_file
from test_train_lora import run_node

pytestmark = pytest.mark.host


def save(comfy, model, clip, vae, name, shown=None):
    from comfyui_personalize.nodes.save_checkpoint import PersonalizeSaveCheckpoint
    out = run_node(PersonalizeSaveCheckpoint, model=model, clip=clip, vae=vae, name=name, subfolder="tests",
                   if_exists="overwrite")
    if shown is not None:
        shown.append(out.ui.as_dict()["text"][0])
    path = str(comfy.models / "checkpoints" / out.result[0])
    with safe_open(path, "pt") as f:
        return load_file(path), f.metadata()


def test_zsnr_v_prediction_sdxl_reloads_with_its_schedule(comfy, tiny_sd15):
    from comfy import model_base, supported_models

    class ZsnrVPredSDXL(supported_models.SDXL):  # what the loader makes of a file with v_pred + ztsnr
        def model_type(self, state_dict, prefix=""):
            self.sampling_settings = dict(self.sampling_settings, zsnr=True)
            return model_base.ModelType.V_PREDICTION

    model = tiny_unet_patcher(ZsnrVPredSDXL, TINY_SDXL, seed=4)
    assert model.get_model_object("model_sampling").zsnr
    _, clip, vae = tiny_sd15  # the CLIP and VAE do not matter to the markers
    sd, meta = save(comfy, model, clip, vae, "zsnr_vpred")
    config = supported_models.SDXL(dict(TINY_SDXL))
    assert config.model_type(sd, "model.diffusion_model.") == model_base.ModelType.V_PREDICTION
    assert config.sampling_settings.get("zsnr") is True
    reloaded = model_base.SDXL(config, model_type=model_base.ModelType.V_PREDICTION)
    torch.testing.assert_close(reloaded.model_sampling.sigmas.cpu(),
                               model.get_model_object("model_sampling").sigmas.cpu())
    assert meta["modelspec.predict_key"] == "v" and meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"


def test_eps_sd15_has_no_v_markers(comfy, tiny_sd15):
    model, clip, vae = tiny_sd15
    sd, meta = save(comfy, model, clip, vae, "eps")
    assert "v_pred" not in sd and "ztsnr" not in sd
    assert meta["modelspec.predict_key"] == "epsilon" and meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert meta["modelspec.title"] == "eps"


@pytest.mark.parametrize("zsnr", [True, False])
def test_the_markers_follow_the_sampling_the_model_trains_with(comfy, tiny_sd15, zsnr):
    """A ModelSamplingDiscrete node (v_prediction, zsnr) on a file without the markers is how such fine-tunes are
    trained; the file must say so, or it reloads as eps."""
    from comfy import supported_models
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    model, clip, vae = tiny_sd15
    patched = ModelSamplingDiscrete().patch(model, "v_prediction", zsnr)[0]
    shown = []
    sd, meta = save(comfy, patched, clip, vae, f"sampled_v_{zsnr}", shown)
    assert meta["modelspec.predict_key"] == "v" and "v_pred" in sd and ("ztsnr" in sd) == zsnr
    # ComfyUI 0.3.64 loads SD1.x files as eps whatever they say, so the node tells the user how to load this one
    assert supported_models.SD15({}).model_type(sd, "model.diffusion_model.").name == "EPS"
    assert "add ModelSamplingDiscrete (v_prediction" + (", zsnr on)" if zsnr else ")") in shown[0]
    plain = []
    save(comfy, model, clip, vae, "plain_eps", plain)
    assert "note" not in plain[0]
