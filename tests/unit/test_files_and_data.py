import json
import os
import stat

import pytest
import torch
from safetensors import safe_open

from comfyui_personalize.training import files
from comfyui_personalize.training.data import expand_captions, prepare_images
from comfyui_personalize.training.errors import InputError


@pytest.mark.parametrize("subfolder,name,bad", [
    ("", "../x", "name"), ("", "a/b", "name"), ("..", "x", "subfolder"), ("a/../../b", "x", "subfolder"),
    ("", "", "name"), ("", "con:x", "name"), ("/etc", "x", None),
])
def test_names_cannot_escape_the_folder(tmp_path, subfolder, name, bad):
    if bad is None:  # an absolute-looking subfolder is taken as relative to the folder
        assert files.resolve_output_path(tmp_path, subfolder, name, ".safetensors").parent == tmp_path / "etc"
        return
    with pytest.raises(InputError) as e:
        files.resolve_output_path(tmp_path, subfolder, name, ".safetensors")
    assert e.value.input_name == bad


def test_a_name_too_long_for_the_file_system_is_refused_naming_the_input(tmp_path):
    """255 bytes a name: a longer one raised OSError ("File name too long") from the existence check."""
    longest = "é" * (files.MAX_NAME_BYTES // 2)  # two bytes each
    for _ in range(2):  # the second time with its "_00001" suffix, and the temporary file's
        path = files.resolve_output_path(tmp_path, longest, longest, ".safetensors")
        files.save_safetensors_atomic({"a": torch.ones(1)}, path)
    assert path.name == f"{longest}_00001.safetensors"
    for subfolder, name, bad in (("", longest + "x", "name"), (longest + "x", "x", "subfolder")):
        with pytest.raises(InputError, match="bytes long") as e:
            files.resolve_output_path(tmp_path, subfolder, name, ".safetensors")
        assert e.value.input_name == bad


def test_a_subfolder_the_user_linked_elsewhere_is_used(tmp_path):
    """Linking a models subfolder to another disk is common (ComfyUI lists files through such links); the link was
    refused as leaving the folder. Names themselves still cannot leave it (above)."""
    (tmp_path / "loras").mkdir()
    (tmp_path / "other_disk").mkdir()
    (tmp_path / "loras" / "shared").symlink_to(tmp_path / "other_disk", target_is_directory=True)
    path = files.resolve_output_path(tmp_path / "loras", "shared", "x", ".safetensors")
    files.save_safetensors_atomic({"a": torch.ones(1)}, path)
    assert (tmp_path / "other_disk" / "x.safetensors").is_file()


def test_existing_files_are_never_overwritten_silently(tmp_path):
    first = files.resolve_output_path(tmp_path, "s", "lora", ".safetensors")
    files.save_safetensors_atomic({"a": torch.zeros(1)}, first)
    second = files.resolve_output_path(tmp_path, "s", "lora.safetensors", ".safetensors")
    assert second.name == "lora_00001.safetensors"
    assert files.resolve_output_path(tmp_path, "s", "lora", ".safetensors", "overwrite") == first
    with pytest.raises(InputError, match="exists"):
        files.resolve_output_path(tmp_path, "s", "lora", ".safetensors", "error")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(Exception):
        files.save_safetensors_atomic({"a": "not a tensor"}, path)
    assert list(tmp_path.iterdir()) == []


def test_saved_file_has_metadata_and_normal_permissions(tmp_path):
    meta = files.lora_metadata(base_model="sdxl", rank=4, alpha=2.0, learning_rate=1e-4, steps=10, batch_size=1,
                               resolution=(64, 96), num_images=3, seed=1, title="t", text_encoder_trained=False,
                               prediction="eps", targets="attention")
    path = files.save_safetensors_atomic({"a": torch.ones(2)}, tmp_path / "m.safetensors", meta)
    with safe_open(str(path), "pt") as f:
        got = f.metadata()
    assert got["ss_base_model_version"] == "sdxl_base_v1-0" and got["ss_network_dim"] == "4"
    assert got["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert got["modelspec.resolution"] == "96x64"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_metadata_names_the_schedule_the_class_images_and_the_sd2_variant():
    """ss_lr_scheduler always said constant and ss_num_reg_images 0; every SD2 file said 768-v."""
    common = dict(rank=4, alpha=2.0, learning_rate=1e-4, steps=10, batch_size=1, resolution=(64, 64), num_images=3,
                  seed=1, title="t", text_encoder_trained=False, targets="attention")
    meta = files.lora_metadata(base_model="sd2", prediction="eps", lr_scheduler="cosine", num_reg_images=200,
                               **common)
    assert meta["ss_lr_scheduler"] == "cosine" and meta["ss_num_reg_images"] == "200"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-512/lora" and meta["ss_v_parameterization"] == "False"
    v = files.lora_metadata(base_model="sd2", prediction="v", **common)
    assert v["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora" and v["ss_v_parameterization"] == "True"
    assert v["ss_base_model_version"] == "sd_v2_v" and meta["ss_base_model_version"] == "sd_v2"  # as kohya names them
    assert meta["ss_optimizer"] == "torch.optim.AdamW"
    assert files.lora_metadata(base_model="sd2", prediction="v", optimizer="adafactor",
                               **common)["ss_optimizer"] == "transformers.optimization.Adafactor"


def test_metadata_counts_the_training_tags_as_kohya_does():
    """A1111's metadata view lists a LoRA's training tags from ss_tag_frequency: comma-separated, per image."""
    meta = files.lora_metadata(base_model="sd1", prediction="eps", rank=4, alpha=2.0, learning_rate=1e-4, steps=10,
                               batch_size=1, resolution=(64, 64), num_images=3, seed=1, title="t",
                               text_encoder_trained=False, targets="attention",
                               captions=["a photo of zwx dog, grass", "a photo of zwx dog , beach",
                                         "a photo of zwx dog"])
    assert json.loads(meta["ss_tag_frequency"]) == {"instance": {"a photo of zwx dog": 3, "grass": 1, "beach": 1}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"instance": {"n_repeats": 1, "img_count": 3}}


def test_read_only_folder_is_a_clear_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that can write anywhere (root)")
        with pytest.raises(InputError, match="cannot write"):
            files.save_safetensors_atomic({"a": torch.zeros(1)}, ro / "x.safetensors")
    finally:
        ro.chmod(0o700)


def test_prepare_images_converts_and_crops():
    rgba = torch.rand(2, 70, 67, 4)
    out = prepare_images(rgba)
    assert out.shape == (2, 64, 64, 3)
    torch.testing.assert_close(out, rgba[:, 3:67, 1:65, :3])
    assert prepare_images(torch.rand(1, 32, 32, 1)).shape == (1, 32, 32, 3)


@pytest.mark.parametrize("images,match", [
    (torch.zeros(0, 64, 64, 3), "empty"), (torch.rand(1, 1, 1, 3), "too small"), (torch.rand(64, 64, 3), "IMAGE"),
    (torch.rand(1, 64, 64, 2), "channels"), (torch.full((1, 64, 64, 3), float("nan")), "NaN"),
])
def test_bad_images_name_the_input(images, match):
    with pytest.raises(InputError, match=f"images: .*{match}"):
        prepare_images(images)


def test_captions_one_for_all_or_one_per_image():
    assert expand_captions("a zwx dog", 3) == ["a zwx dog"] * 3
    assert expand_captions("one\n\n two \nthree", 3) == ["one", "two", "three"]
    with pytest.raises(InputError, match="caption: has 2 lines for 3 images"):
        expand_captions("a\nb", 3)
    with pytest.raises(InputError, match="caption: is empty"):
        expand_captions("  \n", 2)
