"""ImageReward scoring speed and memory: our batched scorer next to the official package's calling pattern, in one
process, on the OFFICIAL-size model (ViT-L/16 + 12-layer BERT with cross-attention + head: 446.2 M parameters, the
official 446.7 M less the unused vision_proj/text_proj) with random weights (speed and memory do not depend on the
weights; nothing is downloaded).

Rows:
- ours: RewardScorer.score on ComfyUI IMAGE tensors ([B,512,512,3] float on the CPU, as VAEDecode hands them
  over), including the preprocessing (PIL bicubic resize + crop on CPU threads, batched normalise), the copy to
  the device and one batched forward per --batches size, in fp16 / bf16 / fp32.
- official pattern: what ComfyUI nodes built on image-reward 1.5 do, emulated with our port's modules (the package
  itself does not import on current transformers): one image per call, fp32, the prompt tokenized every call,
  the image turned into PIL and run through the official torchvision transform on the CPU, then the vision
  encoder for that one image, then the text encoder, then the head, and the float read back.

Timing: one untimed warm-up run per row, then --repeats timed runs (median); CUDA is synchronised around each.
img/s counts scored images; peak GiB = torch.cuda.max_memory_allocated during the row (weights included).

Usage: python bench/reward.py [--device cuda] [--batches 1,16,64] [--dtypes fp16,bf16,fp32] [--repeats 5]
       [--out FILE.md]; a CPU smoke run: python bench/reward.py --device cpu --quick
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if "comfyui_personalize" not in sys.modules:
    pkg = types.ModuleType("comfyui_personalize")
    pkg.__path__ = [str(ROOT)]
    sys.modules["comfyui_personalize"] = pkg

from report import write_results  # noqa: E402  (bench/, next to this file)

from comfyui_personalize.headless.tiny_reward import write_vocab  # noqa: E402
from comfyui_personalize.scoring.model import MAX_PROMPT_TOKENS, build_model  # noqa: E402
from comfyui_personalize.scoring.preprocess import CLIP_MEAN, CLIP_STD, preprocess  # noqa: E402
from comfyui_personalize.scoring.scorer import RewardScorer, build_tokenizer  # noqa: E402
from comfyui_personalize.training.errors import InputError  # noqa: E402

log = logging.getLogger("reward_bench")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PROMPT = "a painting of an ocean with clouds and birds, day time, low depth field effect"
IMAGE_SIDE = 512


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", default=None, help="images per scoring call (default 1,16,64; 1,2 with --quick)")
    ap.add_argument("--dtypes", default=None, help="our scorer's dtypes (default fp16,bf16,fp32 on GPU, fp32 on CPU)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 5; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="small batches and one timed run: a smoke test")
    ap.add_argument("--no-official", action="store_true", help="skip the official-pattern rows")
    ap.add_argument("--out", default=None, help="also write the table and the JSON lines here")
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in (args.batches or ("1,2" if args.quick else "1,16,64")).split(",")]
    on_gpu = torch.device(args.device).type != "cpu"
    args.dtypes = (args.dtypes or ("fp16,bf16,fp32" if on_gpu else "fp32")).split(",")
    unknown = [d for d in args.dtypes if d not in DTYPES]
    if unknown:
        ap.error(f"unknown dtype {unknown}; choose from {list(DTYPES)}")
    args.repeats = args.repeats or (1 if args.quick else 5)
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def comfy_images(count: int, seed: int = 0) -> torch.Tensor:
    """What VAEDecode gives: [B,512,512,3] float32 in 0..1 on the CPU (smooth, image-like content)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(count, 3, 16, 16, generator=g)
    return torch.nn.functional.interpolate(low, size=(IMAGE_SIDE, IMAGE_SIDE), mode="bicubic").clamp(0, 1) \
        .permute(0, 2, 3, 1).contiguous()


def official_transform():
    """The image-reward 1.5 transform, on torchvision as in the package."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    return Compose([Resize(224, interpolation=InterpolationMode.BICUBIC), CenterCrop(224),
                    lambda im: im.convert("RGB"), ToTensor(), Normalize(CLIP_MEAN, CLIP_STD)])


def official_pattern_score(scorer: RewardScorer, images: torch.Tensor, transform, device: torch.device) -> list[float]:
    """One ``model.score(prompt, pil_image)`` call per image, as the package runs it (see module docstring)."""
    model = scorer.model
    rewards = []
    for image in images:  # the ComfyUI node's loop: tensor -> PIL, one call each
        pil = Image.fromarray(np.clip(255.0 * image.numpy(), 0, 255).astype(np.uint8))
        text = scorer.tokenizer(PROMPT, padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS,
                                return_tensors="pt").to(device)
        pixels = transform(pil).unsqueeze(0).to(device)
        image_embeds = model.vision(pixel_values=pixels).last_hidden_state
        out = model.text(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                         encoder_hidden_states=image_embeds, is_decoder=False)
        reward = model.mlp(out.last_hidden_state[:, 0])
        rewards.append(float(reward.item()))  # the package returns Python floats: a sync per image
    return rewards


def timed(run, device: torch.device, repeats: int) -> tuple[float, float | None]:
    """Median seconds of ``repeats`` runs after one warm-up run, and the peak GiB over all of them."""
    reset_peak(device)
    run()
    synchronize(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak_gib(device)


def measure(rows: list, impl: str, dtype: str, batch: int, run, device: torch.device, repeats: int) -> None:
    row = {"impl": impl, "dtype": dtype, "batch": batch}
    try:
        seconds, peak = timed(run, device, repeats)
        row.update(img_per_s=round(batch / seconds, 1), ms_per_img=round(1000 * seconds / batch, 2), peak_gib=peak)
    except (torch.cuda.OutOfMemoryError, InputError) as e:  # one row's failure (OOM, NaN scores) ends no other row
        row.update(error=f"{type(e).__name__}: {e}"[:300], peak_gib=peak_gib(device))
    rows.append(row)
    log.info(json.dumps(row))


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    args = parse_args(argv)
    device = torch.device(args.device)
    started = time.perf_counter()
    torch.manual_seed(0)
    master = build_model(device="cpu")  # official sizes, random init, fp32
    params = sum(p.numel() for p in master.parameters())
    log.info("official-size ImageReward port: %.1f M parameters (random weights)", params / 1e6)
    with tempfile.TemporaryDirectory() as tmp:  # a WordPiece vocab: only the token count (35) matters for speed
        vocab = Path(tmp) / "vocab.txt"
        write_vocab(vocab, size=30522)  # bert-base-uncased's size: the official embedding table has 30524 rows
        tokenizer = build_tokenizer(vocab)
    images = {b: comfy_images(b, seed=b) for b in args.batches}
    rows: list[dict] = []
    with torch.inference_mode():  # as ComfyUI runs nodes
        sample = images[args.batches[0]][:1]
        pil = Image.fromarray(np.clip(255.0 * sample[0].numpy(), 0, 255).astype(np.uint8))
        diff = (preprocess(sample)[0][0] - official_transform()(pil)).abs().max().item()
        log.info("same pixels check: our preprocessing vs the official transform, max |diff| = %.2g", diff)
        for batch in args.batches:
            start = time.perf_counter()
            for _ in range(args.repeats):
                preprocess(images[batch])
            prep = (time.perf_counter() - start) / args.repeats
            log.info(json.dumps({"preprocess_only": batch, "ms_per_img": round(1000 * prep / batch, 2),
                                 "cpu_threads": min(batch, os.cpu_count() or 1, 16)}))
        for name in args.dtypes:
            scorer = RewardScorer(copy.deepcopy(master).to(device), tokenizer, DTYPES[name])
            for batch in args.batches:
                measure(rows, "ours (batched)", name, batch,
                        lambda b=batch: scorer.score(images[b], [PROMPT], batch_size=b), device, args.repeats)
            del scorer
        if not args.no_official:
            scorer = RewardScorer(copy.deepcopy(master).to(device), tokenizer, torch.float32)
            transform = official_transform()
            for batch in args.batches:
                measure(rows, "official pattern (emulated)", "fp32", batch,
                        lambda b=batch: official_pattern_score(scorer, images[b], transform, device), device,
                        args.repeats)
            del scorer
    table = render(rows, device, params, args)
    log.info("%s\n(%.0f s in all)", table, time.perf_counter() - started)
    if args.out:
        write_results(args.out, table, rows)
    return 0


def render(rows: list[dict], device: torch.device, params: int, args) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    official = {r["batch"]: r.get("img_per_s") for r in rows if r["impl"].startswith("official")}
    lines = [f"ImageReward scoring on {name}, torch {torch.__version__}: official-size model "
             f"({params / 1e6:.1f} M parameters, random weights), {IMAGE_SIDE}x{IMAGE_SIDE} ComfyUI IMAGE inputs, "
             f"preprocessing included. 'official pattern (emulated)' = one image per call, fp32, the official "
             f"torchvision transform per image on the CPU, vision encoder then text encoder per image, run with "
             f"our port's modules at batch 1 (the image-reward package does not import on current transformers). "
             f"img/s: median of {args.repeats} timed run(s) after a warm-up; peak GiB = "
             f"torch.cuda.max_memory_allocated (weights included); x official = img/s over the official "
             f"pattern's at the same batch. batch = images scored per measurement: ours in one call, the "
             f"official pattern in one call each.", "",
             "| impl | dtype | batch | img/s | ms/img | peak GiB | x official |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        base = official.get(r["batch"])
        speed = r.get("img_per_s")
        ratio = f"{speed / base:.1f}" if speed and base and not r["impl"].startswith("official") else ""
        peak = "" if r["peak_gib"] is None else r["peak_gib"]
        lines.append(f"| {r['impl']} | {r['dtype']} | {r['batch']} | {speed or r.get('error', '')} | "
                     f"{r.get('ms_per_img', '')} | {peak} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
