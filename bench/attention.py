"""Attention-control cost: KSampler time and peak memory per image, plain vs each mode, and P2P vs a reference that
materialises the attention maps (the paper's controllers), in one process on SD1.5/SDXL-shaped random weights.

Modes (our nodes' patches on a clone): reweight value (attn2_patch), reweight renormalized (attn2 replace with a
logit bias), P2P word swap with self-attention injection (paired batch: both images count), dual-path blend
(rank-8 LoRA deltas, a = 0.7, cross attention). The reference runs the same P2P edit with explicit maps
(attention.reference) in the attn2 replace.

Usage: python bench/attention.py --comfyui COMFYUI_DIR [--models sd15,sdxl] [--steps 20] [--tiny] [--out FILE.md]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
import types
import warnings
from pathlib import Path

import torch

ap = argparse.ArgumentParser()
ap.add_argument("--comfyui", required=True)
ap.add_argument("--models", default="sd15,sdxl")
ap.add_argument("--steps", type=int, default=20)
ap.add_argument("--tiny", action="store_true")
ap.add_argument("--out", default=None)
ap.add_argument("--repeats", type=int, default=5, help="rounds of timed runs (every mode once per round)")
args = ap.parse_args()

ROOT = Path(__file__).resolve().parent.parent
pkg = types.ModuleType("comfyui_personalize")
pkg.__path__ = [str(ROOT)]
sys.modules["comfyui_personalize"] = pkg
sys.path.insert(0, os.path.abspath(args.comfyui))
sys.path.insert(0, str(ROOT / "bench"))
dev = "cuda" if torch.cuda.is_available() else "cpu"
sys.argv = [sys.argv[0]] + ([] if dev == "cuda" else ["--cpu"])
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.supported_models  # noqa: E402
import shapes  # noqa: E402

from comfyui_personalize.attention import reference  # noqa: E402
from comfyui_personalize.attention.align import swap_mapper  # noqa: E402
from comfyui_personalize.attention.dual_path import AttentionDeltas, LowRankDelta  # noqa: E402
from comfyui_personalize.nodes import dual_path as dual  # noqa: E402
from comfyui_personalize.nodes.attention_hooks import (  # noqa: E402
    COND,
    chunks,
    paired_rows,
    set_replace,
    transformer_blocks,
)
from comfyui_personalize.nodes.p2p_patches import (  # noqa: E402
    CrossPlan,
    install,
    p2p_cross_replace,
    p2p_self_replace,
    renormalized_replace,
    value_reweight_patch,
)

FAMILIES = {"sd15": (comfy.supported_models.SD15, shapes.sd15(args.tiny), 64, 768, None),
            "sdxl": (comfy.supported_models.SDXL, shapes.sdxl(args.tiny), 128, 2048, 2816 - 1536)}
if args.tiny:
    FAMILIES = {k: (c, u, 8, d, p) for k, (c, u, _, d, p) in FAMILIES.items()}
ALL = (1e9, 0.0)  # a sigma window covering the whole run
rows = []


def model_for(config_class, unet_config):
    mc = config_class(dict(unet_config))
    mc.unet_config.update(unet_config)
    if dev == "cuda":
        mc.set_inference_dtype(torch.float16, None)
    model = mc.get_model({}, "model.diffusion_model.", device=mm.get_torch_device())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() >= 2 else p.zero_()
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def cond(n, dim, pooled):
    extra = {} if pooled is None else {"pooled_output": torch.randn(n, 1280)}
    return [[torch.randn(n, 77, dim), extra]]


def sample(model, positive, negative, latent_batch, lat, steps):
    """One KSampler run; the P2P rows' paired batch shares its initial noise, as the node sets it up."""
    latent = torch.zeros(latent_batch, 4, lat, lat)
    noise = comfy.sample.prepare_noise(latent, 0, [0] * latent_batch if latent_batch == 2 else None)
    return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", positive, negative, latent, seed=0,
                               disable_pbar=True)


def count_syncs(run) -> int:
    """Host-device synchronisations during ``run`` (CUDA's sync debug mode warns once per sync): a patch that
    syncs in every layer stalls the GPU queue, which is what makes a launch-bound sampler slow."""
    if dev != "cuda":
        return 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def timed(run) -> float:
    t0 = time.perf_counter()
    run()
    if dev == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure_family(family, modes, lat):
    """``modes``: [(name, model, positive, negative, images)]. Warm-up, a sync count and the peak per mode, then
    ``--repeats`` rounds that run every mode once in turn: the host's speed drifts by tens of percent between
    minutes (the sampler is launch-bound), so each mode is compared with the plain run of the same round."""
    runs = {}
    for name, model, positive, negative, images in modes:
        go = functools.partial(sample, model, positive, negative, images, lat)
        go(2)  # load + warm-up
        syncs = count_syncs(lambda: go(2))
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        go(2)
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None
        runs[name] = dict(go=go, images=images, syncs=syncs, peak=peak, times=[])
    for _ in range(args.repeats):
        for r in runs.values():
            r["times"].append(timed(lambda: r["go"](args.steps)) / r["images"])
    for name, r in runs.items():
        base = runs["plain" if r["images"] == 1 else "plain batch 2"]["times"]
        ratios = [t / b for t, b in zip(r["times"], base)]
        row = dict(model=family, mode=name, images=r["images"], s_per_image=round(statistics.median(r["times"]), 3),
                   ratio=round(statistics.median(ratios), 3), runs=[round(t, 3) for t in r["times"]],
                   syncs_per_2_steps=r["syncs"], peak_gib=None if r["peak"] is None else round(r["peak"], 2))
        rows.append(row)
        print(json.dumps(row), flush=True)


def reference_replace(plan, heads_of):
    """The P2P edit with explicit maps, as the paper's controllers compute it."""
    def make(previous):
        def replace(q, k, v, extra_options):
            heads = extra_options["n_heads"]
            out = reference.attention(q, k, v, heads)
            c = plan.mapper.to(q.device)
            for kind, rows_ in chunks(extra_options, q.shape[0]):
                if kind == COND:
                    s, t = (r.to(q.device) for r in paired_rows(rows_))
                    out[t] = reference.p2p_cross(q[s], k[s], q[t], k[t], v[t], heads, c,
                                                 torch.ones(c.shape[1], device=q.device)).to(out.dtype)
            return out
        return replace
    return make


def deltas_for(block, rank=8):
    a = block.module.attn2
    mk = lambda lin: LowRankDelta.from_weights(torch.randn(rank, lin.in_features) * 0.01,  # noqa: E731
                                               torch.randn(lin.out_features, rank) * 0.01, rank)
    return AttentionDeltas(mk(a.to_q), mk(a.to_k), mk(a.to_v), mk(a.to_out[0]))


for family in args.models.split(","):
    config_class, unet_config, lat, dim, pooled = FAMILIES[family]
    base = model_for(config_class, unet_config)
    blocks = transformer_blocks(base)
    pos1, neg1, pos2 = cond(1, dim, pooled), cond(1, dim, pooled), cond(2, dim, pooled)
    modes = [("plain", base, pos1, neg1, 1), ("plain batch 2", base, pos2, neg1, 2)]
    w = torch.ones(77)
    w[5] = 2.5
    m = base.clone()
    m.set_model_attn2_patch(value_reweight_patch(w, (COND,), ALL))
    modes.append(("reweight value", m, pos1, neg1, 1))
    m = base.clone()
    install(m, blocks, "attn2", renormalized_replace(w, (COND,), ALL))
    modes.append(("reweight renormalized", m, pos1, neg1, 1))
    words = [([i], [i]) for i in range(1, 9)]
    mapper = swap_mapper(words, words, 77)
    plan = CrossPlan(mapper, torch.ones(77), torch.ones(77), ALL)
    m = base.clone()
    install(m, blocks, "attn2", p2p_cross_replace(plan, None))
    install(m, blocks, "attn1", p2p_self_replace(ALL, 4))
    modes.append(("p2p swap + self injection", m, pos2, neg1, 2))
    m = base.clone()
    install(m, blocks, "attn2", reference_replace(plan, None))
    install(m, blocks, "attn1", p2p_self_replace(ALL, 4))
    modes.append(("p2p reference (maps materialised)", m, pos2, neg1, 2))
    m = base.clone()
    hard = pos1[0][0][:1]
    for b in blocks:
        set_replace(m, "attn2", b, dual._Blend(b, deltas_for(b), hard, 0.7, ALL).cross)
    m.set_model_attn2_patch(dual.stash_patch)
    m.set_model_attn2_output_patch(dual.add_delta_out)
    modes.append(("dual-path a=0.7 (cross)", m, pos1, neg1, 1))
    measure_family(family, modes, lat)
    mm.unload_all_models()
    del base, m, modes

table = ["| model | mode | s/image (median) | x plain (same batch and round) | syncs per 2 steps | peak GiB |",
         "|---|---|---|---|---|---|"]
for r in rows:
    table.append(f"| {r['model']} | {r['mode']} | {r['s_per_image']} | {r['ratio']:.2f} | {r['syncs_per_2_steps']} "
                 f"| {r['peak_gib']} |")
print("\n".join(table))
if args.out:
    Path(args.out).write_text("\n".join(table) + "\n\n" + "\n".join(json.dumps(r) for r in rows) + "\n")
