"""Profile our LoRA training step on the SD1.5-shaped ComfyUI UNet: where does a step's time go?

Usage: python bench/profile_step.py COMFYUI_DIR [--batch 1] [--steps 6]
"""
import argparse
import contextlib
import sys

ap = argparse.ArgumentParser()
ap.add_argument("comfyui")
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--steps", type=int, default=6)
ap.add_argument("--out", default=None)
ap.add_argument("--eager", action="store_true", help="no CUDA graph, so the profiler sees each kernel")
ap.add_argument("--dtype", default="auto")
ap.add_argument("--nchw", action="store_true", help="keep the UNet NCHW (the node runs NHWC on CUDA)")
a = ap.parse_args()
sys.argv = [sys.argv[0], a.comfyui, "--batches", str(a.batch), "--peers", "", "--steps", "2"]
import torch  # noqa: E402
import train_lora as tl  # noqa: E402  (builds the same model the benchmark uses)
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from comfyui_personalize.nodes.comfy_adapter import ComfyHost  # noqa: E402
from comfyui_personalize.training.batches import TrainingData  # noqa: E402
from comfyui_personalize.training.lora import LoRANetwork  # noqa: E402
from comfyui_personalize.training.task import Conditioning  # noqa: E402
from comfyui_personalize.training.trainer import TrainConfig, train  # noqa: E402

host = ComfyHost(tl.comfy_model(), None, None)
host.load_for_training(False)
dev = host.model.load_device
latents = torch.randn(8, 4, tl.LAT, tl.LAT)
cond = Conditioning(torch.randn(8, 77, 768, device=dev))
net = LoRANetwork(host.unet_lora_targets("attention"), 8, 8).to(dev)
cfg = TrainConfig(steps=a.steps, learning_rate=1e-4, batch_size=a.batch, report_every=a.steps,
                  cuda_graph=not a.eager, dtype=a.dtype)
layout = host.channels_last() if torch.cuda.is_available() and not a.nchw else contextlib.nullcontext()
with net.attached(), layout:
    train(host.task(), TrainingData.encoded(latents, cond), list(net.parameters()), cfg)  # warm-up
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        train(host.task(), TrainingData.encoded(latents, cond), list(net.parameters()), cfg)
table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30)
print(table)
by_device = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
print(prof.key_averages().table(sort_by=by_device, row_limit=15))
if a.out:
    prof.export_chrome_trace(a.out)
