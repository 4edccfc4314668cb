"""ImageReward preprocessing equals the official torchvision pipeline fed the picture ComfyUI's SaveImage
writes, for several sizes/aspects and for gray and RGBA images."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from comfyui_personalize.scoring.preprocess import CLIP_MEAN, CLIP_STD, center_crop_box, preprocess, resized_size
from comfyui_personalize.training.errors import InputError

OFFICIAL = transforms.Compose([  # ImageReward/ImageReward.py _transform(224), verbatim
    transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
    transforms.CenterCrop(224),
    lambda image: image.convert("RGB"),
    transforms.ToTensor(),
    transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
])


def _comfy_images(count, height, width, channels, seed=0):
    """Smooth gradients plus noise: resampling differences show up, unlike on flat images."""
    g = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, height).view(1, height, 1, 1)
    x = torch.linspace(0, 1, width).view(1, 1, width, 1)
    phase = torch.rand(count, 1, 1, channels, generator=g)
    base = 0.5 + 0.4 * torch.sin(6.0 * (x + y * 0.7) + 6.28 * phase)
    return (base + 0.15 * torch.randn(count, height, width, channels, generator=g)).clamp(0, 1)


def _saved_by_comfy(image: torch.Tensor) -> Image.Image:
    """ComfyUI nodes.SaveImage: ``255. * image.cpu().numpy()``, clip, astype(uint8) (truncates)."""
    array = np.clip(255.0 * image.cpu().numpy(), 0, 255).astype(np.uint8)
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


@pytest.mark.parametrize("height, width, channels", [
    (256, 256, 3), (300, 200, 3), (200, 300, 3), (224, 224, 3), (225, 227, 3), (226, 229, 3),
    (512, 384, 3), (333, 199, 3), (64, 48, 3), (240, 320, 1), (256, 300, 4), (100, 120, 4),
])
def test_equals_the_official_transform(height, width, channels):
    images = _comfy_images(2, height, width, channels)
    got, _ = preprocess(images)
    want = torch.stack([OFFICIAL(_saved_by_comfy(image)) for image in images])
    assert got.shape == (2, 3, 224, 224) and got.dtype == torch.float32
    assert (got - want).abs().max() <= 1e-6


def test_rgba_uses_pil_premultiplied_resize_not_a_plain_channel_drop():
    images = _comfy_images(1, 300, 260, 4)
    images[..., 3] = (torch.arange(260) % 2).float()  # alternating transparent / opaque columns
    got, notes = preprocess(images)
    dropped, _ = preprocess(images[..., :3].contiguous())
    want = OFFICIAL(_saved_by_comfy(images[0]))
    assert (got[0] - want).abs().max() <= 1e-6 and (got - dropped).abs().max() > 0.1
    assert any("alpha" in n for n in notes)


def test_notes_for_gray_small_and_plain_images():
    assert preprocess(_comfy_images(1, 256, 256, 3))[1] == []
    gray_notes = preprocess(_comfy_images(1, 256, 256, 1))[1]
    assert len(gray_notes) == 1 and "one channel" in gray_notes[0]
    small_notes = preprocess(_comfy_images(3, 64, 96, 3))[1]
    assert len(small_notes) == 1 and "96x64" in small_notes[0] and "upsampled" in small_notes[0]


def test_saveimage_truncation_is_what_reaches_the_model():
    value = 100.7 / 255  # SaveImage writes 100, not 101
    got, _ = preprocess(torch.full((1, 224, 224, 3), value))
    expected = (100 / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(got[0, :, 0, 0], expected, atol=1e-6)
    clipped, _ = preprocess(torch.full((1, 224, 224, 3), 1.7))
    assert torch.allclose(clipped[0, :, 0, 0], (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD), atol=1e-6)


def test_size_arithmetic_matches_torchvision():
    assert resized_size(300, 200) == (336, 224)  # long side int(224 * 300 / 200)
    assert resized_size(199, 333) == (224, 374)  # 374.83 truncated
    assert resized_size(224, 224) == (224, 224)
    assert center_crop_box(225, 227) == (0, 2, 224, 226)  # round(0.5) = 0, round(1.5) = 2 (ties to even)


def test_batch_equals_images_one_by_one():
    images = _comfy_images(5, 280, 350, 3, seed=4)
    batched, _ = preprocess(images)
    for i in range(5):
        assert torch.equal(batched[i:i + 1], preprocess(images[i:i + 1])[0])


@pytest.mark.parametrize("cpus", [1, None])
def test_batch_on_one_cpu_equals_threaded(monkeypatch, cpus):
    """One worker (a 1-vCPU machine, or os.cpu_count() unknown) converted image 0 only and left the rest of the
    batch as uninitialised memory."""
    images = _comfy_images(3, 280, 350, 3, seed=5)
    with monkeypatch.context() as patch:  # first, so its buffer cannot reuse the threaded call's memory
        patch.setattr("comfyui_personalize.scoring.preprocess.os.cpu_count", lambda: cpus)
        one_worker, _ = preprocess(images)
    torch.testing.assert_close(one_worker, preprocess(images)[0], rtol=0, atol=0)


@pytest.mark.parametrize("images, match", [
    (torch.rand(1, 32, 32, 2), "2 channels"),
    (torch.rand(0, 32, 32, 3), "empty"),
    (torch.rand(32, 32, 3), "batch, height, width, channels"),
])
def test_bad_images_are_input_errors(images, match):
    with pytest.raises(InputError, match=match) as e:
        preprocess(images)
    assert e.value.input_name == "images"


def test_large_half_precision_images_are_not_mistaken_for_nan():
    images = torch.full((1, 512, 512, 3), 0.5, dtype=torch.float16)  # its pixel sum overflows float16
    pixels, _ = preprocess(images)
    assert torch.isfinite(pixels).all()


def test_nan_image_is_named():
    images = torch.rand(3, 32, 32, 3)
    images[2, 5, 5, 1] = float("nan")
    with pytest.raises(InputError, match="image 2 contains NaN"):
        preprocess(images)
