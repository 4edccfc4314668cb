"""Fast-tune regularisers: the nearest-token contrastive term pulls a learned vector to its nearest real word and
away from the others; L2 toward the start is the squared distance; the trainer adds the term once per step."""
import pytest
import torch
import torch.nn.functional as F
from test_trainer import _data, _dataset

from comfyui_personalize.training.lora import LoRANetwork
from comfyui_personalize.training.regularizers import DistanceToStart, FastTuneRegularizer, NearestTokenContrastive
from comfyui_personalize.training.trainer import TrainConfig, train


def table(seed=0, rows=50, dim=16):
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))


def test_contrastive_target_is_the_nearest_real_token_and_a_step_moves_toward_it():
    words = table()
    start = 0.6 * words[7] + 0.4 * words[3]  # nearer to word 7 by cosine (checked below)
    term = NearestTokenContrastive(words, temperature=0.07)
    assert term.logits(start[None]).argmax().item() == F.cosine_similarity(start[None], words).argmax().item() == 7
    vector = start.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([vector], lr=0.05)
    first = term(vector[None]).item()
    for _ in range(20):
        optimizer.zero_grad()
        term(vector[None]).backward()
        optimizer.step()
    cos = lambda v, i: F.cosine_similarity(v[None], words[i][None]).item()  # noqa: E731
    assert term(vector[None]).item() < first
    assert cos(vector.detach(), 7) > cos(start, 7) and cos(vector.detach(), 3) < cos(start, 3)


def test_a_word_started_on_a_real_token_stays_there_when_tokens_share_a_direction():
    """Real token tables are anisotropic (every token leans along a common direction). With plain cosines, "away
    from every other token" pushed the word out along it: 18% of its length off the word in 25 Adam steps at Fast
    Tune's lr, out of the region real words occupy."""
    generator = torch.Generator().manual_seed(0)
    common = F.normalize(torch.randn(128, generator=generator), dim=0) * 0.25
    words = common + 0.037 * torch.randn(4096, 128, generator=generator)  # mean pairwise cosine ~0.25
    term = NearestTokenContrastive(words)
    vector = torch.nn.Parameter(words[1234].clone()[None])
    optimizer = torch.optim.AdamW([vector], lr=2e-3)
    for _ in range(25):
        optimizer.zero_grad()
        term(vector).backward()
        optimizer.step()
    assert ((vector.detach()[0] - words[1234]).norm() / words[1234].norm()).item() < 0.02


def test_the_pull_bounds_the_length_and_is_zero_at_the_word():
    words = table()
    term = NearestTokenContrastive(words)
    at_word = term(words[5][None])
    contrastive_only = F.cross_entropy(term.logits(words[5][None]), torch.tensor([5]))
    torch.testing.assert_close(at_word, contrastive_only)  # the pull adds nothing at the real word
    longer = (2 * words[5][None]).requires_grad_(True)  # same direction: the cosine part cannot see it
    assert term(longer).item() == pytest.approx(contrastive_only.item() + 1.0, rel=1e-4)
    term(longer).backward()
    assert (longer.grad * longer.detach()).sum() > 0  # descending the gradient shortens the vector


def test_the_nearest_token_is_chosen_again_each_call():
    words = table()
    term = NearestTokenContrastive(words)
    for index in (3, 9, 3):
        vector = (words[index] + 0.01 * words[0])[None].requires_grad_(True)
        term(vector).backward()
        step = -vector.grad[0]
        towards = F.cosine_similarity((vector.detach()[0] + 0.1 * step)[None], words[index][None]).item()
        assert towards > F.cosine_similarity(vector.detach(), words[index][None]).item() - 1e-6
        assert term.logits(vector.detach()).argmax().item() == index


def test_excluded_tokens_are_never_the_target():
    words = table()
    term = NearestTokenContrastive(words, exclude=[7])
    assert term.logits(words[7][None]).argmax().item() != 7  # the vector IS word 7, yet 7 is banned
    assert torch.isfinite(term(words[7][None].clone().requires_grad_(True)))


def test_distance_to_start_is_the_squared_distance_with_its_gradient():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.zeros(2, 2))
    distance = DistanceToStart([a, b])
    assert distance().item() == 0.0
    with torch.no_grad():
        a += torch.tensor([1.0, 0.0, -2.0])
        b += 0.5
    value = distance()
    assert value.item() == pytest.approx(1 + 4 + 4 * 0.25)
    value.backward()
    torch.testing.assert_close(a.grad, 2 * torch.tensor([1.0, 0.0, -2.0]))
    torch.testing.assert_close(b.grad, torch.ones(2, 2))


def test_fast_tune_regularizer_weights_its_parts():
    words = table()
    vector = torch.nn.Parameter(words[4:5] + 0.3)
    weight = torch.nn.Parameter(torch.ones(3))
    contrastive = {"clip_l": NearestTokenContrastive(words)}
    both = FastTuneRegularizer({"clip_l": vector}, contrastive, [weight], nn_weight=0.5, l2_weight=2.0)
    with torch.no_grad():
        weight += 1.0  # the distance counts from when the regulariser was made: 3 x 1^2
    expected = 0.5 * contrastive["clip_l"](vector) + 2.0 * 3.0
    torch.testing.assert_close(both(), expected)
    assert FastTuneRegularizer({"clip_l": vector}, contrastive, [weight], 0.0, 0.0)().item() == 0.0
    with pytest.raises(ValueError, match="clip_g"):
        FastTuneRegularizer({"clip_g": vector}, contrastive, [weight], 1.0, 1.0)


def test_trainer_adds_the_regularizer_once_per_step_and_it_holds_the_weights(host):
    latents, _ = _data(host)
    cfg = TrainConfig(steps=6, learning_rate=1e-2, batch_size=2, seed=0, gradient_accumulation=2)

    def run(l2_weight):
        net = LoRANetwork(host.unet_lora_targets("attention"), rank=4, alpha=4)
        params = list(net.parameters())
        start = [p.detach().clone() for p in params]
        calls = []
        distance = DistanceToStart(params)

        def regularizer():
            calls.append(1)
            return l2_weight * distance() + 1000.0  # a constant: changes no gradient, would show if reported
        with net.attached():
            losses = train(host.task(), _dataset(host, latents), params, cfg, regularizer=regularizer)
        moved = sum((p.detach() - s).square().sum().item() for p, s in zip(params, start))
        return losses, moved, len(calls)

    free, free_moved, calls = run(0.0)
    held, held_moved, _ = run(1e4)
    assert calls == cfg.steps  # once per optimiser step, not per micro-batch
    assert held_moved < 0.5 * free_moved, (held_moved, free_moved)
    assert held[0] == pytest.approx(free[0])  # the first step starts at the init: the L2 term is 0 there
    assert max(free + held) < 100  # the reported loss is the diffusion loss alone
