"""One-image personalisation, end to end: Personalize Fast Tune's node (25 steps at lr 2e-3, rank 4 attention LoRA
+ one new word, both regularisers on, flips) on full-size SD1.5 (512 px) and SDXL (1024 px) ComfyUI models with
random weights (speed and memory do not depend on the weights), then the Dual-Path blend's first image.

What a user waits for, so every row is the node's whole wall time from its inputs (ComfyUI's MODEL/CLIP/VAE as
CheckpointLoader makes them, one IMAGE): moving the models to the GPU, VAE-encoding the image, encoding the
captions, the trainer's eager warm-up and CUDA-graph capture, the steps, and building the returned MODEL. "cold" is
the first call in the process (cuDNN/cuBLAS selection included), "warm" a second call with another seed. Then one
20-step euler KSampler image through the Dual-Path Attention Blend (a = 0.7, self+cross) on the result, next to
the plain model's.

With --a-blend below 1 the node tunes through the Dual-Path blend (DATE's way), and the image is sampled at that a.
With --init-word listing several words the node first ranks them on the image (its cost is the difference).

Usage: python bench/fast_tune.py --comfyui COMFYUI_DIR [--models sd15,sdxl] [--steps 25] [--a-blend 1]
       [--init-word "person, dog, cat"] [--tiny]
       [--out FILE.md]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import torch
from comfy_env import start_comfyui

ap = argparse.ArgumentParser()
ap.add_argument("--comfyui", required=True, help="ComfyUI source folder")
ap.add_argument("--models", default="sd15,sdxl")
ap.add_argument("--steps", type=int, default=25, help="fast-tune steps (the node's default)")
ap.add_argument("--a-blend", type=float, default=1.0, help="the node's a_blend (below 1: tuned through the blend)")
ap.add_argument("--init-word", default="person",
                help="the node's init_word; several comma-separated: the images pick one before training")
ap.add_argument("--tiny", action="store_true", help="toy sizes, for a CPU smoke run of the same code")
ap.add_argument("--out", default=None, help="also write the table and the JSON lines here")
args = ap.parse_args()

logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
log = logging.getLogger("fast_tune_bench")
log.setLevel(logging.INFO)
dev = start_comfyui(args.comfyui)
import comfy.model_management as mm  # noqa: E402
import comfy.supported_models  # noqa: E402
import shapes  # noqa: E402  (bench/, next to this file)
from comfy_api.latest import io  # noqa: E402
from comfy_models import comfy_clip, comfy_model, comfy_vae  # noqa: E402
from report import write_results  # noqa: E402

import nodes as comfy_nodes  # noqa: E402  (ComfyUI's nodes.py, first on sys.path)
from comfyui_personalize.nodes.dual_path import PersonalizeDualPathBlend  # noqa: E402
from comfyui_personalize.nodes.fast_tune import PersonalizeFastTune  # noqa: E402
from comfyui_personalize.training.data import expand_captions, prepare_images  # noqa: E402
from comfyui_personalize.training.datasets import InstanceDataset  # noqa: E402

MODELS = {"sd15": (comfy.supported_models.SD15, shapes.sd15(args.tiny), 64 if args.tiny else 512),
          "sdxl": (comfy.supported_models.SDXL, shapes.sdxl(args.tiny), 128 if args.tiny else 1024)}
rows: list[dict] = []


def sync() -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def run_node(node_cls, **kwargs):
    """As ComfyUI's executor runs a V3 node: a class clone with the hidden inputs, in inference mode."""
    cls = node_cls.PREPARE_CLASS_CLONE({io.Hidden.unique_id: "1"})
    with torch.inference_mode():
        return cls.execute(**kwargs).result


def one_image(px: int) -> InstanceDataset:
    with torch.inference_mode():
        image = torch.rand(1, px, px, 3, generator=torch.Generator().manual_seed(0))
    parts = tuple(t.clone() for t in prepare_images(image))
    return InstanceDataset(parts, tuple(expand_captions("a photo of zwx person", 1)), resolution=px, flip=0.5)


def fast_tune(model, clip, vae, data, seed: int):
    return run_node(PersonalizeFastTune, model=model, clip=clip, vae=vae, dataset=data, steps=args.steps,
                    learning_rate=2e-3, batch_size=1, seed=seed, dtype="auto", gradient_checkpointing=False,
                    token="zwx", init_word=args.init_word, num_vectors=1, rank=4, alpha=4.0, targets="attention",
                    nn_weight=0.01, l2_weight=0.01, a_blend=args.a_blend)


def sample_seconds(model, clip, text: str, px: int) -> float:
    """One 20-step euler image (cfg 5), timed on the second of two runs (the first selects kernels)."""
    positive = comfy_nodes.CLIPTextEncode().encode(clip, text)[0]
    negative = comfy_nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    latent = {"samples": torch.zeros(1, 4, px // 8, px // 8)}
    took = []
    for _ in range(2):
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            comfy_nodes.common_ksampler(model, 0, 20, 5.0, "euler", "normal", positive, negative, latent)
        sync()
        took.append(time.perf_counter() - t0)
    return took[-1]


def dual_path_seconds(base_model, tuned, px: int) -> tuple[float, float]:
    """(blend image s, plain image s): the blend of the base model and the tuned LoRA and word, the hard prompt
    computed from the tuned CLIP, as the fast_tune_one_image example wires it; and the base model alone."""
    clip, lora, text = tuned[1], tuned[2], "a photo of embedding:zwx person"
    a = args.a_blend if args.a_blend < 1.0 else 0.7
    blended = run_node(PersonalizeDualPathBlend, model=base_model, lora_name="none", a_blend=a, paths="self+cross",
                       start_percent=0.0, end_percent=1.0, lora=lora, clip=clip, soft_text=text)[0]
    return sample_seconds(blended, clip, text, px), sample_seconds(base_model, clip, "a photo of a person", px)


for name in filter(None, args.models.split(",")):
    config_class, unet, px = MODELS[name]
    model, clip = comfy_model(config_class, unet, dev), comfy_clip(config_class, unet, args.tiny)
    vae = comfy_vae(args.tiny)
    data = one_image(px)
    for run, seed in (("cold", 0), ("warm", 1)):
        mm.unload_all_models()
        mm.soft_empty_cache()
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        tuned = fast_tune(model, clip, vae, data, seed)
        sync()
        row = dict(model=name, px=px, run=run, steps=args.steps, a_blend=args.a_blend, init_word=args.init_word,
                   node_s=round(time.perf_counter() - t0, 2),
                   final_loss=round(float(tuned[4]["loss"][-1]), 4),
                   peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else None,
                   device=torch.cuda.get_device_name() if dev == "cuda" else "cpu")
        if run == "warm":
            blend, plain = dual_path_seconds(model, tuned, px)
            row.update(dual_path_20_steps_s=round(blend, 2), plain_20_steps_s=round(plain, 2))
        rows.append(row)
        log.info(json.dumps(row))
    del model, clip, vae, tuned
    mm.unload_all_models()
    mm.soft_empty_cache()

lines = [f"Personalize Fast Tune node, {args.steps} steps, one {'/'.join(str(r['px']) for r in rows[::2])} px image, "
         f"rank 4 attention LoRA + 1 vector, dtype auto, a_blend {args.a_blend}, init_word {args.init_word!r}; node "
         "wall time from its inputs; dual "
         f"path = one 20-step euler image through the Dual-Path blend (self+cross, a = "
         f"{args.a_blend if args.a_blend < 1 else 0.7}) after the warm run, next to the plain model's "
         "(each timed on its second run).", "",
         "| model | px | run | node s | peak GiB | 20-step image s: dual path | plain |",
         "|---|---|---|---|---|---|---|"]
lines += [f"| {r['model']} | {r['px']} | {r['run']} | {r['node_s']} | {r['peak_gib']} | "
          f"{r.get('dual_path_20_steps_s', '')} | {r.get('plain_20_steps_s', '')} |" for r in rows]
table = "\n".join(lines)
log.info(table)
if args.out:
    write_results(args.out, table, rows)
