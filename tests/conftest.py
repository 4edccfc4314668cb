"""Test tiers: unit (default, no ComfyUI), host (real ComfyUI modules), server (a real ComfyUI process).

The repo root is the pack's Python package (ComfyUI imports it by folder name). Here it is registered as
``comfyui_personalize`` without running its ``__init__`` (which needs ComfyUI), so the host-agnostic core can
be imported on its own.
"""
import os
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACK = "comfyui_personalize"
COMFYUI_PATH = Path(os.environ.get("COMFYUI_PATH", "/opt/comfyui-host"))

if PACK not in sys.modules:
    _pkg = types.ModuleType(PACK)
    _pkg.__path__ = [str(ROOT)]
    sys.modules[PACK] = _pkg


def pytest_collection_modifyitems(config, items):
    if (COMFYUI_PATH / "comfy").is_dir():
        return
    skip = pytest.mark.skip(reason=f"no ComfyUI host at {COMFYUI_PATH} (set COMFYUI_PATH to run host/server tiers)")
    for item in items:
        if item.get_closest_marker("host") or item.get_closest_marker("server"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny():
    from comfyui_personalize.headless.tiny import build_tiny_parts

    return build_tiny_parts(seed=0)


@pytest.fixture()
def host(tiny):
    from comfyui_personalize.headless.diffusers_adapter import DiffusersHost

    return DiffusersHost(tiny.unet, tiny.text_encoder, tiny.tokenizer, tiny.vae)
