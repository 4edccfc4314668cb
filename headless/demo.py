"""The newcomer's demo: train a LoRA end to end on a tiny random-weight model, on the CPU, in well under a minute.

It runs the same core the ComfyUI nodes run (LoRA hooks, trainer loop, kohya file format) through the diffusers
adapter, so it needs neither ComfyUI nor downloaded weights. The model's weights are random, so its samples are
noise-like: the demo shows that the pipeline works (loss falls, the file round-trips), not image quality.
With ``--comfyui PATH`` it instead runs the pack's example workflows in a headless ComfyUI.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import load_file

from ..training.batches import TrainingData
from ..training.errors import InputError
from ..training.files import lora_metadata, resolve_output_path, save_safetensors_atomic
from ..training.lora import LoRANetwork
from ..training.plot import image_to_tensor, loss_plot
from ..training.task import Conditioning
from ..training.trainer import TrainConfig, fixed_noise_loss, train
from .diffusers_adapter import DiffusersHost
from .tiny import build_tiny_parts
from .tiny_reward import write_tiny_reward_files
from .workflow_inputs import execution_errors, use_tiny_inputs

log = logging.getLogger(__name__)

CAPTION = "a photo of zwx toy"  # every word is a whole token of the tiny tokenizer (tiny.WORDS)
IMAGE_SIZE = 64  # the tiny VAE downsamples 8x: 8x8 latents, the tiny UNet's sample_size
RANK = ALPHA = 8
LEARNING_RATE, BATCH_SIZE, LOG_EVERY = 1e-2, 2, 25
SAMPLE_SEEDS = (0, 1)
EXAMPLE_WORKFLOWS = Path(__file__).resolve().parent.parent / "example_workflows"
TINY_CHECKPOINT = "personalize_tiny_sd15.safetensors"
TINY_REWARD = "ImageReward-tiny.safetensors"
# Shared with the server tests, so the tiny checkpoint is built once per machine.
CHECKPOINT_CACHE = Path(os.environ.get("PERSONALIZE_CACHE_DIR", Path.home() / ".cache" / "comfyui-personalize"))
WORKFLOW_TIMEOUT_S = 600


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="demo.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_output", help="folder for the results (default: ./demo_output)")
    p.add_argument("--steps", type=int, default=150, help="training steps (default 150)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps per sample image (default 20)")
    p.add_argument("--comfyui", metavar="PATH", help="run the example workflows in the ComfyUI at PATH instead "
                                                     "(on the CPU, with a tiny checkpoint and CPU-sized settings)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.comfyui:
        return run_comfyui_workflows(Path(args.comfyui), out)
    try:
        with single_threaded_torch():
            run_tiny_demo(out, steps=args.steps, seed=args.seed, sample_steps=args.sample_steps)
    except InputError as e:  # e.g. --steps 0: the message names the setting
        log.error("%s", e)
        return 2
    return 0


@contextmanager
def single_threaded_torch() -> Iterator[None]:
    """The tiny model's ops are too small to gain from threads, and on a busy machine threads that wait for
    each other made training ~8x slower (measured: 150 steps in 5 s on 1 thread, 43 s on 2)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def make_subject_images(count: int = 4, size: int = IMAGE_SIZE, seed: int = 0) -> list[Image.Image]:
    """The "subject": a red disc on blue, a little moved and resized in each photo, as real photos would be."""
    rng = random.Random(seed)
    images = []
    for _ in range(count):
        img = Image.new("RGB", (size, size), (40, 70, 190))
        r = rng.uniform(0.2, 0.3) * size
        cx, cy = (size / 2 + rng.uniform(-0.12, 0.12) * size for _ in range(2))
        ImageDraw.Draw(img).ellipse([cx - r, cy - r, cx + r, cy + r], fill=(215, 40, 40))
        images.append(img)
    return images


def tensor_to_images(batch: torch.Tensor) -> list[Image.Image]:
    """[N, H, W, 3] in 0..1 -> PIL images."""
    return [Image.fromarray((x.clamp(0, 1).numpy() * 255).round().astype(np.uint8)) for x in batch]


def image_grid(rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str],
               column_labels: Sequence[str] = (), title: Sequence[str] = (), scale: int = 2) -> Image.Image:
    """Rows of equal-sized images, enlarged ``scale``x (nearest: 64 px is too small to judge), with labels and
    title lines above, so the picture explains itself."""
    w, h = rows[0][0].width * scale, rows[0][0].height * scale
    font, gap, line = ImageFont.load_default(size=12), 6, 16
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 12 + int(max(measure.textlength(t, font=font) for t in row_labels))
    top = gap + line * len(title) + (line if column_labels else 0)
    columns = max(len(r) for r in rows)
    width = max(label_w + columns * (w + gap), 12 + int(max((measure.textlength(t, font=font) for t in title),
                                                            default=0)))
    grid = Image.new("RGB", (width, top + len(rows) * (h + gap)), "white")
    draw = ImageDraw.Draw(grid)
    for i, text in enumerate(title):
        draw.text((6, gap + i * line), text, fill="black", font=font)
    for c, text in enumerate(column_labels):
        draw.text((label_w + c * (w + gap) + w / 2, top - 3), text, fill="black", font=font, anchor="mb")
    for r, (row, text) in enumerate(zip(rows, row_labels)):
        y = top + r * (h + gap)
        draw.text((6, y + h / 2), text, fill="black", font=font, anchor="lm")
        for c, img in enumerate(row):
            grid.paste(img.resize((w, h), Image.NEAREST), (label_w + c * (w + gap), y))
    return grid


def check_reloaded_lora(host: DiffusersHost, trained: LoRANetwork, path: Path, latents: torch.Tensor,
                        cond: Conditioning) -> float:
    """Load the saved file into a fresh network and check it changes the UNet's output as the trained one does.
    Returns the relative error; raises if the file does not reproduce the training (fp16 storage: ~1e-3)."""
    fresh = LoRANetwork(host.unet_lora_targets("attention"), rank=RANK, alpha=ALPHA)  # up = 0: a no-op until loaded
    fresh.load_kohya_state_dict(load_file(str(path)))
    x, t, c = latents, torch.full((latents.shape[0],), 500), cond
    with torch.no_grad():
        base = host.predict(x, t, c)
        with trained.attached():
            trained_out = host.predict(x, t, c)
        with fresh.attached():
            reloaded_out = host.predict(x, t, c)
    effect = (trained_out - base).abs().max().item()
    error = (reloaded_out - trained_out).abs().max().item() / max(effect, 1e-12)
    if effect == 0 or error > 0.02:
        raise RuntimeError(f"the saved LoRA does not reproduce the trained one (effect {effect:.3g}, "
                           f"relative error {error:.3g}): {path}")
    return error


def run_tiny_demo(out: Path, steps: int, seed: int, sample_steps: int) -> dict:
    """Synthetic subject -> LoRA training -> kohya file, reloaded and checked -> plots, samples, summary.json."""
    started = time.perf_counter()
    log.info("building the tiny random-weight SD1-style model (UNet, CLIP text encoder, VAE)")
    parts = build_tiny_parts(seed=seed)
    host = DiffusersHost(parts.unet, parts.text_encoder, parts.tokenizer, parts.vae, parts.prediction)

    subject = make_subject_images(seed=seed)
    subject_path = out / "subject_images.png"
    image_grid([subject], ["subject"]).save(subject_path)
    images = torch.cat([image_to_tensor(img) for img in subject])
    latents = host.encode_images(images)
    with torch.no_grad():
        cond = host.encode_text([CAPTION] * len(subject))  # cached: the text encoder is not trained here

    task = host.task()
    network = LoRANetwork(host.unet_lora_targets("attention"), rank=RANK, alpha=ALPHA, seed=seed)
    config = TrainConfig(steps=steps, learning_rate=LEARNING_RATE, batch_size=BATCH_SIZE, seed=seed,
                         report_every=LOG_EVERY)
    loss_before = fixed_noise_loss(task, latents, cond)
    log.info("training a rank-%d LoRA on %d images, caption %r; fixed-noise loss before: %.4f",
             RANK, len(subject), CAPTION, loss_before)
    train_started = time.perf_counter()

    def report(step: int, losses: list[float]) -> None:
        if step % LOG_EVERY == 0 or step == steps:
            recent = losses[-LOG_EVERY:]
            log.info("step %4d/%d  loss %.4f  (mean of last %d: %.4f)  %.1f s", step, steps, losses[-1],
                     len(recent), sum(recent) / len(recent), time.perf_counter() - train_started)

    with network.attached():
        losses = train(task, TrainingData.encoded(latents, cond), list(network.parameters()), config, report)
        loss_after = fixed_noise_loss(task, latents, cond)
    log.info("fixed-noise loss after: %.4f (before %.4f)", loss_after, loss_before)

    lora_path = resolve_output_path(out, "loras", "demo_lora", ".safetensors", if_exists="overwrite")
    tensors = network.kohya_state_dict()
    metadata = lora_metadata(
        base_model="sd1", rank=RANK, alpha=ALPHA, learning_rate=LEARNING_RATE, steps=steps,
        batch_size=BATCH_SIZE, resolution=(IMAGE_SIZE, IMAGE_SIZE), num_images=len(subject), seed=seed,
        title="demo_lora", text_encoder_trained=False, prediction=parts.prediction, targets="attention",
        extra={"demo": "tiny random-weight model; not usable with real checkpoints"},
    )
    save_safetensors_atomic(tensors, lora_path, metadata)
    reload_error = check_reloaded_lora(host, network, lora_path, latents, cond)
    log.info("saved %s (%d tensors); reloaded it: outputs match to %.1e relative", lora_path, len(tensors),
             reload_error)

    loss_path = out / "loss.png"
    loss_plot(losses, title=f"demo LoRA training loss ({steps} steps)").save(loss_path)
    samples_path = out / "samples.png"
    sample_grid(host, network, sample_steps).save(samples_path)

    summary = {
        "caption": CAPTION, "steps": steps, "seed": seed,
        "loss_first": losses[0], "loss_last": losses[-1],
        "fixed_noise_loss_before": loss_before, "fixed_noise_loss_after": loss_after,
        "lora_keys": len(tensors), "lora_reload_relative_error": reload_error,
        "files": {name: str(path) for name, path in (("lora", lora_path), ("loss_plot", loss_path),
                                                     ("samples", samples_path), ("subject_images", subject_path))},
        "wall_time_s": round(time.perf_counter() - started, 2),
        "note": "The model has random weights, so sample images are noise-like by design; the demo checks the "
                "pipeline (loss falls, the LoRA file round-trips), not image quality.",
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("done in %.1f s: fixed-noise loss %.4f -> %.4f (training loss %.4f -> %.4f)",
             summary["wall_time_s"], loss_before, loss_after, losses[0], losses[-1])
    log.info("LoRA (kohya keys, %d tensors): %s", len(tensors), lora_path)
    log.info("in %s: %s, %s, %s and summary.json", out, subject_path.name, loss_path.name, samples_path.name)
    log.info("note: %s", summary["note"])
    return summary


def sample_grid(host: DiffusersHost, network: LoRANetwork, sample_steps: int) -> Image.Image:
    """Base and LoRA samples for the same prompt and seeds, so the only difference is the LoRA."""
    size = (IMAGE_SIZE, IMAGE_SIZE)

    def samples() -> list[Image.Image]:
        return [tensor_to_images(host.sample([CAPTION], size, steps=sample_steps, seed=s))[0] for s in SAMPLE_SEEDS]

    base = samples()
    with network.attached():
        with_lora = samples()
    return image_grid([base, with_lora], ["base model", "with LoRA"], [f"seed {s}" for s in SAMPLE_SEEDS],
                      title=[f"prompt: {CAPTION!r}", "random-weight tiny model: noise-like by design"])


def run_comfyui_workflows(comfyui: Path, out: Path) -> int:
    """Queue every example workflow on a headless ComfyUI at ``comfyui`` (``main.py --cpu`` on 127.0.0.1).

    Everything ComfyUI writes goes under ``out/comfyui`` (models, input, output), never into its own tree.
    Checkpoint loaders get a tiny random-weight SD1.5 checkpoint, Load Image nodes the demo's subject picture,
    and ``cpu_overrides`` is always applied (2 steps, 64x64, batch 1), since the server runs on the CPU: the
    run shows that each graph executes end to end, not what the workflow produces on real weights.
    """
    from .comfy_server import (
        ComfyServer,
        ComfyServerError,
        cpu_overrides,
        ui_workflow_to_api,
        write_tiny_sd15_checkpoint,
    )

    if not (comfyui / "main.py").is_file():
        log.error("--comfyui %s: no main.py there; pass the folder of a ComfyUI checkout", comfyui)
        return 2
    workflows = sorted(EXAMPLE_WORKFLOWS.glob("*.json"))
    if not workflows:
        log.error("no example workflows in %s", EXAMPLE_WORKFLOWS)
        return 1
    base, started, results = out / "comfyui", time.perf_counter(), {}
    log.info("building (or reusing) the tiny SD1.5 checkpoint; the first build takes a minute or two")
    write_tiny_sd15_checkpoint(base / "models" / "checkpoints" / TINY_CHECKPOINT, cache_dir=CHECKPOINT_CACHE,
                               comfyui_path=comfyui)
    write_tiny_reward_files(base / "models" / "image_reward", name=TINY_REWARD)  # for the ImageReward workflow
    lora_folder = base / "models" / "loras"
    loras_before = set(lora_folder.rglob("*.safetensors"))  # the Save node increments names on reruns
    with ComfyServer(base, comfyui_path=comfyui) as server:
        log.info("ComfyUI is up at %s (log: %s)", server.base_url, server.log_path)
        for path in workflows:
            t0 = time.perf_counter()
            try:
                prompt = cpu_overrides(use_tiny_inputs(
                    ui_workflow_to_api(json.loads(path.read_text()), server.object_info()), TINY_CHECKPOINT,
                    server.input_dir, lambda p: make_subject_images(count=1)[0].save(p), TINY_REWARD))
                entry = server.wait(server.queue(prompt), timeout=WORKFLOW_TIMEOUT_S)
            except (ComfyServerError, ValueError) as e:  # unknown node, rejected prompt, timeout: report, go on
                entry = {"status": {"status_str": "error", "messages": []}, "error": str(e)}
            ok = (entry.get("status") or {}).get("status_str") == "success"
            results[path.name] = {"ok": ok, "seconds": round(time.perf_counter() - t0, 1),
                                  "images": _saved_images(entry, server.output_dir),
                                  **({} if ok else {"errors": entry.get("error") or execution_errors(entry)})}
            if ok:
                log.info("%s: ran in %.1f s; images: %s", path.name, results[path.name]["seconds"],
                         ", ".join(results[path.name]["images"]) or "none")
            else:
                log.error("%s failed:\n%s", path.name, results[path.name]["errors"])
    loras = sorted(str(p) for p in set(lora_folder.rglob("*.safetensors")) - loras_before)
    failed = [name for name, r in results.items() if not r["ok"]]
    summary = {"comfyui": str(comfyui), "base_dir": str(base), "workflows": results, "loras": loras,
               "wall_time_s": round(time.perf_counter() - started, 1),
               "note": "Tiny random-weight checkpoint and CPU-sized settings: outputs are noise-like by design."}
    summary_path = out / "comfyui_summary.json"  # beside, not over, the tiny demo's summary.json
    summary_path.write_text(json.dumps(summary, indent=2))
    log.info("%d of %d example workflows ran; new LoRA files: %s; summary: %s", len(results) - len(failed),
             len(results), ", ".join(loras) or "none", summary_path)
    return 1 if failed else 0


def _saved_images(entry: dict, output_dir: Path) -> list[str]:
    return [str(output_dir / img.get("subfolder", "") / img["filename"])
            for node_output in (entry.get("outputs") or {}).values() for img in node_output.get("images", [])
            if img.get("type", "output") == "output"]


