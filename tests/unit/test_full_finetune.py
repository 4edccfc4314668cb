"""DreamBooth's fp32 master copies: made one weight at a time as the host's tensors leave the modules."""
import weakref

import torch

from comfyui_personalize.training.full_finetune import FullFineTune


def test_copies_are_made_one_at_a_time_as_the_host_weights_leave(tiny, monkeypatch):
    """Made all at once beforehand, the host's UNet and the fp32 copies shared the device (SDXL: 14.6 GiB peak
    with Adafactor's fused step, whose training needs ~11)."""
    unet = tiny.unet
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    originals = [weakref.ref(p) for p in unet.parameters()]
    copies = FullFineTune(unet, "cpu")
    assert all(p.numel() == 0 for p in copies.parameters())  # nothing held twice before the swap
    still_alive = []
    make = FullFineTune._make

    def spy(self, copy, original):
        still_alive.append(sum(ref() is not None for ref in originals))
        make(self, copy, original)
    monkeypatch.setattr(FullFineTune, "_make", spy)
    with copies.swapped_in():
        assert dict(unet.named_parameters()).keys() == before.keys()
        for name, p in unet.named_parameters():  # the copies, in fp32, with the host's values
            assert p.dtype == torch.float32 and torch.equal(p, before[name].float())
    # each copy is made while the host still holds only the tensors not yet swapped out
    assert still_alive == list(range(len(originals), 0, -1))
    for name, p in unet.named_parameters():  # the host's own values back afterwards
        assert torch.equal(p, before[name])
    name, first = next(iter(copies.named_weights()))
    with torch.no_grad():
        first.add_(1.0)  # as a step would
    with copies.swapped_in():  # a second swap keeps what was trained instead of copying again
        assert torch.equal(dict(unet.named_parameters())[name], before[name].float() + 1.0)
