"""The objective's options inside the real trainer loop: prior preservation, min-SNR, offset noise, timestep
range, caption dropout, flips, accumulation, EMA and the learning-rate schedule."""
import math

import pytest
import torch

from comfyui_personalize.training.batches import BucketBatchSampler, LatentBucket, TrainingData
from comfyui_personalize.training.errors import InputError
from comfyui_personalize.training.lora import LoRANetwork
from comfyui_personalize.training.objective import Objective, lr_factor, prior_preservation_loss
from comfyui_personalize.training.task import DiffusionTask
from comfyui_personalize.training.trainer import TrainConfig, train

CAPTION, CLASS = "a photo of zwx dog", "a photo of dog"


def _latents(host, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return host.encode_images(torch.rand(n, 32, 32, 3, generator=g))


def _run(host, data, steps=1, net=None, record=None, **overrides):
    """Train a LoRA; ``record`` collects every (x_t, t, cond) the model sees."""
    net = net or LoRANetwork(host.unet_lora_targets("attention"), rank=2, alpha=2)
    task = host.task()
    if record is not None:
        inner = task.predict

        def predict(x_t, t, cond):
            record.append((x_t.detach().clone(), t.clone(), cond.context.detach().clone()))
            return inner(x_t, t, cond)

        task = DiffusionTask(predict, task.schedule, task.device, task.weight_dtype, task.checkpoint_blocks,
                             task.frozen_modules)
    cfg = TrainConfig(**{"steps": steps, "learning_rate": 1e-3, "batch_size": 2, "seed": 0, **overrides})
    with net.attached():
        losses = train(task, data, list(net.parameters()), cfg, frozen=net.disabled)
    return net, losses


def _prior_data(host, latents, class_latents, weight=1.0, **options):
    size = (latents.shape[-2] * 8, latents.shape[-1] * 8)
    bucket = LatentBucket(latents, [CAPTION] * len(latents), size, class_latents=class_latents)
    return TrainingData([bucket], lambda caps, s: host.encode_text(caps), prior="class_images",
                        prior_weight=weight, class_prompt=CLASS, **options).cache_conditioning()


def test_prior_loss_formula():
    """The class term carries its samples' min-SNR weights too (it was plain MSE: lambda then meant ~3.4 on a
    v-prediction model with min-SNR)."""
    per_sample, w = torch.tensor([1.0, 3.0, 10.0, 20.0]), torch.tensor([1.0, 0.5, 0.25, 0.5])
    assert prior_preservation_loss(per_sample, w, 2, 0.5).item() == pytest.approx((1 + 1.5) / 2 + 0.5 * (2.5 + 10) / 2)
    assert prior_preservation_loss(per_sample[:2], w[:2], 2, 0.5).item() == pytest.approx(1.25)


def test_class_half_is_the_class_images_with_the_class_prompt_and_weighted_by_lambda(host):
    latents, class_latents = _latents(host), _latents(host, n=3, seed=5) * 3
    record = []
    obj = Objective(timestep_min=0, timestep_max=0)  # x_t ~= x0: the batch's images can be recognised
    _run(host, _prior_data(host, latents, class_latents), record=record, objective=obj)
    x_t, _, ctx = record[0]
    assert x_t.shape[0] == 4  # one forward over the doubled batch
    for row in x_t[2:]:  # class half: class images only
        assert min((row - c).abs().max() for c in class_latents) < 0.1
    for row in x_t[:2]:
        assert min((row - c).abs().max() for c in latents) < 0.1
    class_ctx, inst_ctx = host.encode_text([CLASS]).context[0], host.encode_text([CAPTION]).context[0]
    assert all(torch.allclose(c, class_ctx) for c in ctx[2:]) and all(torch.allclose(c, inst_ctx) for c in ctx[:2])
    # Same seed, first step: the loss is exactly instance + lambda * class, so affine in lambda.
    first = [_run(host, _prior_data(host, latents, class_latents, weight=w))[1][0] for w in (1.0, 2.0, 4.0)]
    class_term = first[1] - first[0]
    assert class_term > 0 and first[2] - first[1] == pytest.approx(2 * class_term, rel=1e-4)


def test_prior_prediction_targets_the_frozen_model(host):
    latents = _latents(host)
    size = (latents.shape[-2] * 8, latents.shape[-1] * 8)

    def data(weight):
        return TrainingData([LatentBucket(latents, [CAPTION] * 2, size)], lambda caps, s: host.encode_text(caps),
                            prior="prior_prediction", prior_weight=weight, class_prompt=CLASS).cache_conditioning()

    # A fresh LoRA is the identity, so the class half already matches the frozen model: lambda does not matter.
    assert _run(host, data(1.0))[1][0] == pytest.approx(_run(host, data(5.0))[1][0], rel=1e-6)
    moved = LoRANetwork(host.unet_lora_targets("attention"), rank=2, alpha=2)
    with torch.no_grad():
        moved.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    snapshot = moved.weight.detach().clone()
    lo = _run(host, data(1.0), net=moved, learning_rate=1e-12)[1][0]
    moved.weight.data.copy_(snapshot)
    hi = _run(host, data(5.0), net=moved, learning_rate=1e-12)[1][0]
    assert hi > lo + 1e-4  # a LoRA that moved the model is pulled back on the class prompt


def test_min_snr_weights_match_the_formula():
    abar = torch.tensor([0.999, 0.9, 0.5, 0.01])
    snr = abar / (1 - abar)
    obj = Objective(min_snr_gamma=5.0)
    torch.testing.assert_close(obj.sample_weights(abar, "eps"), torch.minimum(snr, torch.tensor(5.0)) / snr)
    torch.testing.assert_close(obj.sample_weights(abar, "v"), torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))
    assert torch.equal(Objective().sample_weights(abar, "eps"), torch.ones(4))


def test_min_snr_changes_the_loss_and_timestep_range_is_respected(host):
    latents = _latents(host)
    data = TrainingData.single(latents, [CAPTION] * 2, lambda c, s: host.encode_text(c)).cache_conditioning()
    record = []
    _, plain = _run(host, data, steps=3, record=record, objective=Objective(timestep_min=100, timestep_max=120))
    assert all(100 <= int(t) <= 120 for _, ts, _ in record for t in ts)
    _, weighted = _run(host, data, steps=3, objective=Objective(min_snr_gamma=1.0, timestep_min=100,
                                                                timestep_max=120))
    assert weighted[0] < plain[0]  # at t~110 SNR >> 1, so min-SNR weights are small


def test_offset_noise_shifts_whole_channels():
    g = torch.Generator().manual_seed(0)
    plain = Objective().noise((64, 4, 16, 16), g, torch.device("cpu"))
    offset = Objective(noise_offset=0.5).noise((64, 4, 16, 16), g, torch.device("cpu"))
    assert plain.mean(dim=(2, 3)).std() < 0.15 < offset.mean(dim=(2, 3)).std()


def test_caption_dropout_and_flip_reach_the_model(host):
    latents = _latents(host, n=2)
    flipped = latents.flip(-1) + 5.0  # recognisable
    bucket = LatentBucket(latents, [CAPTION] * 2, (32, 32), flipped=flipped)
    data = TrainingData([bucket], lambda c, s: host.encode_text(c), caption_dropout=0.5).cache_conditioning()
    record = []
    _run(host, data, steps=8, record=record, objective=Objective(timestep_min=0, timestep_max=0))
    rows = torch.cat([x for x, _, _ in record])
    ctx = torch.cat([c for _, _, c in record])
    mirrored = (rows.mean(dim=(1, 2, 3)) > 2.5).float().mean()
    empty = host.encode_text([""]).context[0]
    dropped = torch.tensor([torch.allclose(c, empty) for c in ctx]).float().mean()
    assert 0.15 < mirrored < 0.85 and 0.15 < dropped < 0.85


def test_gradient_accumulation_runs_each_micro_batch(host):
    latents = _latents(host, n=3)
    data = TrainingData.single(latents, [CAPTION] * 3, lambda c, s: host.encode_text(c)).cache_conditioning()
    record = []
    _, losses = _run(host, data, steps=2, record=record, gradient_accumulation=3, batch_size=1)
    assert len(record) == 6 and len(losses) == 2


def test_ema_returns_the_average_of_the_trajectory(host):
    latents = _latents(host)
    data = TrainingData.single(latents, [CAPTION] * 2, lambda c, s: host.encode_text(c)).cache_conditioning()
    plain, _ = _run(host, data, steps=6, learning_rate=1e-2)
    ema, _ = _run(host, data, steps=6, learning_rate=1e-2, ema_decay=0.5)
    start = LoRANetwork(host.unet_lora_targets("attention"), rank=2, alpha=2).weight
    # EMA lags behind: between the start and the last weights, closer to the start than training got.
    assert 0 < (ema.weight - start).norm() < (plain.weight - start).norm()


def test_ema_warms_up_as_diffusers_and_is_what_training_returns(host):
    """decay_t = min(decay, (1 + t) / (10 + t)): with a fixed 0.999 the returned weights were mostly the start
    (0.999^500 = 61% of it after 500 steps)."""
    latents = _latents(host)
    data = TrainingData.single(latents, [CAPTION] * 2, lambda c, s: host.encode_text(c)).cache_conditioning()
    net = LoRANetwork(host.unet_lora_targets("attention"), rank=2, alpha=2)
    params = list(net.parameters())
    expected = [p.detach().clone() for p in params]
    raw = []

    def progress(step, _losses):  # after each optimiser step: the raw weights, and the EMA as it should be
        t = step - 1
        follow = 1 - min(0.999, (1 + t) / (10 + t))
        for e, p in zip(expected, params):
            e.lerp_(p.detach(), follow)
        raw.append([p.detach().clone() for p in params])

    cfg = TrainConfig(steps=5, learning_rate=1e-2, batch_size=2, seed=0, ema_decay=0.999)
    with net.attached():
        train(host.task(), data, params, cfg, progress=progress)
    for e, p, last in zip(expected, params, raw[-1]):
        torch.testing.assert_close(p.detach(), e)
        assert not torch.equal(p.detach(), last)  # the average, not the last weights


def test_with_ema_the_saves_every_n_steps_get_the_ema_and_training_goes_on_unchanged(host):
    """The saves every N steps wrote the raw weights while the result was the EMA."""
    latents = _latents(host)
    data = TrainingData.single(latents, [CAPTION] * 2, lambda c, s: host.encode_text(c)).cache_conditioning()

    def run(check_every):
        net = LoRANetwork(host.unet_lora_targets("attention"), rank=2, alpha=2)
        params = list(net.parameters())
        ema, seen = [p.detach().clone() for p in params], {}

        def progress(step, _losses):
            seen[step] = [p.detach().clone() for p in params]
            if not check_every:  # the EMA of the raw weights, as it should be after this step
                for e, p in zip(ema, params):
                    e.lerp_(p.detach(), 1 - min(0.9, step / (9 + step)))
                seen[step] = (seen[step], [e.clone() for e in ema])

        cfg = TrainConfig(steps=5, learning_rate=1e-2, batch_size=2, seed=0, ema_decay=0.9, check_every=check_every)
        with net.attached():
            train(host.task(), data, params, cfg, progress=progress)
        return params, seen

    plain, raw = run(0)
    saving, given = run(2)
    for step in (2, 4):  # what a save at these steps reads: the EMA so far
        for got, want in zip(given[step], raw[step][1]):
            torch.testing.assert_close(got, want)
    for step in (1, 3):  # other steps: the raw weights
        for got, want in zip(given[step], raw[step][0]):
            torch.testing.assert_close(got, want)
    for a, b in zip(saving, plain):  # the EMA was swapped back: the run and its result are unchanged
        torch.testing.assert_close(a.detach(), b.detach())


def test_lr_schedules():
    def f(step, schedule, warmup=0, total=10):
        return float(lr_factor(torch.tensor(step), total, schedule, warmup))

    assert f(0, "constant") == f(9, "constant") == 1.0
    assert f(0, "constant", warmup=4) == 0.25 and f(3, "constant", warmup=4) == 1.0
    assert f(0, "cosine") == 1.0 and f(5, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(10, "cosine") == pytest.approx(0.0, abs=1e-7) and f(5, "linear") == pytest.approx(0.5)
    with pytest.raises(InputError, match="lr_schedule"):
        lr_factor(torch.tensor(0), 10, "exp", 0)


def test_buckets_are_batched_separately_and_all_images_seen():
    sampler = BucketBatchSampler([3, 2], batch_size=2, seed=0)
    seen = {0: set(), 1: set()}
    for _ in range(6):
        bucket, rows = sampler.next()
        assert len(rows) == 2 and all(r < (3 if bucket == 0 else 2) for r in rows)
        seen[bucket].update(rows)
    assert seen == {0: {0, 1, 2}, 1: {0, 1}}


def test_two_buckets_train_end_to_end(host):
    square, wide = _latents(host, n=2), host.encode_images(torch.rand(2, 32, 48, 3))
    buckets = [LatentBucket(square, [CAPTION] * 2, (32, 32)), LatentBucket(wide, [CAPTION] * 2, (32, 48))]
    record = []
    data = TrainingData(buckets, lambda c, s: host.encode_text(c)).cache_conditioning()
    _, losses = _run(host, data, steps=4, record=record)
    assert {tuple(x.shape[-2:]) for x, _, _ in record} == {(4, 4), (4, 6)} and len(losses) == 4


@pytest.mark.parametrize("field,value", [("lr_schedule", "exp"), ("gradient_accumulation", 0),
                                         ("ema_decay", 1.0), ("warmup_steps", 10), ("max_grad_norm", -1.0),
                                         ("max_grad_norm", float("nan"))])
def test_bad_schedule_settings_name_the_input(field, value):
    with pytest.raises(InputError) as e:
        TrainConfig(steps=10, learning_rate=1e-4, **{field: value}).validate()
    assert e.value.input_name == field


@pytest.mark.parametrize("objective,name", [(Objective(min_snr_gamma=-1), "min_snr_gamma"),
                                            (Objective(min_snr_gamma=float("nan")), "min_snr_gamma"),
                                            (Objective(noise_offset=2), "noise_offset"),
                                            (Objective(timestep_min=10, timestep_max=5), "timestep_range")])
def test_bad_objective_names_the_input(objective, name):
    with pytest.raises(InputError) as e:
        objective.validate()
    assert e.value.input_name == name


def test_prior_with_the_text_side_training_encodes_the_class_prompt_every_step(host):
    """Uncached path (text encoder trains): captions, "" and the class prompt are encoded in one call per step."""
    latents, class_latents = _latents(host), _latents(host, n=3, seed=5)
    size = (latents.shape[-2] * 8, latents.shape[-1] * 8)
    calls = []

    def encode(captions, s):
        calls.append(list(captions))
        return host.encode_text(captions)

    bucket = LatentBucket(latents, [CAPTION] * 2, size, class_latents=class_latents)
    data = TrainingData([bucket], encode, caption_dropout=0.5, prior="class_images", class_prompt=CLASS)
    record = []
    _run(host, data, steps=2, record=record)
    assert calls == [[CAPTION, CAPTION, "", CLASS]] * 2
    class_ctx = host.encode_text([CLASS]).context[0]
    assert all(torch.allclose(c, class_ctx) for _, _, ctx in record for c in ctx[2:])
