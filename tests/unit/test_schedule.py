import pytest
import torch
from diffusers import DDPMScheduler

from comfyui_personalize.headless.diffusers_adapter import sd_schedule
from comfyui_personalize.training.schedule import NoiseSchedule


@pytest.fixture()
def reference():
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_noising_matches_diffusers(reference):
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    ours = sd_schedule("eps").add_noise(x0, noise, t)
    torch.testing.assert_close(ours, reference.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)


def test_eps_target_is_the_noise():
    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    assert torch.equal(sd_schedule("eps").target(x0, noise, t), noise)


def test_v_target_formula_and_diffusers_velocity(reference):
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([1, 400, 999])
    sched = sd_schedule("v")
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    torch.testing.assert_close(sched.target(x0, noise, t), expected)
    torch.testing.assert_close(sched.target(x0, noise, t), reference.get_velocity(x0, noise, t), rtol=1e-5, atol=1e-5)


def test_from_sigmas_inverts_comfyui_sigma_definition():
    abar = sd_schedule().alphas_cumprod
    sigmas = ((1 - abar) / abar) ** 0.5  # how ComfyUI's ModelSamplingDiscrete stores the schedule
    torch.testing.assert_close(NoiseSchedule.from_sigmas(sigmas, "eps").alphas_cumprod, abar)


def test_unknown_prediction_rejected():
    with pytest.raises(ValueError, match="prediction"):
        NoiseSchedule(torch.ones(10), "flow")
