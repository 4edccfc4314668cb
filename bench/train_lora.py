"""LoRA training speed and memory: our Train LoRA core path vs ComfyUI's native TrainLoraNode vs a
diffusers+peft loop, in one process, on an SD1.5-shaped UNet with random weights (speed and memory do not
depend on the weights). Prints one JSON line per measurement and a markdown table at the end.

Usage: python bench/train_lora.py COMFYUI_DIR [--batches 1,4,8] [--steps 30] [--res 512] [--tiny]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
from comfy_env import start_comfyui

ap = argparse.ArgumentParser()
ap.add_argument("comfyui")
ap.add_argument("--batches", default="1,4,8")
ap.add_argument("--steps", type=int, default=30)
ap.add_argument("--res", type=int, default=512)
ap.add_argument("--peers", default="ours,ours_gc,comfy_native,diffusers_peft")
ap.add_argument("--tiny", action="store_true", help="toy sizes, for a CPU smoke run of the same code")
ap.add_argument("--out", default=None, help="also write the table here")
args = ap.parse_args()

dev = start_comfyui(args.comfyui)
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.supported_models  # noqa: E402
import shapes  # noqa: E402  (bench/, next to this file)

from comfyui_personalize.headless.tiny import randomise_weights  # noqa: E402

LAT = args.res // 8
RANK = 8
SD15 = shapes.sd15(args.tiny)
rows: list[dict] = []


def emit(**kw):
    kw["device"] = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    rows.append(kw)
    print(json.dumps(kw), flush=True)


def sync():
    if dev == "cuda":
        torch.cuda.synchronize()


def reset_peak():
    mm.soft_empty_cache()
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib():
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else None



def comfy_model():
    """An SD1.5 ModelPatcher as CheckpointLoader makes one: fp16 weights on CUDA."""
    mc = comfy.supported_models.SD15(dict(SD15))
    mc.unet_config.update(SD15)
    if dev == "cuda":
        mc.set_inference_dtype(torch.float16, None)
    model = mc.get_model({}, "model.diffusion_model.")
    randomise_weights(model)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def timed(fn, steps):
    """Seconds per step from two runs (2 and 2+steps steps): setup costs cancel out."""
    fn(2)  # warm-up: kernel selection, allocator growth, lazy init
    out = {}
    for n in (2, steps + 2):
        reset_peak()
        sync()
        t0 = time.perf_counter()
        fn(n)
        sync()
        out[n] = time.perf_counter() - t0
    return (out[steps + 2] - out[2]) / steps


def ours(batch, checkpointing=False, channels_last=True):
    """What Personalize Train LoRA does on CUDA (channels-last UNet, CUDA-graphed step)."""
    from comfyui_personalize.nodes.comfy_adapter import ComfyHost
    from comfyui_personalize.training.batches import TrainingData
    from comfyui_personalize.training.lora import LoRANetwork
    from comfyui_personalize.training.task import Conditioning
    from comfyui_personalize.training.trainer import TrainConfig, train

    host = ComfyHost(comfy_model(), None, None)
    host.load_for_training(False)
    n = max(8, batch)
    latents = torch.randn(n, 4, LAT, LAT)
    cond = Conditioning(torch.randn(n, 77, 768, device=host.model.load_device))
    net = LoRANetwork(host.unet_lora_targets("attention"), RANK, RANK).to(host.model.load_device)

    def run(steps):
        with net.attached(), (host.channels_last() if channels_last else contextlib.nullcontext()):
            train(host.task(), TrainingData.encoded(latents, cond), list(net.parameters()),
                  TrainConfig(steps=steps, learning_rate=1e-4, batch_size=batch, report_every=steps,
                              gradient_checkpointing=checkpointing))

    dt = timed(run, args.steps)
    name = "ours" + ("_gc" if checkpointing else "") + ("" if channels_last else "_nchw")
    emit(peer=name, batch=batch, res=args.res, rank=RANK,
         targets="attention q,k,v,out", dtype=str(host.compute_dtype), s_per_step=round(dt, 4),
         img_per_s=round(batch / dt, 2), peak_gib=peak_gib())
    host = net = None  # free before the next peer
    mm.unload_all_models()


def comfy_native(batch):
    import comfy_extras.nodes_train as nt

    mp = comfy_model()
    latents = {"samples": torch.randn(max(8, batch), 4, LAT, LAT)}
    positive = [[torch.randn(1, 77, 768), {}]]
    node = nt.TrainLoraNode()
    dt = timed(lambda steps: node.train(mp, latents, positive, batch, steps, 1, 1e-4, RANK, "AdamW", "MSE", 0,
                                        "bf16", "bf16", "LoRA", False, "[None]"), args.steps)
    emit(peer="comfy_native", batch=batch, res=args.res, rank=RANK, targets="every weight (ComfyUI default)",
         s_per_step=round(dt, 4), img_per_s=round(batch / dt, 2), peak_gib=peak_gib())

    mm.unload_all_models()


def diffusers_peft(batch):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    kw = dict(sample_size=LAT, cross_attention_dim=768, attention_head_dim=8)
    if args.tiny:
        kw.update(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=2,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    unet = UNet2DConditionModel(**kw)
    randomise_weights(unet)
    unet.requires_grad_(False).to(dev, dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    x, c = torch.randn(batch, 4, LAT, LAT, device=dev), torch.randn(batch, 77, 768, device=dev)

    def run(steps):
        for _ in range(steps):
            t = torch.randint(0, 1000, (batch,), device=dev)
            noise = torch.randn_like(x)
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
                pred = unet(x + noise, t, c).sample
            torch.nn.functional.mse_loss(pred.float(), noise).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    dt = timed(run, args.steps)
    emit(peer="diffusers_peft", batch=batch, res=args.res, rank=RANK, targets="attention q,k,v,out",
         s_per_step=round(dt, 4), img_per_s=round(batch / dt, 2), peak_gib=peak_gib())



PEERS = {"ours": ours, "ours_gc": lambda b: ours(b, checkpointing=True),
         "ours_nchw": lambda b: ours(b, channels_last=False), "comfy_native": comfy_native,
         "diffusers_peft": diffusers_peft}
for b in [int(v) for v in args.batches.split(",")]:
    for name in filter(None, args.peers.split(",")):
        try:
            PEERS[name](b)
        except Exception as e:  # a peer failing is a finding, not a crash
            import traceback

            traceback.print_exc()
            emit(peer=name, batch=b, error=repr(e)[:300])
        mm.unload_all_models()
        mm.soft_empty_cache()

lines = ["| batch | peer | img/s | s/step | peak GiB |", "|---|---|---|---|---|"]
for r in rows:
    lines.append(f"| {r.get('batch')} | {r.get('peer')} | {r.get('img_per_s', 'error')} | {r.get('s_per_step', '')} | "
                 f"{r.get('peak_gib', '')} |")
table = "\n".join(lines)
print(table)
if args.out:
    Path(args.out).write_text(table + "\n\n" + "\n".join(json.dumps(r) for r in rows) + "\n")
