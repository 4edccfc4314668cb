"""Start-up shared by the benchmarks: this folder importable as the ``comfyui_personalize`` package (its
``__init__.py`` registers nodes and needs a running ComfyUI), ComfyUI on ``sys.path`` and its arguments parsed
(``--cpu`` without CUDA), before anything imports ComfyUI."""
from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def start_comfyui(comfyui_dir: str) -> str:
    """Returns the device kind, "cuda" or "cpu"."""
    pkg = types.ModuleType("comfyui_personalize")
    pkg.__path__ = [str(ROOT)]
    sys.modules["comfyui_personalize"] = pkg
    sys.path.insert(0, os.path.abspath(comfyui_dir))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sys.argv = [sys.argv[0]] + ([] if dev == "cuda" else ["--cpu"])
    import comfy.options

    comfy.options.enable_args_parsing()
    return dev
