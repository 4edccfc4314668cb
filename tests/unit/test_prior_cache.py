"""The class-image cache: keys that follow the settings, weight fingerprints, atomic PNG round trips."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comfyui_personalize.training.errors import OutputFolderError
from comfyui_personalize.training.prior_cache import (
    SETTINGS_FILE,
    ClassImageCache,
    cache_key,
    slugify,
    tensor_fingerprint,
)

SETTINGS = {"model": "ab12", "prompt": "a photo of a dog", "negative_prompt": "", "steps": 30, "cfg": 7.0,
            "sampler_name": "euler", "scheduler": "normal", "seed": 0, "width": 512, "height": 512}
KEY = cache_key(SETTINGS)


def weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(8, 4, 3, 3, generator=g), "conv.bias": torch.randn(8, generator=g),
            "big.weight": torch.randn(300, 700, generator=g), "step": torch.tensor(3)}


def test_key_changes_with_prompt_settings_and_fingerprint():
    keys = {KEY}
    for name, value in [("prompt", "a photo of a cat"), ("negative_prompt", "blurry"), ("steps", 31),
                        ("cfg", 7.5), ("seed", 1), ("width", 576), ("sampler_name", "dpmpp_2m"),
                        ("model", "ab13")]:
        keys.add(cache_key({**SETTINGS, name: value}))
    assert len(keys) == 9
    assert len(KEY) == 64 and int(KEY, 16) >= 0


def test_key_is_stable_across_dict_order_and_processes():
    assert cache_key(dict(reversed(list(SETTINGS.items())))) == KEY
    # A fresh interpreter (another str-hash seed): the key must not depend on anything process-local.
    code = ("import json, sys, types; pkg = types.ModuleType('comfyui_personalize'); pkg.__path__ = [sys.argv[1]]; "
            "sys.modules['comfyui_personalize'] = pkg; "
            "from comfyui_personalize.training.prior_cache import cache_key; "
            "print(cache_key(json.loads(sys.argv[2])))")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code, str(root), json.dumps(SETTINGS)], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == KEY


def test_tensor_fingerprint_follows_any_whole_tensor_change():
    base = tensor_fingerprint(weights().items())
    assert tensor_fingerprint(weights().items()) == base  # same values, new tensors
    assert tensor_fingerprint(reversed(list(weights().items()))) == base  # order of iteration
    for name in ("conv.weight", "conv.bias", "big.weight"):
        changed = weights()
        changed[name] = changed[name] + 1e-3 * torch.randn_like(changed[name])  # e.g. a merged LoRA diff
        assert tensor_fingerprint(changed.items()) != base, name
    other = weights()
    other["step"] = torch.tensor(4)
    assert tensor_fingerprint(other.items()) != base
    renamed = weights()
    renamed["conv2.bias"] = renamed.pop("conv.bias")
    assert tensor_fingerprint(renamed.items()) != base
    half = {k: v.half() if v.is_floating_point() else v for k, v in weights().items()}
    assert tensor_fingerprint(half.items()) != base  # dtype is part of it
    bf16 = {k: v.bfloat16() for k, v in weights().items()}  # no numpy dtype: must still work
    assert tensor_fingerprint(bf16.items()) != tensor_fingerprint(half.items())
    assert tensor_fingerprint(weights(seed=1).items()) != base  # another checkpoint


def random_image(seed, h=24, w=32):
    return torch.rand(h, w, 3, generator=torch.Generator().manual_seed(seed))


def test_save_existing_load_round_trip(tmp_path):
    cache = ClassImageCache(tmp_path, KEY, label="A photo of a Dog!")
    assert cache.folder == tmp_path / f"a_photo_of_a_dog_{KEY[:16]}"
    assert cache.existing() == []
    images = [random_image(i) for i in range(3)]
    for i, image in enumerate(images):
        cache.save(i, image)
    assert [p.name for p in cache.existing()] == ["00000.png", "00001.png", "00002.png"]
    loaded = cache.load(2)
    assert len(loaded) == 2
    for original, back in zip(images, loaded):
        assert back.shape == (24, 32, 3) and back.dtype == torch.float32
        assert (back - original).abs().max() <= 0.5 / 255 + 1e-6  # PNG is 8 bit
    with pytest.raises(FileNotFoundError):
        cache.load(4)
    assert not [p for p in cache.folder.iterdir() if p.suffix == ".tmp"]  # atomic writes leave no temp files


def test_gaps_and_temp_files_are_ignored(tmp_path):
    cache = ClassImageCache(tmp_path, KEY)
    cache.save(0, random_image(0))
    cache.save(2, random_image(2))  # 00001 missing: 00002 is not part of the run
    (cache.folder / ".00001.png.abc123.tmp").write_bytes(b"half a png")  # a crashed write
    assert [p.name for p in cache.existing()] == ["00000.png"]
    cache.save(1, random_image(1))
    assert [p.name for p in cache.existing()] == ["00000.png", "00001.png", "00002.png"]


def test_failed_write_leaves_no_temp_and_keeps_the_old_file(tmp_path, monkeypatch):
    cache = ClassImageCache(tmp_path, KEY)
    cache.save(0, random_image(0))
    before = cache.path(0).read_bytes()

    def broken_save(self, *args, **kwargs):
        Path(args[0]).write_bytes(b"partial")
        raise OSError("disk full")

    from PIL import Image
    monkeypatch.setattr(Image.Image, "save", broken_save)
    # said clearly, and not as an input the Prior node does not have (it named "name" and "subfolder")
    with pytest.raises(OutputFolderError, match="disk full; make that folder writable"):
        cache.save(0, random_image(5))
    assert cache.path(0).read_bytes() == before
    assert sorted(p.name for p in cache.folder.iterdir()) == ["00000.png"]


def test_settings_json_records_the_key(tmp_path):
    cache = ClassImageCache(tmp_path, KEY)
    cache.write_settings(SETTINGS)
    assert cache.read_settings() == {"key": KEY, **SETTINGS}
    assert (cache.folder / SETTINGS_FILE).read_text().startswith("{\n")
    assert ClassImageCache(tmp_path, cache_key({**SETTINGS, "seed": 9})).read_settings() is None


def test_bad_images_and_keys_are_refused(tmp_path):
    with pytest.raises(ValueError):
        ClassImageCache(tmp_path, "../../etc")
    with pytest.raises(ValueError):
        ClassImageCache(tmp_path, KEY).save(0, torch.rand(3, 8, 8))
    assert slugify("../..//") == "class" and slugify("x" * 100) == "x" * 48
