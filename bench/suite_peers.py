"""The diffusers peers of bench/train_suite.py: plain training loops as the diffusers example scripts write them
(train_dreambooth.py, textual_inversion.py, train_text_to_image_lora_sdxl.py), on UNet2DConditionModel /
transformers CLIPTextModel built from config dicts with random weights (nothing is downloaded).

Each builder returns ``run(steps)``, which trains ``steps`` more steps on the models it built; the caller times it.
Every loop clips gradients to norm 1 (as the scripts do, and as our trainer does by default) and leaves out the
scripts' per-step ``loss.item()`` (a host sync; leaving it out can only make the peer faster).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

# UNet2DConditionModel's defaults are SD1.5's blocks; these are the keys its config.json sets differently.
SD15_UNET = dict(cross_attention_dim=768, attention_head_dim=8)
SD15_UNET_TINY = dict(cross_attention_dim=768, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=2,
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the keys that differ from the defaults).
SDXL_UNET = dict(block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                                          "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
SDXL_UNET_TINY = dict(SDXL_UNET, block_out_channels=(32, 64), layers_per_block=1,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 1),
                      attention_head_dim=(2, 4))
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]

Run = Callable[[int], None]


def _mixed(dev: str) -> torch.dtype:
    """What accelerate's mixed_precision="bf16" gives: frozen weights and autocast in bf16 (fp32 on the CPU)."""
    return torch.bfloat16 if dev == "cuda" else torch.float32


def _autocast(dev: str):
    return torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda")


def _adamw(params, lr: float, dev: str, **kw) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, fused=True if dev == "cuda" else None, **kw)


def build_unet(config: dict, dev: str, dtype: torch.dtype):
    """Random init on the device itself (the SDXL UNet takes a minute to initialise on a CPU)."""
    from diffusers import UNet2DConditionModel

    with torch.device(dev):
        unet = UNet2DConditionModel(**config)
    return unet.to(dtype)


def _noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def dreambooth_prior(dev: str, tiny: bool, lat: int, batch: int, checkpointing: bool, lr: float = 5e-6,
                     prior_weight: float = 1.0) -> Run:
    """Full fine-tune, fp32 master weights in bf16 autocast, fused AdamW; every step trains ``batch`` instance
    and ``batch`` class latents in one forward (diffusers' with_prior_preservation)."""
    unet = build_unet(SD15_UNET_TINY if tiny else SD15_UNET, dev, torch.float32).train().requires_grad_(True)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    params = list(unet.parameters())
    opt = _adamw(params, lr, dev)
    sched = _noise_scheduler()
    n = max(8, batch)
    instance, klass = torch.randn(n, 4, lat, lat, device=dev), torch.randn(n, 4, lat, lat, device=dev)
    instance_ctx, class_ctx = torch.randn(n, 77, 768, device=dev), torch.randn(1, 77, 768, device=dev)

    def run(steps: int) -> None:
        for _ in range(steps):
            rows, class_rows = torch.randint(0, n, (batch,), device=dev), torch.randint(0, n, (batch,), device=dev)
            x0 = torch.cat([instance[rows], klass[class_rows]])
            ctx = torch.cat([instance_ctx[rows], class_ctx.expand(batch, -1, -1)])
            noise = torch.randn_like(x0)
            t = torch.randint(0, 1000, (2 * batch,), device=dev)
            with _autocast(dev):
                pred = unet(sched.add_noise(x0, noise, t), t, ctx).sample
            pred, pred_prior = pred.float().chunk(2)
            target, target_prior = noise.chunk(2)
            loss = F.mse_loss(pred, target) + prior_weight * F.mse_loss(pred_prior, target_prior)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    return run


def textual_inversion(dev: str, tiny: bool, lat: int, batch: int, clip_config: dict, tokenizer_dir: str,
                      lr: float = 5e-3) -> Run:
    """diffusers' textual_inversion.py: a placeholder token added to the tokenizer and the embedding table, the
    whole table in AdamW (weight decay 1e-2), every other row restored after each step (index_no_updates);
    text encoder fp32 in bf16 autocast, frozen UNet in bf16; the captions are tokenized every step."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_tokens(["<zwx>"])
    placeholder = tokenizer.convert_tokens_to_ids("<zwx>")
    init = tokenizer.encode("dog", add_special_tokens=False)[0]
    with torch.device(dev):
        text = CLIPTextModel(CLIPTextConfig.from_dict(clip_config))
    text.resize_token_embeddings(len(tokenizer))
    table = text.get_input_embeddings()
    with torch.no_grad():
        table.weight[placeholder] = table.weight[init].clone()
    model = getattr(text, "text_model", text)  # transformers 5 flattened text_model into the model
    for frozen in (model.encoder, model.final_layer_norm, model.embeddings.position_embedding):
        frozen.requires_grad_(False)
    text.train()
    unet = build_unet(SD15_UNET_TINY if tiny else SD15_UNET, dev, _mixed(dev)).requires_grad_(False)
    opt = _adamw(table.parameters(), lr, dev, weight_decay=1e-2)
    original = table.weight.detach().clone()
    keep = torch.ones(len(tokenizer), dtype=torch.bool, device=dev)
    keep[placeholder] = False
    sched = _noise_scheduler()
    n = max(8, batch)
    latents = torch.randn(n, 4, lat, lat, device=dev)
    captions = ["a photo of <zwx> dog"] * batch

    def run(steps: int) -> None:
        for _ in range(steps):
            ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt").input_ids.to(dev)
            x0 = latents[torch.randint(0, n, (batch,), device=dev)]
            noise = torch.randn_like(x0)
            t = torch.randint(0, 1000, (batch,), device=dev)
            with _autocast(dev):
                context = text(ids)[0].to(_mixed(dev))
                pred = unet(sched.add_noise(x0, noise, t), t, context).sample
            F.mse_loss(pred.float(), noise).backward()
            torch.nn.utils.clip_grad_norm_(table.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                table.weight[keep] = original[keep]

    return run


def sdxl_lora(dev: str, tiny: bool, lat: int, batch: int, checkpointing: bool, rank: int = 8,
              lr: float = 1e-4) -> Run:
    """diffusers+peft LoRA (rank = alpha, attention q/k/v/out) on the SDXL UNet: frozen weights in bf16, the
    adapters in fp32 (cast_training_params), bf16 autocast, SDXL's pooled-text and size conditioning."""
    from peft import LoraConfig

    unet = build_unet(SDXL_UNET_TINY if tiny else SDXL_UNET, dev, _mixed(dev)).requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=ATTENTION))
    unet.train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = _adamw(params, lr, dev)
    sched = _noise_scheduler()
    n = max(4, batch)
    latents = torch.randn(n, 4, lat, lat, device=dev)
    ctx, pooled = torch.randn(n, 77, 2048, device=dev), torch.randn(n, 1280, device=dev)
    size = float(lat * 8)
    time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]], device=dev).expand(batch, -1)

    def run(steps: int) -> None:
        for _ in range(steps):
            rows = torch.randint(0, n, (batch,), device=dev)
            x0 = latents[rows]
            noise = torch.randn_like(x0)
            t = torch.randint(0, 1000, (batch,), device=dev)
            with _autocast(dev):
                pred = unet(sched.add_noise(x0, noise, t), t, ctx[rows],
                            added_cond_kwargs={"text_embeds": pooled[rows], "time_ids": time_ids}).sample
            F.mse_loss(pred.float(), noise).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    return run
