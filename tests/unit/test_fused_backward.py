"""Adafactor stepped inside backward (optimizer ``adafactor_fused``): the same training as Adafactor, with at most
one gradient alive at a time."""
import pytest
import torch

from comfyui_personalize.training import trainer
from comfyui_personalize.training.batches import TrainingData
from comfyui_personalize.training.errors import InputError
from comfyui_personalize.training.full_finetune import FullFineTune
from comfyui_personalize.training.optimizers import FusedBackward, make_optimizer, state_bytes
from comfyui_personalize.training.trainer import TrainConfig, train


def _full_fine_tune(tiny, host, optimizer, spy=None, **overrides):
    """A few DreamBooth-style steps (every UNet weight, fp32 copies swapped in) from the same start."""
    torch.manual_seed(0)
    images = torch.rand(2, 32, 32, 3)
    data = TrainingData.single(host.encode_images(images), ["a photo of zwx dog"] * 2,
                               lambda caps, size: host.encode_text(caps)).cache_conditioning()
    copies = FullFineTune(tiny.unet, "cpu")
    cfg = TrainConfig(**{"steps": 2, "learning_rate": 1e-3, "batch_size": 2, "seed": 0, "max_grad_norm": 0.0,
                         "gradient_checkpointing": True, "optimizer": optimizer, **overrides})
    with copies.swapped_in():
        if spy is not None:
            spy(list(copies.parameters()))
        train(host.task(), data, list(copies.parameters()), cfg)
    return copies


def test_fused_trains_exactly_like_adafactor_with_one_gradient_alive_at_a_time(tiny, host):
    """Same weights as Adafactor's step after backward (the lr schedule reaches every per-weight optimiser)."""
    alive, schedule = [], {"lr_schedule": "cosine"}  # the second step at half the learning rate

    def count_alive(params):  # registered before the fused hooks: sees each gradient as it arrives
        for p in params:
            p.register_post_accumulate_grad_hook(lambda _: alive.append(sum(q.grad is not None for q in params)))

    start = {n: w.detach().clone() for n, w in tiny.unet.named_parameters()}
    plain = dict(_full_fine_tune(tiny, host, "adafactor", **schedule).named_weights())
    fused = _full_fine_tune(tiny, host, "adafactor_fused", spy=count_alive, **schedule)
    params = list(fused.parameters())
    assert len(alive) == 2 * len(params) and max(alive) == 1  # the hooks freed each gradient after its step
    moved = 0
    for name, w in fused.named_weights():
        torch.testing.assert_close(w, plain[name], rtol=0, atol=1e-6)  # nothing read a weight after its update
        moved += not torch.equal(w, start[name])
    assert moved == len(params)  # every weight trained
    # afterwards only the spy's hook is left on each weight
    assert all(p.grad is None and len(p._post_accumulate_grad_hooks) == 1 for p in params)


def test_each_gradient_is_clipped_on_its_own():
    """The global norm is only known after backward: fused clips every weight's gradient to max_grad_norm. (Two
    steps: Adafactor's first update does not depend on the gradient's scale.)"""
    big, small = torch.nn.Parameter(torch.ones(4, 4)), torch.nn.Parameter(torch.ones(4, 4))
    reference = [p.detach().clone().requires_grad_() for p in (big, small)]
    fused = make_optimizer("adafactor_fused", [([big, small], 0.1)], torch.device("cpu"), False, max_grad_norm=0.5)
    expected = make_optimizer("adafactor", [(reference, 0.1)], torch.device("cpu"), False)
    for scale in (100.0, 0.01):  # the clipped first gradient sets the second moment the second step divides by
        with fused:
            (scale * big.sum() + 0.01 * small.sum()).backward()
        assert big.grad is None and small.grad is None
        grads = [torch.full((4, 4), scale), torch.full((4, 4), 0.01)]
        grads[0] *= min(1.0, 0.5 / grads[0].norm().item())  # clipped alone; the small one is under the limit
        for p, g in zip(reference, grads):
            p.grad = g
        expected.step()
        torch.testing.assert_close(big.detach(), reference[0].detach(), rtol=0, atol=1e-7)
        torch.testing.assert_close(small.detach(), reference[1].detach(), rtol=0, atol=1e-7)
    (big.sum()).backward()  # outside ``with``: no hook is left, the gradient stays for the caller
    assert big.grad is not None and isinstance(fused, FusedBackward)


def test_what_fused_cannot_do_is_refused_naming_the_input(tiny, host, monkeypatch):
    with pytest.raises(InputError) as e:
        TrainConfig(steps=4, learning_rate=1e-3, optimizer="adafactor_fused", gradient_accumulation=2).validate()
    assert e.value.input_name == "gradient_accumulation" and "choose adafactor" in str(e.value)
    # fp16 loss scaling (a GPU without bf16): an overflowing step would already be applied
    monkeypatch.setattr(trainer, "resolve_precision", lambda *a: trainer.Precision(None, True))
    with pytest.raises(InputError) as e:
        _full_fine_tune(tiny, host, "adafactor_fused", steps=1)
    assert e.value.input_name == "optimizer" and "fp16" in str(e.value)


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_state_bytes_are_what_the_optimiser_keeps(name):
    """DreamBooth's memory check counted Adafactor's state as nothing; a 3x3 convolution's factored state is two
    thirds of the weight (SD1.5's UNet: ~2 bytes per weight, 1.7 GiB)."""
    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in ((8, 6, 3, 3), (5, 7), (9,))]
    optimizer = make_optimizer(name, [(params, 1e-3)], torch.device("cpu"), False)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    kept = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if torch.is_tensor(t) and t.dim() > 0)
    assert state_bytes(name, [p.shape for p in params]) == kept
