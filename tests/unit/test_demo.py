import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from comfyui_personalize.headless.demo import ALPHA, CAPTION, RANK, check_reloaded_lora, main
from comfyui_personalize.training.lora import LoRANetwork


def test_demo_trains_saves_and_reloads_a_lora(tmp_path):
    assert main(["--out", str(tmp_path), "--steps", "30", "--sample-steps", "4"]) == 0

    for name in ("loss.png", "samples.png", "subject_images.png", "summary.json"):
        assert (tmp_path / name).is_file(), name
    lora = tmp_path / "loras" / "demo_lora.safetensors"
    with safe_open(str(lora), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    suffixes = {k.split(".", 1)[1] for k in keys}
    assert suffixes == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert metadata["ss_network_dim"] == "8" and metadata["ss_base_model_version"] == "sd_v1"

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["fixed_noise_loss_after"] < summary["fixed_noise_loss_before"]
    assert summary["lora_keys"] == len(keys)
    assert summary["files"]["lora"] == str(lora)


def test_rerun_overwrites_the_same_lora_file(tmp_path):
    args = ["--out", str(tmp_path), "--steps", "2", "--sample-steps", "1"]
    assert main(args) == 0 and main(args) == 0
    assert [p.name for p in (tmp_path / "loras").iterdir()] == ["demo_lora.safetensors"]


def test_bad_setting_is_reported_not_raised(tmp_path, caplog):
    assert main(["--out", str(tmp_path), "--steps", "0"]) == 2
    assert "steps: must be at least 1" in caplog.text


def test_reload_check_catches_a_file_that_differs(tmp_path, host):
    latents = host.encode_images(torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0)))
    cond = host.encode_text([CAPTION] * 2)
    g = torch.Generator().manual_seed(0)
    trained, other = (LoRANetwork(host.unet_lora_targets("attention"), rank=RANK, alpha=ALPHA, seed=s) for s in (0, 1))
    for net in (trained, other):
        for adapter in net.adapters.values():
            adapter.up.data.normal_(std=0.05, generator=g)  # as if trained: a zero LoRA would prove nothing
    path = tmp_path / "lora.safetensors"

    save_file(other.kohya_state_dict(), str(path))
    with pytest.raises(RuntimeError, match="does not reproduce"):
        check_reloaded_lora(host, trained, path, latents, cond)
    save_file(trained.kohya_state_dict(), str(path))
    assert check_reloaded_lora(host, trained, path, latents, cond) < 0.02
