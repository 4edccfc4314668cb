"""SDXL's size/crop conditioning per training row, as diffusers' and SGM's SDXL training give it: each image's own
size and its crop in the bucket (mirrored for flipped rows), not "uncropped, already bucket-sized" for every image."""
import logging

import torch

from comfyui_personalize.training.batches import LatentBucket, TrainingData
from comfyui_personalize.training.data import build_training_data
from comfyui_personalize.training.datasets import InstanceDataset, PriorPreservation
from comfyui_personalize.training.lora import LoRANetwork
from comfyui_personalize.training.objective import Objective
from comfyui_personalize.training.task import Conditioning, DiffusionTask
from comfyui_personalize.training.trainer import TrainConfig, train


def _latents(pixels: torch.Tensor) -> torch.Tensor:
    return torch.zeros(pixels.shape[0], 4, pixels.shape[1] // 8, pixels.shape[2] // 8)


def test_rows_carry_each_images_size_and_crop_and_class_upscaling_warns_once(caplog):
    images = (torch.rand(64, 97, 3), torch.rand(40, 40, 3))  # wider than the square: cropped; small: upscaled
    dataset = InstanceDataset(images, ("a", "b"), resolution=64, bucketing=False, flip=True)
    prior = PriorPreservation("class_images", "a dog", images=(torch.rand(32, 32, 3),) * 3)
    seen = []

    def micro(rows, size):
        seen.append((list(rows), size))
        return torch.tensor(rows, dtype=torch.float32)

    with caplog.at_level(logging.WARNING):
        data = build_training_data(dataset, prior, _latents, lambda c, s: None, micro_conditioning=micro)
    (bucket,) = data.buckets
    assert bucket.size == (64, 64)
    # (original h, w, crop top, crop left); the 97-px-wide image is cropped 16 px from the left, and its mirror
    # image 17 px (left' = scaled width - left - bucket width: the mirrored pixels' offset)
    assert bucket.micro.tolist() == [[64, 97, 0, 16], [40, 40, 0, 0]]
    assert bucket.flipped_micro.tolist() == [[64, 97, 0, 17], [40, 40, 0, 0]]
    assert bucket.class_micro.tolist() == [[32, 32, 0, 0]] * 3
    assert all(size == (64, 64) for _, size in seen)
    warnings = [r.getMessage() for r in caplog.records if "upscaled" in r.getMessage()]
    assert warnings == ["3 class images upscaled up to 2.0x to fill a 64x64 bucket: they train blurry; make them "
                        "at the training resolution (the Prior-Preservation Dataset's width/height)"]


def test_without_a_host_function_rows_take_the_buckets_own():
    dataset = InstanceDataset((torch.rand(64, 96, 3),), ("a",), resolution=64, bucketing=False)
    bucket = build_training_data(dataset, None, _latents, lambda c, s: None).buckets[0]
    assert bucket.micro is None and bucket.flipped_micro is None and bucket.class_micro is None


def test_the_unet_sees_each_rows_size_crop_tail_flipped_and_class_rows_included(host):
    """The y the model gets: [pooled | tail], the tail of the row's image (mirrored or not) or class image."""
    n, tail = 3, 4
    latents = torch.stack([torch.full((4, 4, 4), 3.0 * (i + 1)) for i in range(n)])
    flipped, class_latents = -latents, torch.stack([torch.full((4, 4, 4), 30.0 + 3 * i) for i in range(2)])
    micro = torch.arange(n * tail, dtype=torch.float32).view(n, tail)
    class_micro = -1 - torch.arange(2.0 * tail).view(2, tail)
    bucket = LatentBucket(latents, ["a photo of zwx dog"] * n, (32, 32), flipped=flipped, class_latents=class_latents,
                          micro=micro, flipped_micro=micro + 100, class_micro=class_micro)

    def encode(captions, size):
        cond = host.encode_text(list(captions))
        return Conditioning(cond.context, torch.full((len(captions), 2 + tail), 7.0))  # pooled part = 7

    data = TrainingData([bucket], encode, prior="class_images", class_prompt="a photo of dog").cache_conditioning()
    seen, inner = [], host.task()

    def predict(x_t, t, cond):
        seen.append((x_t.detach().clone(), cond.y.detach().clone()))
        return inner.predict(x_t, t, Conditioning(cond.context))

    task = DiffusionTask(predict, inner.schedule, inner.device, inner.weight_dtype)
    net = LoRANetwork(host.unet_lora_targets("attention"), rank=2, alpha=2)
    cfg = TrainConfig(steps=4, learning_rate=1e-3, batch_size=2, seed=0,
                      objective=Objective(timestep_min=0, timestep_max=0))  # x_t ~= x0 tells the rows apart
    with net.attached():
        train(task, data, list(net.parameters()), cfg, frozen=net.disabled)
    sources = [(latents[i], micro[i]) for i in range(n)] + [(flipped[i], micro[i] + 100) for i in range(n)]
    class_sources = [(class_latents[i], bucket.class_micro[i]) for i in range(2)]
    mirrored = 0
    for x_t, y in seen:
        assert (y[:, :2] == 7.0).all()  # the pooled text part is the caption's
        for half, candidates in ((slice(0, 2), sources), (slice(2, 4), class_sources)):
            for x, row_y in zip(x_t[half], y[half]):
                image, expected = min(candidates, key=lambda c: (c[0] - x).abs().max())
                assert torch.equal(row_y[2:], expected)
                mirrored += int(image.mean() < 0)
    assert 0 < mirrored < 8  # both mirrored and plain rows were drawn


def test_a_large_photo_reads_the_same_from_a_folder_or_an_image_batch():
    """The folder loader keeps a photo at the resolution's size; a batch image of the full size counts the same."""
    full, kept = torch.rand(256, 384, 3), torch.rand(64, 96, 3)  # as given, and as the folder loader keeps it

    def rows(image):
        dataset = InstanceDataset((image,), ("a",), resolution=64, bucketing=False)
        return build_training_data(dataset, None, _latents, lambda c, s: None,
                                   micro_conditioning=lambda r, size: torch.tensor(r)).buckets[0].micro.tolist()
    assert rows(full) == rows(kept) == [[64, 96, 0, 16]]
