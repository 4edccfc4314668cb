"""ImageReward checkpoints: safe reading (pickled code is refused, never run), other models refused, the tiny
checkpoint's round trip through .pt / wrapped / safetensors conversion, and where the files are looked for."""
import os
import pickletools
import zipfile

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from comfyui_personalize.headless.tiny_reward import write_tiny_reward_files
from comfyui_personalize.scoring.checkpoint import convert_to_safetensors, official_to_port, read_checkpoint
from comfyui_personalize.scoring.files import find_reward_files
from comfyui_personalize.scoring.model import build_model
from comfyui_personalize.scoring.scorer import build_tokenizer, load_scorer, read_med_config
from comfyui_personalize.training.errors import InputError


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    return write_tiny_reward_files(tmp_path_factory.mktemp("reward"))


@pytest.fixture(scope="module")
def inputs(tiny_files):
    tokenizer = build_tokenizer(tiny_files.vocab)
    enc = tokenizer(["a photo of a dog", "a red car"], padding="max_length", max_length=35, return_tensors="pt")
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    return pixels, enc["input_ids"], enc["attention_mask"]


def _scores(state, med, inputs):
    return build_model(state, med)(*inputs)


class MakeDirOnLoad:
    """A pickle payload: unpickling it calls os.mkdir(path)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def _pickle_globals(path) -> str:
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    return " ".join(str(arg) for op, arg, _ in pickletools.genops(data) if arg is not None)


@pytest.mark.parametrize("payload", ["mkdir", "os.system"])
def test_a_checkpoint_with_pickled_code_is_refused_and_nothing_runs(tmp_path, payload):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    callable_ = MakeDirOnLoad(str(marker)) if payload == "mkdir" else os.system
    torch.save({"mlp.layers.0.weight": torch.zeros(2, 2), "f": callable_}, path)
    assert ("mkdir" if payload == "mkdir" else "system") in _pickle_globals(path)  # the payload really is there
    with pytest.raises(InputError, match="contains code") as e:
        read_checkpoint(path)
    assert e.value.input_name == "checkpoint" and "safetensors" in str(e.value)
    assert not marker.exists()


def test_another_models_checkpoint_is_refused(tmp_path):
    path = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(2)}, str(path))
    with pytest.raises(InputError, match="sd15.safetensors is not an ImageReward checkpoint.*Stable Diffusion"):
        read_checkpoint(path)
    with pytest.raises(InputError, match="not an ImageReward checkpoint"):
        official_to_port({"model.diffusion_model.x": torch.zeros(1)})


def test_garbage_and_missing_files_give_input_errors(tmp_path):
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    for name in ("broken.pt", "broken.safetensors", "absent.pt"):
        with pytest.raises(InputError) as e:
            read_checkpoint(tmp_path / name)
        assert e.value.input_name == "checkpoint"


def test_round_trip_pt_wrapped_legacy_and_safetensors(tiny_files, inputs, tmp_path):
    official = read_checkpoint(tiny_files.checkpoint)
    assert any(k.startswith("blip.visual_encoder.") for k in official)
    med = read_med_config(tiny_files.med_config)
    want = _scores(official, med, inputs)

    as_pt = tmp_path / "ImageReward.pt"
    torch.save(official, as_pt)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": official, "epoch": 3}, wrapped)
    legacy = tmp_path / "legacy.pt"
    torch.save({"model": official}, legacy, _use_new_zipfile_serialization=False)  # cannot be mmapped
    ddp = tmp_path / "fine_tuned.pt"  # ImageReward's training script saves its DDP wrapper's keys
    torch.save({"state_dict": {"module." + k: v for k, v in official.items()}}, ddp)
    for path in (as_pt, wrapped, legacy, ddp):
        state = read_checkpoint(path)
        assert state.keys() == official.keys()
        assert all(torch.equal(state[k], official[k]) for k in official)

    converted = convert_to_safetensors(as_pt, tmp_path / "out" / "ImageReward.safetensors")
    with safe_open(str(converted), "pt") as f:
        assert f.metadata()["personalize.keys"] == "port"
        keys = set(f.keys())
    assert keys == set(official_to_port(official)) and all(k.split(".")[0] in ("vision", "text", "mlp") for k in keys)
    port = read_checkpoint(converted)
    assert torch.equal(_scores(port, med, inputs), want)
    assert official_to_port(port).keys() == port.keys()  # port keys pass through unchanged
    assert not list(converted.parent.glob("*.tmp"))


def test_conversion_refuses_a_broken_checkpoint(tiny_files, tmp_path):
    official = read_checkpoint(tiny_files.checkpoint)
    del official["blip.visual_encoder.blocks.1.mlp.fc2.bias"]
    src = tmp_path / "cut.safetensors"
    save_file(official, str(src))
    with pytest.raises(InputError, match="fc2.bias"):
        convert_to_safetensors(src, tmp_path / "cut-port.safetensors")
    assert not (tmp_path / "cut-port.safetensors").exists()


def test_find_reward_files_layout_and_missing_list(tmp_path):
    with pytest.raises(InputError) as e:
        find_reward_files(tmp_path, "ImageReward.pt")
    message = str(e.value)
    assert str(tmp_path / "ImageReward.pt") in message and str(tmp_path / "bert-base-uncased" / "vocab.txt") in message
    assert "THUDM/ImageReward" in message and "med_config.json is optional" in message

    files = write_tiny_reward_files(tmp_path / "models")
    found = find_reward_files(tmp_path / "models", files.checkpoint.name)
    assert found == files
    files.med_config.unlink()
    assert find_reward_files(tmp_path / "models", files.checkpoint.name).med_config is None
    with pytest.raises(InputError, match="outside"):
        find_reward_files(tmp_path / "models", "../models/" + "../" + files.checkpoint.name)
    with pytest.raises(InputError, match="vocab.txt") as e:
        files.vocab.unlink()
        find_reward_files(tmp_path / "models", files.checkpoint.name)
    assert e.value.input_name == "vocab"


@pytest.mark.parametrize("change", ["larger", "smaller", "pad moved"])
def test_a_vocab_that_does_not_fit_the_embedding_table_is_refused(tiny_files, tmp_path, change):
    lines = tiny_files.vocab.read_text().splitlines()
    if change == "larger":
        lines += [f"word{i}" for i in range(50)]
    elif change == "smaller":
        lines = lines[:-20]  # would load and silently score with the wrong ids if only "larger" were refused
    else:
        lines[0], lines[1] = lines[1], lines[0]
    other = tmp_path / "vocab.txt"
    other.write_text("\n".join(lines) + "\n")
    files = type(tiny_files)(checkpoint=tiny_files.checkpoint, med_config=tiny_files.med_config, vocab=other)
    with pytest.raises(InputError, match="bert-base-uncased vocab.txt") as e:
        load_scorer(files)
    assert e.value.input_name == "vocab"


def test_a_symlinked_checkpoint_is_accepted_and_its_folder_searched(tiny_files, tmp_path):
    models = tmp_path / "models" / "image_reward"
    (models / "shared").mkdir(parents=True)
    (models / "shared" / "ImageReward.safetensors").symlink_to(tiny_files.checkpoint)  # a shared model store
    (models / "bert-base-uncased").mkdir()
    (models / "bert-base-uncased" / "vocab.txt").write_text(tiny_files.vocab.read_text())
    found = find_reward_files(models, "shared/ImageReward.safetensors")
    assert found.checkpoint == models / "shared" / "ImageReward.safetensors"
    assert found.vocab == models / "bert-base-uncased" / "vocab.txt"  # not looked up beside the link's target
    assert found.med_config is None
