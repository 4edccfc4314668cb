"""Running shared example workflows on a test host: swap in the tiny checkpoint and a subject picture, and
read ComfyUI's error messages back out of a history entry. Used by the demo and the server tests."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def use_tiny_inputs(prompt: dict, checkpoint_name: str, input_dir: Path,
                    write_image: Callable[[Path], None], reward_checkpoint: str | None = None) -> dict:
    """Point checkpoint loaders at ``checkpoint_name`` (and Load ImageReward at ``reward_checkpoint`` when
    given); give each Load Image node a picture if it has none."""
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = checkpoint_name
        elif node["class_type"] == "PersonalizeLoadImageReward" and reward_checkpoint:
            inputs["checkpoint"] = reward_checkpoint
        elif node["class_type"] == "LoadImage" and not (Path(input_dir) / inputs["image"]).exists():
            write_image(Path(input_dir) / inputs["image"])
    return prompt


def execution_errors(entry: dict) -> str:
    """ComfyUI's execution_error messages (node, exception, traceback) from a /history entry."""
    lines = []
    for event, data in (entry.get("status") or {}).get("messages", []):
        if event in ("execution_error", "execution_interrupted"):
            lines.append(f"{event} in node {data.get('node_id')} ({data.get('node_type')}): "
                         f"{data.get('exception_type')}: {data.get('exception_message')}")
            lines += [line.rstrip() for line in data.get("traceback") or []]
    return "\n".join(lines) or json.dumps(entry.get("status"))
