"""GPU check: ``adafactor_fused`` (Adafactor stepped from backward hooks, on the autograd engine's device thread)
trains exactly like Adafactor stepped after backward, on the GPU, with gradient checkpointing and bf16 autocast
(the unit test checks the CPU; CI has no GPU).

Usage (on a CUDA machine): python bench/check_fused_backward.py
"""
import sys
import types
from pathlib import Path

import torch

pkg = types.ModuleType("comfyui_personalize")  # the repo root is the package (as in tests/conftest.py)
pkg.__path__ = [str(Path(__file__).resolve().parents[1])]
sys.modules["comfyui_personalize"] = pkg

from comfyui_personalize.headless.diffusers_adapter import DiffusersHost  # noqa: E402
from comfyui_personalize.headless.tiny import build_tiny_parts  # noqa: E402
from comfyui_personalize.training.batches import TrainingData  # noqa: E402
from comfyui_personalize.training.full_finetune import FullFineTune  # noqa: E402
from comfyui_personalize.training.trainer import TrainConfig, train  # noqa: E402


def run(optimizer: str) -> dict[str, torch.Tensor]:
    tiny = build_tiny_parts(seed=0)
    for m in (tiny.unet, tiny.text_encoder, tiny.vae):
        m.to("cuda")
    host = DiffusersHost(tiny.unet, tiny.text_encoder, tiny.tokenizer, tiny.vae, device="cuda")
    torch.manual_seed(0)
    data = TrainingData.single(host.encode_images(torch.rand(2, 64, 64, 3)), ["a photo of zwx dog"] * 2,
                               lambda caps, size: host.encode_text(caps)).cache_conditioning()
    copies = FullFineTune(tiny.unet, "cuda")
    cfg = TrainConfig(steps=6, learning_rate=1e-3, batch_size=2, seed=0, max_grad_norm=0.0, dtype="bf16",
                      gradient_checkpointing=True, optimizer=optimizer, lr_schedule="cosine")
    with copies.swapped_in():
        losses = train(host.task(), data, list(copies.parameters()), cfg)
    print(optimizer, "losses", [round(v, 4) for v in losses])
    return {n: w.detach().clone() for n, w in copies.named_weights()}


def main() -> None:
    plain, fused = run("adafactor"), run("adafactor_fused")
    worst = max((fused[n] - plain[n]).abs().max().item() for n in plain)
    print(f"{len(plain)} tensors, max weight difference fused vs adafactor {worst:.3g}",
          "OK" if worst < 1e-5 else "MISMATCH")


if __name__ == "__main__":
    main()
