"""GPU check: the CUDA-graph training step computes what the eager step computes (same seed, same losses and
adapter weights), on a small ComfyUI UNet. Exit code 1 on mismatch.

Usage: python bench/check_cuda_graph.py COMFYUI_DIR
"""
import sys

sys.argv = [sys.argv[0], sys.argv[1], "--peers", "", "--tiny", "--res", "64"]
import torch  # noqa: E402
import train_lora as tl  # noqa: E402  (builds ComfyUI models the way the benchmark does)

from comfyui_personalize.nodes.comfy_adapter import ComfyHost  # noqa: E402
from comfyui_personalize.training.batches import TrainingData  # noqa: E402
from comfyui_personalize.training.lora import LoRANetwork  # noqa: E402
from comfyui_personalize.training.task import Conditioning  # noqa: E402
from comfyui_personalize.training.trainer import TrainConfig, train  # noqa: E402

host = ComfyHost(tl.comfy_model(), None, None)
host.load_for_training(False)
dev = host.model.load_device
g = torch.Generator().manual_seed(0)
latents = torch.randn(4, 4, tl.LAT, tl.LAT, generator=g)
cond = Conditioning(torch.randn(4, 77, 768, generator=g))
import logging  # noqa: E402

warnings = []
logging.getLogger("comfyui_personalize.training.cuda_graph").addHandler(
    type("Keep", (logging.Handler,), {"emit": lambda self, r: warnings.append(r.getMessage())})())
failed = False
for dtype in ("auto", "bf16"):  # fp16 weights: fp16 with loss scaling, and bf16 autocast
    results = {}
    for graphed in (False, True):
        net = LoRANetwork(host.unet_lora_targets("attention"), 4, 4, seed=0).to(dev)
        with net.attached():
            losses = train(host.task(), TrainingData.encoded(latents, cond), list(net.parameters()),
                           TrainConfig(steps=12, learning_rate=1e-3, batch_size=2, cuda_graph=graphed,
                                       report_every=4, dtype=dtype))
        results[graphed] = (losses, {k: v.detach().clone() for k, v in net.state_dict().items()})
    (le, we), (lg, wg) = results[False], results[True]
    worst = max((we[k] - wg[k]).abs().max().item() for k in we)
    ok = all(abs(a - b) <= 1e-3 * max(1.0, abs(a)) for a, b in zip(le, lg)) and worst < 1e-3
    if torch.cuda.is_available() and warnings:  # the graph run silently fell back to eager steps
        print("capture failed:", warnings)
        ok = False
    print(dtype, "eager", [round(v, 5) for v in le])
    print(dtype, "graph", [round(v, 5) for v in lg])
    print(dtype, "max adapter difference", worst, "OK" if ok else "MISMATCH")
    failed |= not ok
sys.exit(1 if failed else 0)
