"""Where the ImageReward files live (nothing is downloaded) and the error that says where to put them."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..training.errors import InputError

MED_CONFIG_NAME = "med_config.json"
VOCAB_PLACES = ("bert-base-uncased/vocab.txt", "vocab.txt")
CHECKPOINT_HINT = "ImageReward.pt (1.79 GB, from the Hugging Face repo THUDM/ImageReward) or its safetensors conversion"
VOCAB_HINT = "vocab.txt of bert-base-uncased (30522 lines, from the Hugging Face repo google-bert/bert-base-uncased)"


@dataclass(frozen=True)
class RewardFiles:
    checkpoint: Path
    med_config: Path | None  # None: the built-in official config
    vocab: Path


def _inside(root: Path, name: str) -> Path:
    """``root/name`` normalised but NOT resolved (a symlinked model file is the user's choice and stays
    allowed); a name that climbs out of ``root`` with ``..`` or an absolute path is refused (names come from
    users)."""
    path = Path(os.path.normpath(os.path.join(root, name)))
    if path != root and root not in path.parents:
        raise InputError("checkpoint", f"{name!r} points outside {root}; pick a file inside that folder")
    return path


def checkpoint_path(folder: Path, checkpoint_name: str) -> Path:
    """``folder/<checkpoint_name>``, which must exist; the error says where to put it."""
    root = Path(os.path.abspath(folder))
    checkpoint = _inside(root, checkpoint_name)
    if not checkpoint.is_file():
        raise InputError("checkpoint", "the ImageReward checkpoint is missing; nothing is downloaded, place it "
                                       f"here:\n  {checkpoint}  <- {CHECKPOINT_HINT}")
    return checkpoint


def find_reward_files(folder: Path, checkpoint_name: str) -> RewardFiles:
    """The checkpoint ``folder/<checkpoint_name>``, ``med_config.json`` (optional) and the BERT ``vocab.txt``.

    The med config and vocab are looked for beside the checkpoint first (a checkpoint in a subfolder may carry
    its own), then in ``folder``. All missing files are listed in one error, with where each goes."""
    root = Path(os.path.abspath(folder))
    checkpoint = _inside(root, checkpoint_name)
    places = list(dict.fromkeys([checkpoint.parent, root]))

    def first(names: tuple[str, ...]) -> Path | None:
        for place in places:
            for name in names:
                if (place / name).is_file():
                    return place / name
        return None

    med_config = first((MED_CONFIG_NAME,))
    vocab = first(VOCAB_PLACES)
    missing = []
    if not checkpoint.is_file():
        missing.append(f"  {checkpoint}  <- {CHECKPOINT_HINT}")
    if vocab is None:
        missing.append(f"  {root / VOCAB_PLACES[0]}  <- {VOCAB_HINT} (or {root / VOCAB_PLACES[1]})")
    if missing:
        raise InputError(
            "checkpoint" if not checkpoint.is_file() else "vocab",
            "ImageReward files are missing; nothing is downloaded, place them here:\n" + "\n".join(missing)
            + f"\n  ({root / MED_CONFIG_NAME} is optional: the official med_config.json, built in if absent)",
        )
    return RewardFiles(checkpoint=checkpoint, med_config=med_config, vocab=vocab)
