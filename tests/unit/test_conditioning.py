"""Conditioning's hard prompts (the Dual-Path blend's, per row) through every batch operation and the trainer."""
import pytest
import torch

from comfyui_personalize.training.batches import LatentBucket, TrainingData
from comfyui_personalize.training.schedule import NoiseSchedule
from comfyui_personalize.training.task import Conditioning, DiffusionTask
from comfyui_personalize.training.trainer import TrainConfig, train

PROMPTS = {"a zwx dog": 1.0, "a zwx dog running": 2.0, "a zwx dog, sitting": 3.0, "": 10.0, "a dog": 20.0}
HARD = 1000.0  # a prompt's hard context is its own value plus this


def cond(values, length=4, hard=True, y=False):
    values = torch.tensor(values, dtype=torch.float32)
    c = Conditioning(values.view(-1, 1, 1).expand(-1, length, 3).clone(),
                     values.view(-1, 1).expand(-1, 2).clone() if y else None)
    return c.with_hard(Conditioning(c.context + HARD, None if c.y is None else c.y + HARD)) if hard else c


def test_batch_operations_keep_each_rows_hard_prompt():
    a, b = cond([1.0, 2.0], y=True), cond([10.0], hard=False, y=True)
    both = Conditioning.cat([a, b])
    assert both.hard.context[:, 0, 0].tolist() == [1 + HARD, 2 + HARD, 10.0]  # without one: its own prompt
    picked = both.select(torch.tensor([2, 0]))
    assert picked.hard.context[:, 0, 0].tolist() == [10.0, 1 + HARD]
    dropped = a.where(torch.tensor([True, False]), b.expand(2))
    assert dropped.context[:, 0, 0].tolist() == [10.0, 2.0]
    assert dropped.hard.context[:, 0, 0].tolist() == [10.0, 2 + HARD]
    first, rest = both.split(1)
    assert first.hard.y[:, 0].tolist() == [1 + HARD] and rest.hard.context[:, 0, 0].tolist() == [2 + HARD, 10.0]
    tail = a.with_y_tail(torch.tensor([[7.0], [8.0]]))
    assert tail.hard.y[:, 1].tolist() == [7.0, 8.0] and tail.hard.context is a.hard.context
    long = Conditioning.cat([cond([1.0], length=8), cond([2.0], length=4)])  # 154 and 77 tokens: repeated alike
    assert long.hard.context.shape == long.context.shape
    assert cond([4.0]).expand(3).hard.context.shape == (3, 4, 3) and a.plain().hard is None
    with pytest.raises(ValueError, match="pair"):
        a.with_hard(cond([1.0], hard=False))


class _AllPrompts:
    """A device prompt encoder: every prompt in one call."""

    def __init__(self, prompts):
        self.prompts = list(prompts)

    def __call__(self, size):
        return cond([PROMPTS[p] for p in self.prompts])


@pytest.mark.parametrize("device_encoder", [False, True])
def test_the_trainer_hands_every_row_its_own_hard_prompt(device_encoder):
    """Subject rows (with caption dropout's empty prompt) and class rows reach the model with their own hard prompt."""
    captions = ["a zwx dog", "a zwx dog running", "a zwx dog, sitting"]
    latents = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 4, 2, 2).clone()
    bucket = LatentBucket(latents, captions, (16, 16), class_latents=torch.zeros(2, 4, 2, 2))
    data = TrainingData([bucket], lambda caps, size: cond([PROMPTS[c] for c in caps]), caption_dropout=0.4,
                        prior="class_images", class_prompt="a dog")
    if device_encoder:
        data.prompt_encoder = _AllPrompts(data.prompts())
    weight = torch.nn.Parameter(torch.ones(()))
    seen = []

    def predict(x_t, t, c):
        seen.append((c.context[:, 0, 0].tolist(), c.hard.context[:, 0, 0].tolist()))
        return x_t * weight

    task = DiffusionTask(predict, NoiseSchedule(torch.linspace(0.99, 0.01, 1000)), torch.device("cpu"))
    train(task, data, [weight], TrainConfig(steps=12, learning_rate=1e-3, batch_size=2, seed=0))
    rows = [(soft, hard) for step in seen for soft, hard in zip(*step)]
    assert all(hard == soft + HARD for soft, hard in rows), rows
    used = {soft for soft, _ in rows}
    assert {10.0, 20.0} <= used and used & {1.0, 2.0, 3.0}  # dropped captions and class rows were among them
