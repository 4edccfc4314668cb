"""Prior-Preservation Dataset inside real ComfyUI: KSampler-identical class images, cached and resumable."""
import numpy as np
import pytest
import torch
from comfy_tiny import weights_hash
from PIL import Image
from test_train_lora import run_node

pytestmark = pytest.mark.host

ARGS = dict(mode="generate", class_noun="dog", class_prompt="", negative_prompt="blurry", num_class_images=3,
            prior_loss_weight=1.0, width=64, height=64, steps=2, cfg=5.0, sampler_name="euler",
            scheduler="normal", seed=11, batch_size=2, folder="")


@pytest.fixture()
def node(comfy):
    from comfyui_personalize.nodes.prior_dataset import PersonalizePriorDataset
    return PersonalizePriorDataset


@pytest.fixture()
def dirs(comfy, tmp_path):
    """ComfyUI's output and input folders pointed at a fresh temp dir for the test."""
    fp = comfy.folder_paths
    old = fp.get_output_directory(), fp.get_input_directory()
    (tmp_path / "output").mkdir()
    (tmp_path / "input").mkdir()
    fp.set_output_directory(str(tmp_path / "output"))
    fp.set_input_directory(str(tmp_path / "input"))
    yield tmp_path
    fp.set_output_directory(old[0])
    fp.set_input_directory(old[1])


def cache_folders(dirs):
    root = dirs / "output" / "personalize_class_images"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def generate(node, tiny_sd15, **overrides):
    model, clip, vae = tiny_sd15
    return run_node(node, model=model, clip=clip, vae=vae, **dict(ARGS, **overrides)).result


class SamplerCalls:
    """Counts the images comfy.sample.sample is asked for; with ``fail`` set it refuses to sample at all."""

    def __init__(self, monkeypatch, fail=False):
        import comfy.sample
        self.images, self.fail = [], fail
        self.real = getattr(comfy.sample.sample, "real", comfy.sample.sample)  # not an earlier SamplerCalls
        monkeypatch.setattr(comfy.sample, "sample", self)

    def __call__(self, model, noise, *args, **kwargs):
        if self.fail:
            raise AssertionError("sampled although every image is cached")
        self.images.append(noise.shape[0])
        return self.real(model, noise, *args, **kwargs)


def ksampler_image(comfy, tiny_sd15, seed):
    """What KSampler + VAEDecode make from the same settings, batch of one."""
    model, clip, vae = tiny_sd15
    pos = comfy.nodes.CLIPTextEncode().encode(clip, "a photo of a dog")[0]
    neg = comfy.nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    with torch.inference_mode():
        latent = comfy.nodes.EmptyLatentImage().generate(64, 64, 1)[0]
        samples = comfy.nodes.common_ksampler(model, seed, 2, 5.0, "euler", "normal", pos, neg, latent)[0]
        return comfy.nodes.VAEDecode().decode(vae, samples)[0][0].cpu()


def test_generates_like_ksampler_caches_and_reloads_without_sampling(comfy, tiny_sd15, node, dirs, monkeypatch):
    import comfy.model_management as mm
    model, clip, vae = tiny_sd15
    mm.unload_all_models()
    before = [weights_hash(m) for m in (model.model, clip.cond_stage_model, vae.first_stage_model)]
    calls = SamplerCalls(monkeypatch)
    prior, preview = generate(node, tiny_sd15)
    assert calls.images == [2, 1]  # batch_size 2
    assert prior.mode == "class_images" and prior.class_prompt == "a photo of a dog" and prior.weight == 1.0
    assert len(prior.images) == 3 and all(img.shape == (64, 64, 3) for img in prior.images)
    assert preview.shape == (3, 64, 64, 3)
    (folder,) = cache_folders(dirs)
    assert folder.name.startswith("a_photo_of_a_dog_")
    assert sorted(p.name for p in folder.iterdir()) == ["00000.png", "00001.png", "00002.png", "settings.json"]
    # Image i is KSampler's image for seed + i (within 8-bit PNG rounding).
    for i in (0, 1, 2):
        # On a GPU a batch of 2 runs other kernels than a batch of 1: equal up to rounding, not to the bit.
        atol = 0.5 / 255 + 1e-4 if tiny_sd15[0].load_device.type == "cpu" else 0.03
        torch.testing.assert_close(prior.images[i], ksampler_image(comfy, tiny_sd15, ARGS["seed"] + i),
                                   rtol=0, atol=atol)
    assert (prior.images[0] - prior.images[1]).abs().max() > 0.01  # seeds differ per image

    SamplerCalls(monkeypatch, fail=True)
    again, _ = generate(node, tiny_sd15)  # rerun: from disk only
    assert all(torch.equal(a, b) for a, b in zip(again.images, prior.images))
    fewer, preview = generate(node, tiny_sd15, num_class_images=2)
    assert len(fewer.images) == 2 and torch.equal(fewer.images[1], prior.images[1])
    assert preview.shape[0] == 2

    calls = SamplerCalls(monkeypatch)
    more, _ = generate(node, tiny_sd15, num_class_images=5)
    assert calls.images == [2]  # only the two missing images
    assert all(torch.equal(a, b) for a, b in zip(more.images[:3], prior.images))
    assert len(cache_folders(dirs)) == 1

    mm.unload_all_models()
    assert [weights_hash(m) for m in (model.model, clip.cond_stage_model, vae.first_stage_model)] == before


@pytest.mark.parametrize("sampler_name", ["euler", "euler_ancestral"])
def test_interrupted_run_resumes_to_the_same_images(comfy, tiny_sd15, node, dirs, monkeypatch, sampler_name):
    import comfy.model_management as mm
    args = dict(sampler_name=sampler_name, num_class_images=3)
    uninterrupted, _ = generate(node, tiny_sd15, **args)
    for folder in cache_folders(dirs):  # start again from an empty cache
        for p in folder.iterdir():
            p.unlink()

    checks = []

    def cancel_on_second_batch():
        checks.append(1)
        if len(checks) == 2:
            raise mm.InterruptProcessingException()

    monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", cancel_on_second_batch)
    with pytest.raises(mm.InterruptProcessingException):
        generate(node, tiny_sd15, **args)
    (folder,) = cache_folders(dirs)
    first_batch = 2 if sampler_name == "euler" else 1  # ancestral samplers run one image at a time
    assert len(list(folder.glob("*.png"))) == first_batch
    assert not list(folder.glob(".*"))  # no temp files left

    monkeypatch.undo()
    calls = SamplerCalls(monkeypatch)
    resumed, _ = generate(node, tiny_sd15, **args)
    assert sum(calls.images) == 3 - first_batch
    assert all(torch.equal(a, b) for a, b in zip(resumed.images, uninterrupted.images))


def test_cache_key_follows_prompt_and_patches(comfy, tiny_sd15, node, dirs):
    import comfy.model_management as mm

    from comfyui_personalize.nodes.prior_fingerprint import model_fingerprints
    model, clip, vae = tiny_sd15
    generate(node, tiny_sd15, num_class_images=1)
    generate(node, tiny_sd15, num_class_images=1, class_noun="cat")
    generate(node, tiny_sd15, num_class_images=1, class_prompt="a photo of a dog", negative_prompt="")
    assert len(cache_folders(dirs)) == 3

    base = model_fingerprints(model, clip, vae)
    assert model_fingerprints(model.clone(), clip.clone(), vae) == base  # a clone is the same model
    key = "diffusion_model.input_blocks.1.1.proj_in.weight"
    weight = model.model.state_dict()[key]
    patched = model.clone()
    assert patched.add_patches({key: ("diff", (0.01 * torch.randn_like(weight),))}) == [key]
    assert model_fingerprints(patched, clip, vae)["model"] != base["model"]
    weaker = model.clone()
    weaker.add_patches({key: patched.patches[key][0][1]}, strength_patch=0.5)
    assert model_fingerprints(weaker, clip, vae)["model"] not in (base["model"],
                                                                 model_fingerprints(patched, clip, vae)["model"])
    # While the patched clone is loaded its diff sits in the shared weights; the base fingerprint must not move.
    mm.load_models_gpu([patched], force_full_load=True)
    try:
        assert model_fingerprints(model, clip, vae)["model"] == base["model"]
    finally:
        mm.unload_all_models()

    clip_key = next(k for k in clip.cond_stage_model.state_dict() if k.endswith("q_proj.weight"))
    patched_clip = clip.clone()
    patched_clip.add_patches({clip_key: ("diff", (torch.ones_like(clip.cond_stage_model.state_dict()[clip_key]),))})
    assert model_fingerprints(model, patched_clip, vae)["clip"] != base["clip"]
    skip = clip.clone()
    skip.clip_layer(-2)
    assert model_fingerprints(model, skip, vae)["clip"] != base["clip"]


def test_an_embedding_retrained_under_its_name_makes_new_class_images(comfy, tiny_sd15, node, dirs, monkeypatch):
    """The key held the prompt's text: after zwx.safetensors was retrained, the class images of the old embedding
    came back from the cache."""
    import copy

    from safetensors.torch import save_file
    model, clip, vae = tiny_sd15
    (dirs / "embeddings").mkdir()
    stock = clip.clone()  # as CheckpointLoader gives it: the tokenizer reads embedding files from the folder
    stock.tokenizer = copy.copy(clip.tokenizer)
    stock.tokenizer.clip_l = copy.copy(clip.tokenizer.clip_l)
    stock.tokenizer.clip_l.embedding_directory = [str(dirs / "embeddings")]
    args = dict(ARGS, num_class_images=1, class_prompt="a photo of embedding:zwx dog")
    for scale in (1.0, 3.0):
        save_file({"clip_l": scale * torch.randn(1, 768, generator=torch.Generator().manual_seed(0))},
                  str(dirs / "embeddings" / "zwx.safetensors"))
        calls = SamplerCalls(monkeypatch)
        run_node(node, model=model, clip=stock, vae=vae, **args)
        assert calls.images == [1], scale  # sampled again for the retrained file
    assert len(cache_folders(dirs)) == 2
    SamplerCalls(monkeypatch, fail=True)
    run_node(node, model=model, clip=stock, vae=vae, **args)  # the same file again: from the cache


def test_cache_key_follows_the_settings_a_model_patch_keeps_in_its_function(comfy, tiny_sd15):
    """RescaleCFG and FreeU patch with closures: their settings were not in the key, so another multiplier reused
    the class images made with the first."""
    from comfy_extras.nodes_freelunch import FreeU
    from comfy_extras.nodes_model_advanced import RescaleCFG

    from comfyui_personalize.nodes.prior_fingerprint import model_fingerprints
    model, clip, vae = tiny_sd15

    def key(patched):
        return model_fingerprints(patched, clip, vae)["model"]

    assert key(RescaleCFG().patch(model, 0.7)[0]) == key(RescaleCFG().patch(model, 0.7)[0])  # a rerun hits
    assert key(RescaleCFG().patch(model, 0.7)[0]) != key(RescaleCFG().patch(model, 1.0)[0])
    assert key(FreeU().patch(model, 1.1, 1.2, 0.9, 0.2)[0]) == key(FreeU().patch(model, 1.1, 1.2, 0.9, 0.2)[0])
    assert key(FreeU().patch(model, 1.1, 1.2, 0.9, 0.2)[0]) != key(FreeU().patch(model, 1.5, 1.6, 0.2, 0.2)[0])
    rescale = RescaleCFG().patch(model, 0.7)[0]
    assert key(rescale) != key(model)


def test_folder_mode_returns_the_folders_images(comfy, node, dirs):
    folder = dirs / "input" / "class_dogs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), rng.integers(0, 256, (80, 64, 3), dtype=np.uint8)]
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(folder / f"{i}.png")
    args = dict(ARGS, mode="folder", folder="class_dogs", prior_loss_weight=0.5)
    prior, preview = run_node(node, **args).result  # no model needed
    assert prior.mode == "class_images" and prior.weight == 0.5 and len(prior.images) == 2
    for image, array in zip(prior.images, arrays):
        assert torch.equal(image, torch.from_numpy(array).float() / 255)
    assert preview.shape == (2, 64, 64, 3)
    assert run_node(node, **dict(args, folder=str(folder))).result[0].images[1].shape == (80, 64, 3)  # absolute


def test_prior_prediction_needs_no_model(comfy, node, dirs):
    prior, preview = run_node(node, **dict(ARGS, mode="prior_prediction", class_noun="cat")).result
    assert prior.mode == "prior_prediction" and prior.images == () and prior.class_prompt == "a photo of a cat"
    owl = run_node(node, **dict(ARGS, mode="prior_prediction", class_noun="owl")).result[0]
    assert owl.class_prompt == "a photo of an owl"  # as the Identifier node's class_prompt output says it
    assert preview.shape == (1, 64, 64, 3)
    assert not cache_folders(dirs)


@pytest.mark.parametrize("override,input_name", [
    ({"num_class_images": 0}, "num_class_images"),
    ({"class_noun": "  "}, "class_noun"),
    ({"width": 60}, "width"),
    ({"prior_loss_weight": 0.0}, "prior_loss_weight"),
    ({"cfg": float("nan")}, "cfg"),
    ({"cfg": float("inf")}, "cfg"),  # through a link: no cache key holds it
    ({"mode": "folder", "folder": ""}, "folder"),
    ({"mode": "folder", "folder": "../outside"}, "folder"),
    ({"mode": "folder", "folder": "missing"}, "folder"),
])
def test_bad_inputs_name_the_input(comfy, tiny_sd15, node, dirs, override, input_name):
    from comfyui_personalize.training.errors import InputError
    with pytest.raises(InputError) as err:
        generate(node, tiny_sd15, **override)
    assert err.value.input_name == input_name
    assert not cache_folders(dirs)


def test_generate_without_model_names_the_missing_input(comfy, tiny_sd15, node, dirs):
    from comfyui_personalize.training.errors import InputError
    model, clip, vae = tiny_sd15
    for missing in ("model", "clip", "vae"):
        inputs = {"model": model, "clip": clip, "vae": vae}
        del inputs[missing]
        with pytest.raises(InputError) as err:
            run_node(node, **ARGS, **inputs)
        assert err.value.input_name == missing


def test_size_zero_is_the_models_native_size(comfy, tiny_sd15, node, dirs, monkeypatch):
    """A fixed 512 default made SDXL's class images at 512, upscaled 2x into its 1024 buckets."""
    from comfy import supported_models
    from comfy_tiny import TINY_SDXL, tiny_unet_patcher

    import comfyui_personalize.nodes.prior_dataset as prior_dataset
    from comfyui_personalize.nodes.comfy_adapter import native_resolution
    assert native_resolution(tiny_sd15[0]) == 512
    assert native_resolution(tiny_unet_patcher(supported_models.SDXL, TINY_SDXL, seed=4)) == 1024
    monkeypatch.setattr(prior_dataset, "native_resolution", lambda model: 72)  # CPU-sized stand-in for 512
    prior = generate(node, tiny_sd15, width=0, height=0)[0]
    assert [tuple(image.shape) for image in prior.images] == [(72, 72, 3)] * 3
    SamplerCalls(monkeypatch, fail=True)
    cached = generate(node, tiny_sd15, width=72, height=72)[0]  # the same images: 0 was resolved before the key
    assert all(torch.equal(a, b) for a, b in zip(prior.images, cached.images))


def two_bucket_dataset():
    """A portrait and a square photo at resolution 192: two aspect-ratio buckets."""
    from comfyui_personalize.training.datasets import InstanceDataset
    g = torch.Generator().manual_seed(3)
    images = (torch.rand(288, 192, 3, generator=g), torch.rand(192, 192, 3, generator=g))
    return InstanceDataset(images, ("a photo of zwx dog",) * 2, resolution=192)


def test_with_the_dataset_class_images_are_made_at_each_buckets_size_and_train_unfitted(comfy, tiny_sd15, node,
                                                                                        dirs, caplog):
    """Connected to the Instance Dataset, the class images are made at its buckets' sizes (none is cropped or
    upscaled into a bucket of another shape), num_class_images split between them, each bucket its own seeds."""
    from comfyui_personalize.training.buckets import assign_buckets
    from comfyui_personalize.training.data import build_training_data

    dataset = two_bucket_dataset()
    sizes = list(assign_buckets([tuple(im.shape[:2]) for im in dataset.images], 192))
    assert len(sizes) == 2
    prior, preview = generate(node, tiny_sd15, num_class_images=3, width=0, height=0, dataset=dataset)
    assert [size for size, _ in prior.by_bucket] == sizes
    assert all(len(images) == 2 and all(im.shape[:2] == size for im in images) for size, images in prior.by_bucket)
    assert len(prior.images) == 4 and len(cache_folders(dirs)) == 2
    first = [images[0] for _, images in prior.by_bucket]
    assert not torch.equal(first[0][:128, :128], first[1][:128, :128])  # other seeds, not one image reshaped

    def encode(pixels):  # the class latents are the images themselves, not a fitted copy
        return pixels.permute(0, 3, 1, 2)[:, :, ::8, ::8].float()
    data = build_training_data(dataset, prior, encode, lambda captions, size: None)
    for bucket in data.buckets:
        torch.testing.assert_close(bucket.class_latents, encode(torch.stack(dict(prior.by_bucket)[bucket.size])))
    # a dataset of the square bucket alone takes that bucket's images
    square = dataclass_replace(dataset, images=dataset.images[1:], captions=dataset.captions[1:])
    (bucket,) = build_training_data(square, prior, encode, lambda captions, size: None).buckets
    torch.testing.assert_close(bucket.class_latents, encode(torch.stack(dict(prior.by_bucket)[(192, 192)])))
    # trained on a dataset of another bucket: every class image fitted to it, with a warning
    landscape = dataclass_replace(dataset, images=(dataset.images[0].transpose(0, 1),), captions=dataset.captions[:1])
    with caplog.at_level("WARNING"):
        (bucket,) = build_training_data(landscape, prior, encode, lambda captions, size: None).buckets
    assert bucket.class_latents.shape[0] == 4 and "made for other subject buckets" in caplog.text


def test_per_bucket_sets_rerun_from_the_cache_when_the_count_or_the_buckets_change(comfy, tiny_sd15, node, dirs,
                                                                                      monkeypatch):
    """A bucket's seeds follow its size alone: more images generate only the missing ones, fewer none, a new bucket
    only its own; the square bucket shares the cache of generating at that size without a dataset. The preview
    shows every bucket, each at its own aspect ratio."""
    dataset = two_bucket_dataset()
    args = dict(width=0, height=0, dataset=dataset)
    first, _ = generate(node, tiny_sd15, num_class_images=2, **args)
    calls = SamplerCalls(monkeypatch)
    more, preview = generate(node, tiny_sd15, num_class_images=4, **args)
    assert sum(calls.images) == 2 and len(cache_folders(dirs)) == 2  # one new image per bucket, same folders
    assert all(torch.equal(a[0], b[0]) for (_, a), (_, b) in zip(first.by_bucket, more.by_bucket))
    SamplerCalls(monkeypatch, fail=True)
    generate(node, tiny_sd15, num_class_images=2, **args)  # fewer: all cached
    generate(node, tiny_sd15, num_class_images=1, width=192, height=192)  # the square bucket's own cache
    calls = SamplerCalls(monkeypatch)
    landscape = dataset.images[0].transpose(0, 1)  # a photo that sorts before the two buckets
    wide = dataclass_replace(dataset, images=dataset.images + (landscape,), captions=dataset.captions[:1] * 3)
    wider, _ = generate(node, tiny_sd15, num_class_images=3, width=0, height=0, dataset=wide)
    assert sum(calls.images) == 1 and len(wider.by_bucket) == 3  # the new landscape bucket only
    images = dict(more.by_bucket)
    assert [size for size, _ in more.by_bucket] == [(192, 192), (256, 128)]
    assert preview.shape == (4, 192, 192, 3)  # at the first image's size, the buckets interleaved
    torch.testing.assert_close(preview[0], images[(192, 192)][0])
    tall = preview[1]  # 256x128 fitted inside 192x192: 144 px wide, black at both sides
    assert tall[:, :20].abs().max() == 0 and tall[:, -20:].abs().max() == 0 and tall[:, 96].abs().max() > 0


def test_the_dataset_input_needs_width_and_height_at_0(comfy, tiny_sd15, node, dirs):
    from comfyui_personalize.training.errors import InputError
    with pytest.raises(InputError) as e:
        generate(node, tiny_sd15, dataset=two_bucket_dataset())
    assert e.value.input_name == "width"
    with pytest.raises(InputError) as e:
        generate(node, tiny_sd15, width=0, height=64, dataset=two_bucket_dataset())
    assert e.value.input_name == "height"
    with pytest.raises(InputError) as e:
        generate(node, tiny_sd15, width=0, height=0, dataset="not a dataset")
    assert e.value.input_name == "dataset"


def dataclass_replace(obj, **changes):
    import dataclasses
    return dataclasses.replace(obj, **changes)
