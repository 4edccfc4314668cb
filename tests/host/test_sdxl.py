"""SDXL-shaped UNet: kohya LDM-style names that ComfyUI's own LoRA key map accepts, and training through y."""
import pytest
import torch
from comfy_tiny import TINY_SDXL, tiny_unet_patcher

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def tiny_sdxl(comfy):
    import comfy.supported_models

    return tiny_unet_patcher(comfy.supported_models.SDXL, TINY_SDXL, seed=4)


def test_sdxl_lora_names_are_ldm_style_and_loadable(tiny_sdxl):
    import comfy.lora

    from comfyui_personalize.nodes.comfy_adapter import ComfyHost

    host = ComfyHost(tiny_sdxl, None, None)
    assert host.family == "sdxl" and host.prediction == "eps"
    names = host.unet_lora_targets("attention")
    key_map = comfy.lora.model_lora_keys_unet(tiny_sdxl.model, {})
    assert names and all(n in key_map for n in names)
    assert all(n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
               for n in names)


def test_sdxl_trains_through_the_adm_vector(tiny_sdxl):
    from comfyui_personalize.nodes.comfy_adapter import ComfyHost
    from comfyui_personalize.training.batches import TrainingData
    from comfyui_personalize.training.lora import LoRANetwork
    from comfyui_personalize.training.task import Conditioning
    from comfyui_personalize.training.trainer import TrainConfig, train

    host = ComfyHost(tiny_sdxl, None, None)
    pooled = torch.randn(2, 1280)
    y = torch.cat([host.model.model.encode_adm(pooled_output=p[None], width=64, height=64) for p in pooled])
    assert y.shape == (2, 2816)
    with torch.inference_mode(False), torch.enable_grad():
        host.load_for_training(False)
        net = LoRANetwork(host.unet_lora_targets("attention"), 4, 4).to(host.model.load_device)
        cond = Conditioning(torch.randn(2, 77, 2048), y)
        with net.attached():
            losses = train(host.task(), TrainingData.encoded(torch.randn(2, 4, 8, 8), cond), list(net.parameters()),
                           TrainConfig(steps=3, learning_rate=1e-3, batch_size=2))
        dev = host.model.load_device
        x, t = torch.randn(2, 4, 8, 8, device=dev), torch.tensor([100, 700], device=dev)
        on_dev = cond.to(dev)
        with_y = host.predict(x, t, on_dev)
        zero_y = host.predict(x, t, Conditioning(on_dev.context, torch.zeros_like(on_dev.y)))
    assert len(losses) == 3 and any(a.up.abs().sum() > 0 for a in net.adapters.values())
    assert (with_y - zero_y).abs().max() > 1e-4  # the size/pooled vector reaches the model
