import pytest
import torch
from torch import nn

from comfyui_personalize.headless.diffusers_adapter import kohya_names
from comfyui_personalize.training.errors import InputError
from comfyui_personalize.training.lora import LoRANetwork, find_linear_targets


def _randomise(net: LoRANetwork, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in net.adapters.values():
            a.up.copy_(torch.randn(a.up.shape, generator=g))


def _weights(module: nn.Module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_attached_adapter_equals_dense_weight_update():
    layer = nn.Linear(16, 12)
    net = LoRANetwork({"lora_unet_x": layer}, rank=4, alpha=2.0)
    _randomise(net)
    x = torch.randn(5, 16)
    with net.attached():
        got = layer(x)
    dense = nn.functional.linear(x, layer.weight + net.adapters["lora_unet_x"].delta_weight(), layer.bias)
    torch.testing.assert_close(got, dense)


def test_matches_peft_lora_on_same_weights():
    from peft import LoraConfig, inject_adapter_in_model

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q = nn.Linear(8, 8)

    ours_model, peft_model = Net(), Net()
    peft_model.load_state_dict(ours_model.state_dict())
    net = LoRANetwork({"q": ours_model.to_q}, rank=2, alpha=4.0)
    _randomise(net)
    peft_model = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4.0, target_modules=["to_q"]), peft_model)
    with torch.no_grad():
        peft_model.to_q.lora_A["default"].weight.copy_(net.adapters["q"].down)
        peft_model.to_q.lora_B["default"].weight.copy_(net.adapters["q"].up)
    x = torch.randn(3, 8)
    with net.attached():
        torch.testing.assert_close(ours_model.to_q(x), peft_model.to_q(x))


def test_host_untouched_and_hooks_removed_even_on_error(tiny):
    targets = kohya_names(find_linear_targets(tiny.unet, ("attn1.to_q", "attn2.to_k")), "lora_unet")
    before = _weights(tiny.unet)
    net = LoRANetwork(targets, rank=2, alpha=2)
    _randomise(net)
    with pytest.raises(RuntimeError, match="boom"):
        with net.attached():
            assert all(len(m._forward_hooks) == 1 for m in targets.values())
            raise RuntimeError("boom")
    assert all(len(m._forward_hooks) == 0 for m in targets.values())
    after = _weights(tiny.unet)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p is q for p in net.parameters() for q in tiny.unet.parameters())


def test_new_network_is_an_identity(tiny):
    layer = kohya_names(find_linear_targets(tiny.unet, ("attn1.to_q",)), "lora_unet")
    net = LoRANetwork(layer, rank=4, alpha=4)
    m = next(iter(layer.values()))
    x = torch.randn(2, m.in_features)
    with net.attached():
        assert torch.equal(m(x), nn.functional.linear(x, m.weight, m.bias))


def test_kohya_state_dict_round_trip():
    layers = {"lora_unet_a_to_q": nn.Linear(6, 5), "lora_unet_a_to_k": nn.Linear(6, 7)}
    src = LoRANetwork(layers, rank=3, alpha=1.5)
    _randomise(src)
    sd = src.kohya_state_dict(torch.float32)
    assert set(sd) == {f"{n}.{s}" for n in layers for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert sd["lora_unet_a_to_k.lora_down.weight"].shape == (3, 6)
    assert sd["lora_unet_a_to_k.lora_up.weight"].shape == (7, 3)
    assert sd["lora_unet_a_to_k.alpha"].item() == 1.5
    dst = LoRANetwork(layers, rank=3, alpha=9.0)
    dst.load_kohya_state_dict(sd)
    for name in layers:
        torch.testing.assert_close(dst.adapters[name].delta_weight(), src.adapters[name].delta_weight())


def test_mismatched_file_rejected():
    layers = {"lora_unet_a": nn.Linear(6, 5)}
    sd = LoRANetwork(layers, rank=3, alpha=1).kohya_state_dict()
    with pytest.raises(ValueError, match="shapes"):
        LoRANetwork(layers, rank=2, alpha=1).load_kohya_state_dict(sd)
    with pytest.raises(ValueError, match="missing"):
        LoRANetwork({"lora_unet_b": nn.Linear(6, 5)}, rank=3, alpha=1).load_kohya_state_dict(sd)


@pytest.mark.parametrize("rank,alpha,name", [(0, 1.0, "rank"), (-2, 1.0, "rank"), (4, 0.0, "alpha")])
def test_bad_rank_or_alpha_names_the_input(rank, alpha, name):
    with pytest.raises(InputError) as e:
        LoRANetwork({"x": nn.Linear(2, 2)}, rank=rank, alpha=alpha)
    assert e.value.input_name == name


def test_non_linear_target_is_an_error():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q = nn.Conv2d(2, 2, 1)

    with pytest.raises(TypeError, match="not a Linear"):
        find_linear_targets(M(), ("to_q",))
