"""GPU check: the CUDA-graph training step computes what the eager step computes (same seed, same losses and
adapter weights), on a small ComfyUI UNet: plain, and with every objective option on (prior preservation,
caption dropout, flips, cosine schedule with warm-up, accumulation, EMA, min-SNR, offset noise); Textual Inversion
with the text side in the graph, and Fast Tune through the Dual-Path blend (its replaces and hard captions in the
graph); a toy SDXL UNet with per-row size/crop embeddings. Exit code 1 on mismatch.

Usage: python bench/check_cuda_graph.py COMFYUI_DIR
"""
import contextlib
import sys

sys.argv = [sys.argv[0], sys.argv[1], "--peers", "", "--tiny", "--res", "64"]
import torch  # noqa: E402
import train_lora as tl  # noqa: E402  (builds ComfyUI models the way the benchmark does)

from comfyui_personalize.nodes.comfy_adapter import ComfyHost  # noqa: E402
from comfyui_personalize.training.batches import LatentBucket, TrainingData  # noqa: E402
from comfyui_personalize.training.lora import LoRANetwork  # noqa: E402
from comfyui_personalize.training.objective import Objective  # noqa: E402
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
class_latents = torch.randn(6, 4, tl.LAT, tl.LAT, generator=g)


def everything_on() -> TrainingData:
    bucket = LatentBucket(latents, [""] * 4, (64, 64), flipped=latents.flip(-1),
                          class_latents=class_latents, cond=cond,
                          empty_cond=Conditioning(torch.zeros(1, 77, 768)), class_cond=Conditioning(cond.context[:1]))
    return TrainingData([bucket], None, caption_dropout=0.3, prior="class_images", prior_weight=0.7)


OPTIONS = dict(lr_schedule="cosine", warmup_steps=3, gradient_accumulation=2, ema_decay=0.9,
               objective=Objective(min_snr_gamma=5.0, noise_offset=0.1, timestep_min=20, timestep_max=980))
failed = False
for dtype, name, make_data, options in [("auto", "plain", lambda: TrainingData.encoded(latents, cond), {}),
                                        ("bf16", "plain", lambda: TrainingData.encoded(latents, cond), {}),
                                        ("auto", "all options", everything_on, OPTIONS)]:
    results = {}
    for graphed in (False, True):
        net = LoRANetwork(host.unet_lora_targets("attention"), 4, 4, seed=0).to(dev)
        with net.attached():
            losses = train(host.task(), make_data(), list(net.parameters()),
                           TrainConfig(steps=12, learning_rate=1e-3, batch_size=2, cuda_graph=graphed,
                                       report_every=4, dtype=dtype, **options))
        results[graphed] = (losses, {k: v.detach().clone() for k, v in net.state_dict().items()})
    (le, we), (lg, wg) = results[False], results[True]
    worst = max((we[k] - wg[k]).abs().max().item() for k in we)
    ok = all(abs(a - b) <= 1e-3 * max(1.0, abs(a)) for a, b in zip(le, lg)) and worst < 1e-3
    if torch.cuda.is_available() and warnings:  # the graph run silently fell back to eager steps
        print("capture failed:", warnings)
        ok = False
    print(dtype, name, "eager", [round(v, 5) for v in le])
    print(dtype, name, "graph", [round(v, 5) for v in lg])
    print(dtype, name, "max adapter difference", worst, "OK" if ok else "MISMATCH")
    failed |= not ok


def textual_inversion_case(graphed: bool, regularized: bool = False, blended: bool = False):
    """The TI step with the device prompt encoder (text side in the graph): losses and the learned vectors;
    ``regularized``: with the fast-tune regularisers (nearest-token contrastive, L2 to the start); ``blended``:
    with an attention LoRA, tuned through the Dual-Path blend at a = 0.6 (Fast Tune's a_blend)."""
    import comfy.sd
    import comfy.supported_models

    from comfyui_personalize.nodes.embeddings import clip_with_embeddings, init_ids, text_encoders, token_table
    from comfyui_personalize.training.embedding import TextualInversion, initial_vectors

    target = comfy.supported_models.SD15(dict(tl.SD15)).clip_target()
    clip = comfy.sd.CLIP(target=target, model_options={"clip_l_model_config": dict(
        num_hidden_layers=2, intermediate_size=128, num_attention_heads=4)})
    torch.manual_seed(0)
    with torch.no_grad():
        for p in clip.cond_stage_model.parameters():
            p.normal_(0, 0.02)
    ti_host = ComfyHost(host.model, clip, None)
    with torch.no_grad():
        vectors = {k: initial_vectors(token_table(e), init_ids(t, "dog"), 2) for k, (_, t, e) in
                   text_encoders(clip).items()}
    inversion = TextualInversion("zwx", vectors)
    ti_host.clip = clip_with_embeddings(clip, {"zwx": inversion.vectors})
    ti_host.cache_tokens = False
    data = TrainingData.single(latents, ["a photo of embedding:zwx dog", "embedding:zwx on grass"] * 2,
                               ti_host.encode_text, caption_dropout=0.3)
    ti_host.load_for_training(True)
    with torch.no_grad():
        data.prompt_encoder = ti_host.device_prompt_encoder(data.prompts(), data.buckets[0].size)
    assert data.prompt_encoder is not None, "the device prompt encoder fell back to ComfyUI's path"
    inversion.to(dev)
    params, attach, out = list(inversion.parameters()), contextlib.nullcontext(), dict(inversion.vectors)
    if blended:
        from comfyui_personalize.nodes.dual_path_training import TrainingBlend, with_hard_captions
        net = LoRANetwork(ti_host.unet_lora_targets("attention"), 4, 4, seed=0).to(dev)
        data = with_hard_captions(data, ti_host)
        params, attach, out = params + list(net.parameters()), TrainingBlend(ti_host, net, 0.6).attached(), \
            {**out, "lora": net.weight}
    regularizer = None
    if regularized:
        from comfyui_personalize.training.regularizers import FastTuneRegularizer, NearestTokenContrastive
        contrastive = {k: NearestTokenContrastive(token_table(e), exclude=[t.start_token, t.end_token]).to(dev)
                       for k, (_, t, e) in text_encoders(clip).items()}
        regularizer = FastTuneRegularizer(dict(inversion.vectors), contrastive, list(inversion.parameters()),
                                          0.5, 10.0)
    with ti_host.text_encoder_autograd(), attach:
        losses = train(ti_host.task(), data, params,
                       TrainConfig(steps=12, learning_rate=5e-3, batch_size=2, cuda_graph=graphed, report_every=4),
                       regularizer=regularizer)
    return losses, {k: v.detach().clone() for k, v in out.items()}


for regularized, blended in ((False, False), (True, False), (True, True)):
    label = ("textual inversion" + (" + fast-tune regularisers" if regularized else "")
             + (" + LoRA through the dual-path blend" if blended else ""))
    (le, we), (lg, wg) = (textual_inversion_case(False, regularized, blended),
                          textual_inversion_case(True, regularized, blended))
    worst = max((we[k] - wg[k]).abs().max().item() for k in we)
    ok = all(abs(a - b) <= 1e-3 * max(1.0, abs(a)) for a, b in zip(le, lg)) and worst < 1e-4
    if torch.cuda.is_available() and warnings:
        print("capture failed:", warnings)
        ok = False
    print(label, "eager", [round(v, 5) for v in le])
    print(label, "graph", [round(v, 5) for v in lg])
    print(label, "max vector difference", worst, "OK" if ok else "MISMATCH")
    failed |= not ok


def sdxl_micro_case(graphed: bool):
    """A toy SDXL UNet with per-row size/crop embeddings (flips and class images on): the y tails are gathered on
    the device inside the step."""
    import comfy.supported_models
    import comfy_models
    import shapes

    xl = ComfyHost(comfy_models.comfy_model(comfy.supported_models.SDXL, shapes.sdxl(tiny=True), dev.type), None,
                   None)
    xl.load_for_training(False)
    g = torch.Generator().manual_seed(1)
    n, lat = 4, 8
    xl_latents = torch.randn(n, 4, lat, lat, generator=g)
    y = torch.randn(n, 2816, generator=g)

    def tails(rows):
        return xl.micro_conditioning(rows, (lat * 8, lat * 8))

    bucket = LatentBucket(xl_latents, [""] * n, (lat * 8, lat * 8), flipped=xl_latents.flip(-1),
                          class_latents=torch.randn(3, 4, lat, lat, generator=g),
                          cond=Conditioning(torch.randn(n, 77, 2048, generator=g), y),
                          class_cond=Conditioning(torch.randn(1, 77, 2048, generator=g), y[:1]),
                          micro=tails([(64, 96, 0, 16), (40, 40, 0, 0), (64, 64, 0, 0), (128, 64, 32, 0)]),
                          flipped_micro=tails([(64, 96, 0, 17), (40, 40, 0, 0), (64, 64, 0, 0), (128, 64, 32, 0)]),
                          class_micro=tails([(32, 32, 0, 0)] * 3))
    data = TrainingData([bucket], None, prior="class_images")
    net = LoRANetwork(xl.unet_lora_targets("attention"), 4, 4, seed=0).to(dev)
    with net.attached():
        losses = train(xl.task(), data, list(net.parameters()),
                       TrainConfig(steps=12, learning_rate=1e-3, batch_size=2, cuda_graph=graphed, report_every=4))
    return losses, {k: v.detach().clone() for k, v in net.state_dict().items()}


(le, we), (lg, wg) = sdxl_micro_case(False), sdxl_micro_case(True)
worst = max((we[k] - wg[k]).abs().max().item() for k in we)
ok = all(abs(a - b) <= 1e-3 * max(1.0, abs(a)) for a, b in zip(le, lg)) and worst < 1e-3
if torch.cuda.is_available() and warnings:
    print("capture failed:", warnings)
    ok = False
print("sdxl size/crop rows eager", [round(v, 5) for v in le])
print("sdxl size/crop rows graph", [round(v, 5) for v in lg])
print("sdxl size/crop rows max adapter difference", worst, "OK" if ok else "MISMATCH")
failed |= not ok
sys.exit(1 if failed else 0)
