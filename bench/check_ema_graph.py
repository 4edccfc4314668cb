"""GPU check: the EMA with its warm-up, replayed inside the trainer's CUDA graph, returns the EMA of the raw weights
recorded after every step (the unit test checks the eager path on the CPU; CI has no GPU).

Usage (on a CUDA machine): python bench/check_ema_graph.py
"""
import sys
import types
from pathlib import Path

import torch

pkg = types.ModuleType("comfyui_personalize")  # the repo root is the package (as in tests/conftest.py)
pkg.__path__ = [str(Path(__file__).resolve().parents[1])]
sys.modules["comfyui_personalize"] = pkg

from comfyui_personalize.training import cuda_graph  # noqa: E402
from comfyui_personalize.training.batches import TrainingData  # noqa: E402
from comfyui_personalize.training.schedule import NoiseSchedule  # noqa: E402
from comfyui_personalize.training.task import Conditioning, DiffusionTask  # noqa: E402
from comfyui_personalize.training.trainer import TrainConfig, train  # noqa: E402

DECAY = 0.999


def main() -> None:
    dev = torch.device("cuda", 0)
    torch.manual_seed(0)
    net = torch.nn.Conv2d(4, 4, 3, padding=1).to(dev)
    params = list(net.parameters())
    task = DiffusionTask(lambda x, t, c: net(x), NoiseSchedule(torch.linspace(0.999, 0.01, 1000)), dev)
    data = TrainingData.encoded(torch.randn(2, 4, 8, 8, device=dev),
                                Conditioning(torch.zeros(2, 77, 8, device=dev)))
    expected = [p.detach().clone() for p in params]

    def progress(step, _losses):  # the EMA as it should be, from the raw weights after this step
        torch.cuda.synchronize()
        follow = 1 - min(DECAY, step / (9 + step))  # (1 + t) / (10 + t) with t = step - 1
        for e, p in zip(expected, params):
            e.lerp_(p.detach(), follow)

    captured = []
    capture = cuda_graph.capture
    cuda_graph.capture = lambda *a, **k: captured.append(1) or capture(*a, **k)
    train(task, data, params, TrainConfig(steps=40, learning_rate=1e-2, batch_size=2, seed=0, ema_decay=DECAY,
                                          max_grad_norm=0), progress)
    err = max((p.detach() - e).abs().max().item() for p, e in zip(params, expected))
    print(f"graph captured: {bool(captured)}; max |returned - expected EMA| = {err:.2e}")
    assert captured and err < 1e-5
    print("ok")


if __name__ == "__main__":
    main()
