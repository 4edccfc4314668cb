"""Writing result files: names that cannot escape their folder, atomic writes, kohya/modelspec metadata."""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import InputError, OutputFolderError
from .optimizers import METADATA_NAMES

IF_EXISTS = ("increment", "overwrite", "error")
# kohya's keys for an embedding bundled in a LoRA file (bundle_emb.<token>.<encoder>): not LoRA weights
BUNDLED_EMBEDDING = "bundle_emb."
_BAD_NAME = re.compile(r'[<>:"|?*\x00-\x1f]')

# kohya's ss_base_model_version and SAI modelspec architecture names per base model family.
BASE_MODELS = {
    "sd1": ("sd_v1", "stable-diffusion-v1"),
    "sd2": ("sd_v2", "stable-diffusion-v2-512"),
    "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base"),
}


def architecture(base_model: str, prediction: str) -> str:
    """The SAI modelspec architecture: SD2 names its v-prediction (768-v) and eps (512, base) models apart."""
    arch = BASE_MODELS.get(base_model, (base_model, base_model))[1]
    return "stable-diffusion-v2-768-v" if base_model == "sd2" and prediction == "v" else arch


def base_model_metadata(base_model: str, prediction: str, kind: str = "lora") -> dict[str, str]:
    """What A1111/Forge and kohya's tools read to tell the base model of a network file: without it A1111 files
    any file with metadata under SD1 and hides it while an SDXL or SD2 model is loaded. kohya appends "_v" to
    SD1/SD2 versions trained with v-parameterization."""
    version = BASE_MODELS.get(base_model, (base_model, base_model))[0]
    if base_model in ("sd1", "sd2") and prediction == "v":
        version += "_v"
    return {
        "ss_base_model_version": version,
        "ss_v2": str(base_model == "sd2"),
        "ss_v_parameterization": str(prediction == "v"),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture(base_model, prediction)}/{kind}",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
    }


def tag_frequency(captions: Sequence[str], dataset_name: str = "instance") -> dict[str, str]:
    """kohya's ``ss_tag_frequency`` (comma-separated tags counted over the images' captions, under the dataset's
    name) and ``ss_dataset_dirs``: A1111's metadata view lists a network's training tags from them."""
    counts = Counter(tag.strip() for caption in captions for tag in caption.split(",") if tag.strip())
    return {"ss_tag_frequency": json.dumps({dataset_name: dict(counts)}),
            "ss_dataset_dirs": json.dumps({dataset_name: {"n_repeats": 1, "img_count": len(captions)}})}


# File systems allow 255 bytes a name; room is left for "_00001", the extension and the temporary file's suffix
MAX_NAME_BYTES = 180


def _check_part(input_name: str, part: str) -> None:
    if part in ("", ".", "..") or _BAD_NAME.search(part) or part != part.strip():
        raise InputError(input_name, f"{part!r} is not a usable file or folder name")
    if len(part.encode("utf-8")) > MAX_NAME_BYTES:
        raise InputError(input_name, f"{part[:40]!r}... is {len(part.encode('utf-8'))} bytes long; keep a name to "
                                     f"{MAX_NAME_BYTES}")


def resolve_output_path(folder: str | os.PathLike, subfolder: str, name: str, extension: str,
                        if_exists: str = "increment") -> Path:
    """``folder/subfolder/name.extension``, refusing anything that would land outside ``folder``.

    ``if_exists``: "increment" picks ``name_00001`` etc., "overwrite" replaces, "error" refuses.
    """
    if if_exists not in IF_EXISTS:
        raise InputError("if_exists", f"must be one of {IF_EXISTS}, got {if_exists!r}")
    name = name.strip()
    if name.lower().endswith(extension):
        name = name[: -len(extension)]
    if "/" in name or "\\" in name:
        raise InputError("name", "must be a plain file name; put folders in 'subfolder'")
    _check_part("name", name)
    parts = [p for p in re.split(r"[/\\]", subfolder.strip()) if p]
    for p in parts:
        _check_part("subfolder", p)
    # Every part was checked to be a plain name (no "..", no drive or root), so the path stays inside ``folder`` by
    # construction. It is not resolved: a subfolder the user linked to another disk is where they want files.
    root = Path(folder).resolve()
    target_dir = root.joinpath(*parts)
    path = target_dir / f"{name}{extension}"
    if path.exists():
        if if_exists == "error":
            raise InputError("name", f"{path} exists; choose another name or set if_exists")
        if if_exists == "increment":
            n = 1
            while (target_dir / f"{name}_{n:05d}{extension}").exists():
                n += 1
            path = target_dir / f"{name}_{n:05d}{extension}"
    return path


def write_atomic(path: Path, write: Callable[[str], None], inputs: tuple[str, str] | None = ("subfolder", "name")
                 ) -> Path:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it into place: no half-written file
    survives a crash, a full disk or a cancel. A failure names ``inputs`` (the folder's and the file's), or, for a
    file no input names (None), says which folder must be writable."""
    path = Path(path)

    def failed(which: int, message: str) -> Exception:  # which: 0 the folder, 1 the file
        if inputs is None:
            return OutputFolderError(f"{message}; make that folder writable, with free space")
        return InputError(inputs[which], message + (" (disk full or read-only?)" if which else ""))

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise failed(0, f"cannot write in {path.parent}: {e.strerror or e}") from e
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it normal file permissions
        os.replace(tmp, path)
    except OSError as e:
        raise failed(1, f"could not write {path}: {e.strerror or e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_safetensors(path: str, input_name: str, what: str) -> dict[str, torch.Tensor]:
    """A .safetensors file the user picked, or an error naming the input (a truncated or foreign file raised
    safetensors' own header error)."""
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise InputError(input_name, f"cannot read {Path(path).name} as {what} ({e}); pick a .safetensors file "
                                     "this pack (or kohya) saved") from e


def save_safetensors_atomic(tensors: Mapping[str, torch.Tensor], path: Path,
                            metadata: Mapping[str, str] | None = None,
                            inputs: tuple[str, str] | None = ("subfolder", "name")) -> Path:
    return write_atomic(path, lambda tmp: save_file(dict(tensors), tmp, metadata=dict(metadata) if metadata else None),
                        inputs)


def lora_metadata(*, base_model: str, rank: int, alpha: float, learning_rate: float, steps: int,
                  batch_size: int, resolution: tuple[int, int], num_images: int, seed: int, title: str,
                  text_encoder_trained: bool, prediction: str, targets: str, lr_scheduler: str = "constant",
                  optimizer: str = "adamw",
                  num_reg_images: int = 0, captions: Sequence[str] = (),
                  extra: Mapping[str, object] = ()) -> dict[str, str]:
    """The ``ss_*`` keys kohya writes and the SAI ``modelspec.*`` keys, as strings (safetensors metadata).
    ``captions``: one per training image, for the tag frequency."""
    now = time.time()
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_network_args": json.dumps({"targets": targets}),
        "ss_learning_rate": str(learning_rate),
        "ss_unet_lr": str(learning_rate),
        "ss_text_encoder_lr": str(learning_rate if text_encoder_trained else 0.0),
        "ss_network_train_unet_only": str(not text_encoder_trained),
        "ss_max_train_steps": str(steps),
        "ss_steps": str(steps),
        "ss_batch_size_per_device": str(batch_size),
        "ss_optimizer": METADATA_NAMES.get(optimizer, optimizer),
        "ss_lr_scheduler": lr_scheduler,
        "ss_resolution": str(tuple(resolution)),
        "ss_num_train_images": str(num_images),
        "ss_num_reg_images": str(num_reg_images),
        "ss_seed": str(seed),
        "ss_training_finished_at": str(now),
        "ss_session_id": str(uuid.uuid4().int % 2**31),
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution[1]}x{resolution[0]}",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)),
        "personalize.trainer": "ComfyUI-Personalize",
        **base_model_metadata(base_model, prediction),
        **tag_frequency(captions),
    }
    for k, v in dict(extra).items():
        meta[f"personalize.{k}"] = v if isinstance(v, str) else json.dumps(v)
    return meta
