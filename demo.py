"""Train a LoRA end to end on a tiny model, on the CPU, without ComfyUI or downloads: ``python demo.py``.

``python demo.py --help`` lists the options; results land in ./demo_output.
"""
import logging
import sys
import types
from pathlib import Path

PACK = "comfyui_personalize"


def register_package() -> None:
    """Make this folder importable as ``comfyui_personalize`` without running its ``__init__.py``, which
    registers the ComfyUI nodes and so needs ComfyUI (tests/conftest.py does the same)."""
    if PACK not in sys.modules:
        package = types.ModuleType(PACK)
        package.__path__ = [str(Path(__file__).resolve().parent)]
        sys.modules[PACK] = package


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    register_package()
    from comfyui_personalize.headless.demo import main

    raise SystemExit(main())
