"""DreamBooth's fp32 master copies: made one weight at a time as the host's tensors leave the modules, turned into
their differences to the start (on the CPU) as the host's tensors come back."""
import weakref

import torch

from comfyui_personalize.training.full_finetune import FullFineTune


def test_copies_exist_only_during_the_swap_and_never_beside_their_host_tensor(tiny, monkeypatch):
    """Made all at once beforehand, or kept while the host's weights came back, the host's UNet and the fp32
    copies shared the device (SDXL with Adafactor's fused step: 14.6 GiB peak, the training itself 12.4)."""
    unet = tiny.unet
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    originals = [weakref.ref(p) for p in unet.parameters()]
    copies = FullFineTune(unet, "cpu")
    assert all(p.numel() == 0 for p in copies.parameters())  # nothing held twice before the swap
    still_alive = []
    make = FullFineTune._make

    def spy(self, copy, name):
        still_alive.append(sum(ref() is not None for ref in originals))
        make(self, copy, name)
    monkeypatch.setattr(FullFineTune, "_make", spy)
    with copies.swapped_in():
        assert dict(unet.named_parameters()).keys() == before.keys()
        for name, p in unet.named_parameters():  # the copies, in fp32, with the host's values
            assert p.dtype == torch.float32 and torch.equal(p, before[name].float())
        name, first = next(iter(copies.named_weights()))
        with torch.no_grad():
            first.add_(1.0)  # as a step would
        torch.testing.assert_close(copies.deltas(torch.float32)[name], torch.ones_like(first))  # from the copy
    # each host tensor had left before its copy was made
    assert still_alive == list(range(len(originals) - 1, -1, -1))
    for n, p in unet.named_parameters():  # the host's own values back afterwards
        assert torch.equal(p, before[n])
    assert all(p.numel() == 0 for p in copies.parameters())  # the copies are gone, their differences kept
    kept = copies.deltas(torch.float32)
    torch.testing.assert_close(kept[name], torch.ones_like(before[name]))
    assert all(not d.any() for n, d in kept.items() if n != name)
    with copies.swapped_in():  # a second swap continues from what was trained
        torch.testing.assert_close(dict(unet.named_parameters())[name], before[name].float() + 1.0)


def test_the_kept_differences_take_the_save_dtype(tiny):
    copies = FullFineTune(tiny.unet, "cpu", delta_dtype=torch.float16)
    with copies.swapped_in():
        pass
    assert {d.dtype for d in copies._deltas.values()} == {torch.float16}
    assert {d.dtype for d in copies.deltas(torch.float32).values()} == {torch.float32}
