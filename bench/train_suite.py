"""Training-suite speed and memory: our DreamBooth (with prior preservation), Textual Inversion and SDXL LoRA paths
next to diffusers loops, in one process, on SD1.5- and SDXL-shaped models with random weights (speed and memory do
not depend on the weights). Logs one JSON line per measurement and a markdown table at the end.

Cases (each measurement starts from freed memory and reset peak statistics):
- db_prior: full UNet fine-tune as Personalize Train DreamBooth runs it (FullFineTune fp32 master copies swapped
  in, bf16 autocast, NHWC conv copies + nhwc_inputs, fused AdamW, CUDA-graphed step, through TrainingSession.run),
  SD1.5 shape at 512 px, class images in the same forward, batch 1 and 4, gradient checkpointing off and on;
  random conditioning (the text side is frozen). Peer: suite_peers.dreambooth_prior.
- ti: Textual Inversion as Personalize Train Textual Inversion runs it: SD1.5 UNet frozen in its own fp16, a
  real-size ComfyUI CLIP-L (random weights) with the vector spliced in through clip_with_embeddings, every caption
  tokenized and encoded by ComfyHost.encode_text every step. Peer: suite_peers.textual_inversion.
- db_sdxl: the same DreamBooth step on an SDXL-shaped UNet at 1024 px, batch 1 (ours only): what memory a full SDXL
  fine-tune with prior preservation needs.
- sdxl_lora: Personalize Train LoRA's path on an SDXL-shaped UNet (fp16, rank 8, attention), 1024 px, batch 1,
  gradient checkpointing off and on. Peer: suite_peers.sdxl_lora (diffusers+peft).

Timing: one untimed run of --warmup steps (kernel selection, allocator growth), then runs of --warmup and
--warmup + --steps steps; s/step is their difference / --steps, so set-up, the trainer's eager warm-up steps and
the CUDA-graph capture cancel out (--warmup must be >= 4 for that). Peak = torch.cuda.max_memory_allocated.

Usage: python bench/train_suite.py --comfyui COMFYUI_DIR [--cases db_prior,ti,sdxl_lora] [--impls ours,diffusers]
       [--steps 20] [--warmup 5] [--tiny] [--out FILE.md]
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

import torch
from comfy_env import start_comfyui

ap = argparse.ArgumentParser()
ap.add_argument("--comfyui", required=True, help="ComfyUI source folder")
ap.add_argument("--cases", default="db_prior,ti,sdxl_lora")
ap.add_argument("--impls", default="ours,diffusers")
ap.add_argument("--ckpt", choices=("both", "on", "off"), default="both", help="gradient checkpointing rows to run")
ap.add_argument("--memory-cap-gib", type=float, default=None,
                help="cap the allocator (set_per_process_memory_fraction): does it train on a card this size")
ap.add_argument("--no-cuda-graph", action="store_true", help="run our steps eagerly (no CUDA graph)")
ap.add_argument("--optimizer", default="adamw",
                help="our optimizer (training/optimizers.py): adamw, adafactor or adafactor_fused")
ap.add_argument("--comfyui-text-path", action="store_true",
                help="TI: encode captions through CLIP.encode_from_tokens every step (no device prompt encoder)")
ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 2 with --tiny)")
ap.add_argument("--warmup", type=int, default=None, help="steps of the runs subtracted (default 5; 1 with --tiny)")
ap.add_argument("--tiny", action="store_true", help="toy sizes, for a CPU smoke run of the same code")
ap.add_argument("--out", default=None, help="also write the table and the JSON lines here")
args = ap.parse_args()
STEPS = args.steps or (2 if args.tiny else 20)
WARMUP = args.warmup or (1 if args.tiny else 5)

logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
log = logging.getLogger("train_suite")
log.setLevel(logging.INFO)

COMFYUI = os.path.abspath(args.comfyui)
dev = start_comfyui(COMFYUI)
import comfy.model_management as mm  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy_models  # noqa: E402  (bench/, next to this file)
import shapes  # noqa: E402
import suite_peers  # noqa: E402
from report import write_results  # noqa: E402

from comfyui_personalize.nodes.embeddings import (  # noqa: E402
    clip_with_embeddings,
    init_ids,
    text_encoders,
    token_table,
)
from comfyui_personalize.nodes.session import TrainingSession  # noqa: E402
from comfyui_personalize.training.batches import LatentBucket, TrainingData  # noqa: E402
from comfyui_personalize.training.datasets import InstanceDataset  # noqa: E402
from comfyui_personalize.training.embedding import (  # noqa: E402
    TextualInversion,
    initial_vectors,
    with_embedding_syntax,
)
from comfyui_personalize.training.full_finetune import FullFineTune  # noqa: E402
from comfyui_personalize.training.lora import LoRANetwork  # noqa: E402
from comfyui_personalize.training.task import Conditioning  # noqa: E402
from comfyui_personalize.training.trainer import ParamGroup  # noqa: E402

SD15, SDXL = shapes.sd15(args.tiny), shapes.sdxl(args.tiny)
CLIP_OVERRIDES: dict = {}  # keys of comfy/sd1_clip_config.json (CLIP-L) changed for --tiny
SD15_LAT, SDXL_LAT = 64, 128
if args.tiny:
    CLIP_OVERRIDES = dict(comfy_models.TINY_CLIP)
    SD15_LAT, SDXL_LAT = 8, 16
RANK = 8
rows: list[dict] = []


class _Kept(logging.Handler):
    """Keeps the trainer's "could not be captured as a CUDA graph" warnings: a row timed eagerly says so."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


graph_warnings = _Kept()
logging.getLogger("comfyui_personalize.training.cuda_graph").addHandler(graph_warnings)


def emit(**kw) -> None:
    kw["device"] = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    rows.append(kw)
    log.info(json.dumps(kw))


def sync() -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def gib(n_bytes: int) -> float:
    return round(n_bytes / 2**30, 2)


def free_everything() -> None:
    """Give back what the last measurement held (its models are unreferenced by now) and reset peak stats."""
    gc.collect()
    mm.unload_all_models()
    mm.cleanup_models()
    gc.collect()
    mm.soft_empty_cache()
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()


def session(model, clip, learning_rate: float, batch: int, checkpointing: bool) -> TrainingSession:
    """The node's TrainingSession; its dataset is a placeholder (each case builds encoded TrainingData itself)."""
    placeholder = InstanceDataset((torch.zeros(64, 64, 3),), ("unused",), resolution=512)
    return TrainingSession(model, clip, None, placeholder, None, None,
                           dict(steps=1, learning_rate=learning_rate, batch_size=batch, seed=0, dtype="auto",
                                gradient_checkpointing=checkpointing), None)


def run_session(s: TrainingSession, data: TrainingData, params, attach, **kw):
    """``run(steps)``: TrainingSession.run for that many steps (a fresh optimiser and CUDA graph each call)."""
    def run(steps: int) -> None:
        s.cfg = dataclasses.replace(s.cfg, steps=steps, cuda_graph=not args.no_cuda_graph, optimizer=args.optimizer)
        s.run(data, params, attach(), **kw)

    return run


def ours_db_prior(batch: int, checkpointing: bool, sdxl: bool = False):
    """PersonalizeTrainDreamBooth.execute from the encoded data on (no VAE/CLIP: conditioning is random)."""
    config_class, unet_config = (comfy.supported_models.SDXL, SDXL) if sdxl else (comfy.supported_models.SD15, SD15)
    s = session(comfy_models.comfy_model(config_class, unet_config, dev), None, 5e-6, batch, checkpointing)
    host = s.host
    host.load_for_training(False)
    device = host.model.load_device
    n, lat = max(8, batch), SDXL_LAT if sdxl else SD15_LAT
    width, y = (2048, torch.randn(n, 2816)) if sdxl else (768, None)
    bucket = LatentBucket(torch.randn(n, 4, lat, lat), [""] * n, (lat * 8, lat * 8),
                          class_latents=torch.randn(n, 4, lat, lat), cond=Conditioning(torch.randn(n, 77, width), y),
                          class_cond=Conditioning(torch.randn(1, 77, width), None if y is None else y[:1]))
    data = TrainingData([bucket], None, prior="class_images", prior_weight=1.0, class_prompt="a photo of a dog")
    host.compute_dtype = torch.float32  # fp32 master weights; bf16 compute comes from autocast

    def run(steps: int) -> None:  # fresh master copies each run, as the node makes them (the peak is one run's)
        unet = FullFineTune(host.diffusion_model, device, channels_last=device.type == "cuda")
        s.cfg = dataclasses.replace(s.cfg, steps=steps, cuda_graph=not args.no_cuda_graph, optimizer=args.optimizer)
        s.run(data, [ParamGroup(list(unet.parameters()), 5e-6)], [unet.swapped_in()], text_trains=False,
              channels_last=False, nhwc_inputs=device.type == "cuda")

    return run


def ours_ti(batch: int):
    """The Textual Inversion node's _train from the encoded latents on: one vector, init word "dog"."""
    clip = comfy_models.comfy_clip(comfy.supported_models.SD15, SD15, args.tiny)
    s = session(comfy_models.comfy_model(comfy.supported_models.SD15, SD15, dev), clip, 5e-3, batch, False)
    host, token = s.host, "zwx"
    with torch.no_grad():
        vectors = {key: initial_vectors(token_table(encoder), init_ids(tok, "dog"), 1)
                   for key, (_, tok, encoder) in text_encoders(host.clip).items()}
    inversion = TextualInversion(token, vectors)
    host.clip = clip_with_embeddings(host.clip, {token: inversion.vectors})
    host.cache_tokens = False
    n, lat = max(8, batch), SD15_LAT
    captions = [with_embedding_syntax(f"a photo of {token} dog", token)] * n
    data = TrainingData.single(torch.randn(n, 4, lat, lat), captions, host.encode_text)
    host.load_for_training(True)
    if not args.comfyui_text_path:  # as TrainingSession.data does for the nodes
        with torch.no_grad():
            data.prompt_encoder = host.device_prompt_encoder(data.prompts(), data.buckets[0].size)
    inversion.to(host.model.load_device)
    return run_session(s, data, list(inversion.parameters()), lambda: [], text_trains=True)


def ours_sdxl_lora(batch: int, checkpointing: bool):
    """Personalize Train LoRA (rank 8, attention, dtype auto = fp16 with loss scaling) on encoded data."""
    s = session(comfy_models.comfy_model(comfy.supported_models.SDXL, SDXL, dev), None, 1e-4, batch, checkpointing)
    host = s.host
    host.load_for_training(False)
    net = LoRANetwork(host.unet_lora_targets("attention"), RANK, RANK).to(host.model.load_device)
    n, lat = max(4, batch), SDXL_LAT
    cond = Conditioning(torch.randn(n, 77, 2048), torch.randn(n, 2816))
    data = TrainingData.encoded(torch.randn(n, 4, lat, lat), cond)
    return run_session(s, data, list(net.parameters()), lambda: [net.attached()], text_trains=False)


def clip_config() -> dict:
    config = json.loads(Path(COMFYUI, "comfy", "sd1_clip_config.json").read_text())
    return {**config, **CLIP_OVERRIDES}


def timed(run) -> tuple[float, float | None, float | None]:
    """(seconds per step, peak GiB allocated, peak GiB reserved by the caching allocator): runs of WARMUP and
    WARMUP + STEPS steps after an untimed one."""
    run(WARMUP)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    took = {}
    for n in (WARMUP, WARMUP + STEPS):
        sync()
        t0 = time.perf_counter()
        run(n)
        sync()
        took[n] = time.perf_counter() - t0
    peaks = (gib(torch.cuda.max_memory_allocated()), gib(torch.cuda.max_memory_reserved())) if dev == "cuda" \
        else (None, None)
    return ((took[WARMUP + STEPS] - took[WARMUP]) / STEPS, *peaks)


def measure(case: str, impl: str, batch: int, checkpointing: bool, build, per_instance: int = 1, **info) -> None:
    """Build the case from freed memory, time it, log the row; a failure (OOM included) is a row, not a crash."""
    free_everything()
    start = gib(torch.cuda.memory_allocated()) if dev == "cuda" else None
    row = dict(case=case, impl=impl, batch=batch, forward_batch=batch * per_instance, grad_ckpt=checkpointing,
               **info)
    graph_warnings.messages.clear()
    try:
        dt, peak, reserved = timed(build())
        row.update(s_per_step=round(dt, 4), img_per_s=round(batch * per_instance / dt, 2),
                   instance_img_per_s=round(batch / dt, 2), peak_gib=peak, peak_reserved_gib=reserved,
                   start_gib=start)
    except Exception as e:
        traceback.print_exc()
        row.update(error=repr(e)[:300])
    if graph_warnings.messages:
        row["cuda_graph_failed"] = graph_warnings.messages[0][:300]
    emit(**row)
    free_everything()


DB_INFO = dict(res=SD15_LAT * 8, precision="fp32 master weights, bf16 autocast")
TI_INFO = dict(res=SD15_LAT * 8, vectors=1)
XL_INFO = dict(res=SDXL_LAT * 8, rank=RANK, targets="attention q,k,v,out")
CASES = {
    "db_prior": [
        (impl, b, ckpt, build)
        for b in (1, 4) for ckpt in (False, True)
        for impl, build in (("ours", lambda b=b, c=ckpt: ours_db_prior(b, c)),
                            ("diffusers", lambda b=b, c=ckpt: suite_peers.dreambooth_prior(dev, args.tiny, SD15_LAT,
                                                                                          b, c)))],
    "db_sdxl": [("ours", 1, ckpt, lambda c=ckpt: ours_db_prior(1, c, sdxl=True)) for ckpt in (False, True)],
    "ti": [
        (impl, b, False, build)
        for b in (1, 4)
        for impl, build in (("ours", lambda b=b: ours_ti(b)),
                            ("diffusers", lambda b=b: suite_peers.textual_inversion(
                                dev, args.tiny, SD15_LAT, b, clip_config(), os.path.join(COMFYUI, "comfy",
                                                                                         "sd1_tokenizer"))))],
    "sdxl_lora": [
        (impl, 1, ckpt, build)
        for ckpt in (False, True)
        for impl, build in (("ours", lambda c=ckpt: ours_sdxl_lora(1, c)),
                            ("diffusers", lambda c=ckpt: suite_peers.sdxl_lora(dev, args.tiny, SDXL_LAT, 1, c,
                                                                                RANK)))],
}
IMPL_INFO = {("db_prior", "ours"): dict(DB_INFO), ("db_prior", "diffusers"): dict(DB_INFO),
             ("db_sdxl", "ours"): dict(DB_INFO, res=SDXL_LAT * 8),
             ("ti", "ours"): dict(TI_INFO, precision="UNet+CLIP fp16, loss scaling (dtype auto)"),
             ("ti", "diffusers"): dict(TI_INFO, precision="UNet bf16, text encoder fp32, bf16 autocast"),
             ("sdxl_lora", "ours"): dict(XL_INFO, precision="fp16 weights, loss scaling (dtype auto)"),
             ("sdxl_lora", "diffusers"): dict(XL_INFO, precision="bf16 weights, fp32 adapters, bf16 autocast")}

if dev != "cuda":
    for info in IMPL_INFO.values():
        info["precision"] = "fp32 (CPU smoke run)"
if args.memory_cap_gib and dev == "cuda":
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(args.memory_cap_gib * 2**30 / total)
started = time.perf_counter()
impls = set(filter(None, args.impls.split(",")))
unknown = [c for c in filter(None, args.cases.split(",")) if c not in CASES] + sorted(impls - {"ours", "diffusers"})
if unknown:
    ap.error(f"unknown case or impl: {unknown}; cases are {list(CASES)}, impls ours and diffusers")
for case in filter(None, args.cases.split(",")):
    for impl, batch, checkpointing, build in CASES[case]:
        if impl in impls and args.ckpt in ("both", "on" if checkpointing else "off"):
            measure(case, impl, batch, checkpointing, build, per_instance=2 if case.startswith("db_") else 1,
                    **IMPL_INFO[(case, impl)])

lines = [f"img/s counts every image in the forward pass (db_prior: instance + class images, 2 x batch); "
         f"instance img/s counts subject images only; x diffusers = our img/s / the diffusers loop's at the same "
         f"batch and checkpointing; peak GiB = torch.cuda.max_memory_allocated (max_memory_reserved in brackets). "
         f"{STEPS} timed steps, warm-up runs of {WARMUP} steps.", "",
         "| case | impl | batch | grad ckpt | img/s | instance img/s | s/step | peak GiB | x diffusers |",
         "|---|---|---|---|---|---|---|---|---|"]
peer_speed = {(r["case"], r["batch"], r["grad_ckpt"]): r["img_per_s"] for r in rows
              if r["impl"] == "diffusers" and "img_per_s" in r}
for r in rows:
    peer = peer_speed.get((r["case"], r["batch"], r["grad_ckpt"]))
    ratio = f"{r['img_per_s'] / peer:.2f}" if r["impl"] == "ours" and peer and "img_per_s" in r else ""
    lines.append(f"| {r['case']} | {r['impl']} | {r['batch']} | {'on' if r['grad_ckpt'] else 'off'} | "
                 f"{r.get('img_per_s', 'error')} | {r.get('instance_img_per_s', '')} | {r.get('s_per_step', '')} | "
                 f"{r.get('peak_gib', '')} ({r.get('peak_reserved_gib', '')}) | {ratio} |")
table = "\n".join(lines)
log.info("%s\n(%.0f s in all)", table, time.perf_counter() - started)
if args.out:
    write_results(args.out, table, rows)
