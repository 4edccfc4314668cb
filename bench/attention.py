"""Attention-control cost: KSampler time and peak memory per image, plain vs each mode, and P2P vs a reference that
materialises the attention maps (the paper's controllers), in one process on SD1.5/SDXL-shaped random weights.

Modes (our nodes' patches on a clone): reweight value (attn2_patch), reweight renormalized (attn2 replace with a
logit bias), P2P word swap with self-attention injection (paired batch: both images count), P2P refinement (two inserted
words) and swap with local blend, dual-path blend
(the node itself on a rank-8 attention LoRA, a = 0.7, cross attention only and self + cross; cross also as on
projections that are not plain weights, "by modules"). The reference runs
the same P2P edit with explicit maps (attention.reference) in the attn2 replace.

Usage: python bench/attention.py --comfyui COMFYUI_DIR [--models sd15,sdxl] [--steps 20] [--tiny] [--out FILE.md]
       [--repeats 5] [--images 1] [--only dual,p2p]
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
from comfy_env import start_comfyui

ap = argparse.ArgumentParser()
ap.add_argument("--comfyui", required=True)
ap.add_argument("--models", default="sd15,sdxl")
ap.add_argument("--steps", type=int, default=20)
ap.add_argument("--tiny", action="store_true")
ap.add_argument("--out", default=None)
ap.add_argument("--repeats", type=int, default=5, help="rounds of timed runs (every mode once per round)")
ap.add_argument("--images", type=int, default=1, help="images per run (P2P: pairs); more makes the run GPU-bound")
ap.add_argument("--only", default="", help="comma-separated words: run only the modes whose name has one (and plain)")
args = ap.parse_args()

dev = start_comfyui(args.comfyui)
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.supported_models  # noqa: E402
import shapes  # noqa: E402

from comfyui_personalize.attention import reference  # noqa: E402
from comfyui_personalize.attention.align import swap_mapper  # noqa: E402
from comfyui_personalize.attention.local_blend import LocalBlend  # noqa: E402
from comfyui_personalize.nodes import dual_path as dual  # noqa: E402
from comfyui_personalize.nodes import dual_path_direct as dual_direct  # noqa: E402
from comfyui_personalize.nodes.attention_hooks import (  # noqa: E402
    COND,
    chunks,
    paired_rows,
    transformer_blocks,
)
from comfyui_personalize.nodes.comfy_adapter import ComfyHost  # noqa: E402
from comfyui_personalize.nodes.p2p_patches import (  # noqa: E402
    BlendRecorder,
    CrossPlan,
    install,
    install_cross,
    p2p_self_patch,
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


def sample(model, positive, negative, latent_batch, paired, lat, around, steps):
    """One KSampler run (inside the mode's ``around`` context); each P2P pair [source, target] shares its initial
    noise, as the node sets it up."""
    latent = torch.zeros(latent_batch, 4, lat, lat)
    noise = comfy.sample.prepare_noise(latent, 0, [i // 2 for i in range(latent_batch)] if paired else None)
    with around():
        return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", positive, negative, latent, seed=0,
                                   disable_pbar=True)


@contextlib.contextmanager
def by_modules():
    """The dual-path layer as on projections it cannot use as plain weights (lowvram, manual cast, fp8): through
    the modules, rank-r deltas after them."""
    plain_linear = dual_direct.plain_linear
    dual_direct.plain_linear = lambda module, like: None
    try:
        yield
    finally:
        dual_direct.plain_linear = plain_linear


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


def gpu_work(run) -> tuple[int, float] | tuple[None, None]:
    """(GPU operations launched: kernels, copies, memsets; their summed GPU time in ms) during ``run``. On a
    launch-bound host the wall time of a sampler step follows the count; on a GPU-bound one, the GPU time. Unlike
    the wall time, neither drifts from minute to minute."""
    if dev != "cuda":
        return None, None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    ops = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(ops), sum(e.time_range.elapsed_us() for e in ops) / 1000


def timed(run) -> float:
    t0 = time.perf_counter()
    run()
    if dev == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure_family(family, modes, lat):
    """``modes``: [(name, model, positive, negative, images, paired[, around])]. Warm-up, a sync count and the peak
    per mode, then ``--repeats`` rounds that run every mode once, in an order rotated per round: the host's speed
    drifts by tens of percent between minutes (the sampler is launch-bound), so each mode is compared with the plain
    run of the same round."""
    runs = {}
    for name, model, positive, negative, images, paired, *around in modes:
        go = functools.partial(sample, model, positive, negative, images, paired, lat,
                               around[0] if around else contextlib.nullcontext)
        go(2)  # load + warm-up
        syncs = count_syncs(lambda: go(2))
        kernels, gpu_ms = gpu_work(lambda: go(args.steps))  # a whole run: per-run builds count once, as in use
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        go(2)
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None
        runs[name] = dict(go=go, images=images, baseline=modes[1][0] if paired else "plain", syncs=syncs,
                          kernels=kernels, gpu_ms=gpu_ms, peak=peak, times=[])
    names = list(runs)
    for round_ in range(args.repeats):
        shift = round_ % len(names)  # each round starts at another mode: no mode always runs last (drift)
        for name in names[shift:] + names[:shift]:
            r = runs[name]
            r["times"].append(timed(lambda: r["go"](args.steps)) / r["images"])
    for name, r in runs.items():
        ref = runs[r["baseline"]]
        ratios = [t / b for t, b in zip(r["times"], ref["times"])]
        ratio_of = lambda k: None if r[k] is None else round(r[k] / ref[k], 3)  # noqa: E731
        row = dict(model=family, mode=name, images=r["images"], s_per_image=round(statistics.median(r["times"]), 3),
                   ratio=round(statistics.median(ratios), 3), runs=[round(t, 3) for t in r["times"]],
                   syncs_per_2_steps=r["syncs"], kernels_per_run=r["kernels"], kernel_ratio=ratio_of("kernels"),
                   gpu_ms_per_run=None if r["gpu_ms"] is None else round(r["gpu_ms"], 1),
                   gpu_time_ratio=ratio_of("gpu_ms"),
                   peak_gib=None if r["peak"] is None else round(r["peak"], 2))
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


def refine_plan() -> CrossPlan:
    """P2P refinement as the node builds it for a target with two words (tokens 5 and 6) inserted: the source's
    tokens 1-74 move to 1-4 and 7-76, the new tokens keep their own maps (alpha 0)."""
    mapper, alphas = torch.zeros(77, 77), torch.ones(77)
    for t in [*range(5), *range(7, 77)]:
        mapper[t if t < 5 else t - 2, t] = 1.0
    alphas[5:7] = 0.0  # no source token: their own maps
    return CrossPlan(mapper, alphas, torch.ones(77), ALL)


def attention_lora(model, rank=8, part=""):
    """A kohya-key rank-``rank`` LoRA on every attention projection (q/k/v/out of attn1 and attn2) whose name has
    ``part`` (a partial LoRA: the blocks left out run both prompt paths on the base weights)."""
    lora = {}
    for name, lin in ComfyHost(model, None, None).unet_lora_targets("attention").items():
        if part not in name:
            continue
        lora[f"{name}.lora_down.weight"] = torch.randn(rank, lin.in_features) * 0.01
        lora[f"{name}.lora_up.weight"] = torch.randn(lin.out_features, rank) * 0.01
        lora[f"{name}.alpha"] = torch.tensor(float(rank))
    return lora


def dual_path(model, hard, lora, paths):
    """The node itself (its patches, caches and run-start callbacks), a = 0.7 over the whole run."""
    with torch.inference_mode():
        return dual.PersonalizeDualPathBlend.execute(model=model, hard=hard, lora=lora, lora_name="none", a_blend=0.7,
                                                     paths=paths, start_percent=0.0, end_percent=1.0).args[0]


for family in args.models.split(","):
    config_class, unet_config, lat, dim, pooled = FAMILIES[family]
    base = model_for(config_class, unet_config)
    blocks = transformer_blocks(base)
    pos1, neg1, pos2 = cond(1, dim, pooled), cond(1, dim, pooled), cond(2, dim, pooled)
    n = args.images
    modes = [("plain", base, pos1, neg1, n, False), (f"plain batch {2 * n}", base, pos2, neg1, 2 * n, True)]
    w = torch.ones(77)
    w[5] = 2.5
    m = base.clone()
    m.set_model_attn2_patch(value_reweight_patch({COND: w}, ALL))
    modes.append(("reweight value", m, pos1, neg1, n, False))
    m = base.clone()
    install(m, blocks, "attn2", renormalized_replace({COND: w}, ALL))
    modes.append(("reweight renormalized", m, pos1, neg1, n, False))
    words = [([i], [i]) for i in range(1, 9)]
    mapper = swap_mapper(words, words, 77)
    plan = CrossPlan(mapper, torch.ones(77), torch.ones(77), ALL)
    m = base.clone()
    install_cross(m, blocks, plan, None)  # as the P2P node sets it up
    m.set_model_attn1_patch(p2p_self_patch(ALL, 4))
    modes.append(("p2p swap + self injection", m, pos2, neg1, 2 * n, True))
    m = base.clone()
    install_cross(m, blocks, refine_plan(), None)  # target tokens 5-6 new: plain attention + the edited targets
    m.set_model_attn1_patch(p2p_self_patch(ALL, 4))
    modes.append(("p2p refine + self injection", m, pos2, neg1, 2 * n, True))
    m = base.clone()
    lowest = min(4, 2 ** (len(base.model.diffusion_model.channel_mult) - 1))  # the node's map resolution
    recorder = BlendRecorder(LocalBlend(torch.tensor([3]), torch.tensor([3]), 0.3), lowest, float("inf"))
    install_cross(m, blocks, plan, recorder)  # as the node with blend words: the words' map columns only
    m.set_model_attn1_patch(p2p_self_patch(ALL, 4))
    m.set_model_sampler_post_cfg_function(recorder.post_cfg)
    modes.append(("p2p swap + local blend", m, pos2, neg1, 2 * n, True))
    m = base.clone()
    install(m, blocks, "attn2", reference_replace(plan, None))
    m.set_model_attn1_patch(p2p_self_patch(ALL, 4))
    modes.append(("p2p reference (maps materialised)", m, pos2, neg1, 2 * n, True))
    lora = attention_lora(base)
    cross = dual_path(base, pos1, lora, "cross")
    modes.append(("dual-path a=0.7 (cross)", cross, pos1, neg1, n, False))
    modes.append(("dual-path a=0.7 (cross, by modules)", cross, pos1, neg1, n, False, by_modules))
    modes.append(("dual-path a=0.7 (self+cross)", dual_path(base, pos1, lora, "self+cross"), pos1, neg1, n, False))
    up = "output_blocks" if family == "sdxl" else "up_blocks"  # kohya names: SDXL's are ComfyUI's, SD1.5's diffusers'
    partial = dual_path(base, pos1, attention_lora(base, part=up), "cross")
    modes.append(("dual-path a=0.7 (cross, partial LoRA: output blocks only)", partial, pos1, neg1, n, False))
    wanted = [w for w in args.only.split(",") if w]
    modes = [m for m in modes if m[0].startswith("plain") or not wanted or any(w in m[0] for w in wanted)]
    measure_family(family, modes, lat)
    mm.unload_all_models()
    del base, m, modes

table = [f"{args.images} image(s) per run (P2P: pairs), {args.steps} steps, {args.repeats} rounds", "",
         "| model | mode | s/image (median) | x plain (same batch and round) | GPU ops per run (x plain) "
         "| GPU ms per run (x plain) | syncs per 2 steps | peak GiB |", "|---|---|---|---|---|---|---|---|"]
for r in rows:
    table.append(f"| {r['model']} | {r['mode']} | {r['s_per_image']} | {r['ratio']:.2f} | {r['kernels_per_run']} "
                 f"({r['kernel_ratio']}) | {r['gpu_ms_per_run']} ({r['gpu_time_ratio']}) | "
                 f"{r['syncs_per_2_steps']} | {r['peak_gib']} |")
print("\n".join(table))
if args.out:
    Path(args.out).write_text("\n".join(table) + "\n\n" + "\n".join(json.dumps(r) for r in rows) + "\n")
