"""Aspect-ratio buckets, cover-and-centre-crop resizing, and reading a folder of images with caption files."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_personalize.training.buckets import assign_buckets, bucket_size, fit_image
from comfyui_personalize.training.errors import InputError
from comfyui_personalize.training.image_folder import load_image_folder

SIZES = [(512, 512), (768, 512), (512, 768), (300, 1200), (1200, 300), (1000, 999), (64, 64), (3000, 4000),
         (720, 1280), (100, 101)]


@pytest.mark.parametrize("resolution,step", [(512, 64), (1024, 64), (256, 32)])
@pytest.mark.parametrize("height,width", SIZES)
def test_bucket_is_step_multiple_within_area_and_closest_aspect(resolution, step, height, width):
    h, w = bucket_size(height, width, resolution, step)
    assert h % step == 0 and w % step == 0 and h >= step and w >= step
    assert h * w <= resolution ** 2
    error = abs(math.log(w / h) - math.log(width / height))
    # no other step-multiple size within the area and the side limit is closer in aspect ratio
    for cw in range(step, 2 * resolution + 1, step):
        ch = min(2 * resolution, resolution ** 2 // cw // step * step)
        if ch >= step:
            assert error <= abs(math.log(cw / ch) - math.log(width / height)) + 1e-12


@pytest.mark.parametrize("side", [64, 100, 512, 4000])
def test_square_image_gets_the_resolution_square(side):
    assert bucket_size(side, side, 512) == (512, 512)
    assert bucket_size(side, side, 768) == (768, 768)


def test_wide_and_tall_buckets_mirror_each_other_and_keep_orientation():
    h, w = bucket_size(720, 1280, 512)
    assert w > h and bucket_size(1280, 720, 512) == (w, h)
    assert h * w > 0.85 * 512 ** 2  # buckets use nearly the whole pixel budget


def test_resolution_not_a_step_multiple_names_resolution():
    with pytest.raises(InputError) as err:
        bucket_size(100, 100, 500)
    assert err.value.input_name == "resolution"


def test_assign_buckets_groups_sorted_and_deterministic():
    sizes = [(512, 768), (512, 512), (768, 512), (100, 100), (520, 770)]
    groups = assign_buckets(sizes, 512)
    assert list(groups) == sorted(groups)
    assert sorted(i for indices in groups.values() for i in indices) == list(range(len(sizes)))
    assert groups[(512, 512)] == [1, 3]
    assert groups[bucket_size(512, 768, 512)] == [0, 4]  # same aspect, same bucket, in input order
    assert assign_buckets(list(sizes), 512) == groups
    assert list(assign_buckets(list(reversed(sizes)), 512)) == list(groups)  # bucket order ignores input order


def test_assign_buckets_disabled_puts_everything_in_the_square():
    assert assign_buckets([(512, 768), (300, 1200), (64, 64)], 512, enabled=False) == {(512, 512): [0, 1, 2]}
    assert assign_buckets([], 512) == {}


def test_fit_image_output_size_and_range():
    image = torch.rand(300, 500, 3)
    out = fit_image(image, (256, 384))
    assert out.shape == (256, 384, 3) and out.dtype == torch.float32
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_fit_image_is_identity_when_the_size_matches():
    image = torch.rand(64, 128, 3)
    assert fit_image(image, (64, 128)) is image


def test_fit_image_centre_crop_keeps_the_centre():
    # 64 x 256 image, black except a white band in the middle columns; a 64 x 64 crop must be the centre band
    image = torch.zeros(64, 256, 3)
    image[:, 112:144] = 1.0
    out = fit_image(image, (64, 64))
    assert out.shape == (64, 64, 3)
    torch.testing.assert_close(out[:, 16:48], torch.ones(64, 32, 3))
    torch.testing.assert_close(out[:, :16], torch.zeros(64, 16, 3))
    torch.testing.assert_close(out[:, 48:], torch.zeros(64, 16, 3))


def test_fit_image_downscale_averages():  # (upscaling warns once per image set: test_micro_conditioning)
    stripes = torch.zeros(192, 192, 3)
    stripes[:, ::2] = 1.0  # 1-px stripes: an antialiased 3x downscale is flat grey, plain sampling keeps stripes
    out = fit_image(stripes, (64, 64))
    torch.testing.assert_close(out[:, 2:-2], torch.full((64, 60, 3), 0.5), atol=0.02, rtol=0)  # edges pad
    assert fit_image(torch.rand(64, 64, 3), (192, 192)).shape == (192, 192, 3)


def _save(path, array, mode=None, **kwargs):
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode).save(path, **kwargs)


def test_load_folder_sorted_with_captions(tmp_path):
    _save(tmp_path / "b.png", np.full((64, 80, 3), 200))
    _save(tmp_path / "a.JPG", np.full((72, 64, 3), 10))
    _save(tmp_path / "c.webp", np.full((64, 64, 3), 100), lossless=True)
    (tmp_path / "b.txt").write_text("  a photo of\n{identifier} dog \n", encoding="utf-8")
    (tmp_path / "c.txt").write_text("   ", encoding="utf-8")  # blank: falls back to the template
    (tmp_path / "notes.txt").write_text("not a caption")
    (tmp_path / "sub").mkdir()
    _save(tmp_path / "sub" / "d.png", np.zeros((64, 64, 3)))  # sub-folders are not read
    items = load_image_folder(tmp_path)
    assert [tuple(image.shape) for image, _ in items] == [(72, 64, 3), (64, 80, 3), (64, 64, 3)]
    assert [caption for _, caption in items] == [None, "a photo of {identifier} dog", None]
    assert items[1][0].dtype == torch.float32
    torch.testing.assert_close(items[1][0], torch.full((64, 80, 3), 200 / 255))


def test_captions_in_utf16_are_read_and_other_encodings_refused(tmp_path, caplog):
    """Notepad's "Unicode" (UTF-16) caption trained on NUL and replacement characters; other image formats
    (.jfif, .tif, .gif) and unreadable photos (.heic) were skipped without a word."""
    for name in ("a.jfif", "b.tif", "c.gif"):
        _save(tmp_path / name, np.full((64, 64, 3), 200), None, **({"format": "JPEG"} if name.endswith("jfif") else {}))
    (tmp_path / "a.txt").write_bytes("a photo of {identifier} café".encode("utf-16"))
    (tmp_path / "b.txt").write_bytes("\ufeffa photo of {identifier} dog".encode("utf-8"))
    (tmp_path / "d.heic").write_bytes(b"not readable here")
    with caplog.at_level("WARNING"):
        items = load_image_folder(tmp_path)
    assert [caption for _, caption in items] == ["a photo of {identifier} café", "a photo of {identifier} dog", None]
    assert "d.heic" in caplog.text and "convert them to PNG or JPEG" in caplog.text
    Image.fromarray(np.full((64, 64), 0.5, np.float32), "F").save(tmp_path / "e.tif")  # was trained black
    with pytest.raises(InputError, match="e.tif: a floating-point image"):
        load_image_folder(tmp_path)
    (tmp_path / "e.tif").unlink()
    (tmp_path / "c.txt").write_bytes("a photo of caf\xe9".encode("latin-1"))
    with pytest.raises(InputError, match="c.txt is not UTF-8") as err:
        load_image_folder(tmp_path, "class_folder")
    assert err.value.input_name == "class_folder"


def test_load_folder_converts_rgba_grey_palette_to_rgb(tmp_path):
    rgba = np.zeros((64, 64, 4))
    rgba[..., 0] = 255
    rgba[:, :32, 3] = 255  # left half opaque red, right half transparent (stored black)
    _save(tmp_path / "1_rgba.png", rgba, "RGBA")
    _save(tmp_path / "2_grey.png", np.full((64, 64), 51), "L")
    Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).convert("P").save(tmp_path / "3_palette.png")
    Image.fromarray(np.full((64, 64), 65535 // 5, np.uint16)).save(tmp_path / "4_grey16.png")
    rgba_image, grey, palette, grey16 = [image for image, _ in load_image_folder(tmp_path)]
    assert all(image.shape == (64, 64, 3) for image in (rgba_image, grey, palette, grey16))
    torch.testing.assert_close(rgba_image[:, :32], torch.tensor([1.0, 0.0, 0.0]).expand(64, 32, 3))
    torch.testing.assert_close(rgba_image[:, 32:], torch.ones(64, 32, 3))  # composited on white
    torch.testing.assert_close(grey, torch.full((64, 64, 3), 0.2))
    torch.testing.assert_close(palette, torch.ones(64, 64, 3))
    torch.testing.assert_close(grey16, torch.full((64, 64, 3), 0.2), atol=1e-4, rtol=0)


def test_load_folder_applies_exif_orientation(tmp_path):
    array = np.zeros((64, 96, 3))
    array[:, :48] = 255  # landscape, left half white
    image = Image.fromarray(array.astype(np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    (loaded, _), = load_image_folder(tmp_path)
    assert loaded.shape == (96, 64, 3)  # portrait after rotation
    assert loaded[:40].mean() > 0.9 and loaded[56:].mean() < 0.1  # the white half is now on top


def test_load_folder_errors_name_the_input_and_the_problem(tmp_path):
    with pytest.raises(InputError, match="does not exist") as err:
        load_image_folder(tmp_path / "missing", "class_folder")
    assert err.value.input_name == "class_folder"
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        load_image_folder(tmp_path / "file.txt")
    with pytest.raises(InputError, match=r"\.png.*\.webp") as err:
        load_image_folder(tmp_path)
    assert err.value.input_name == "folder"
    _save(tmp_path / "good.png", np.zeros((64, 64, 3)))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(InputError, match="broken.jpg"):
        load_image_folder(tmp_path)


def test_load_folder_rejects_tiny_images_by_name(tmp_path):
    _save(tmp_path / "ok.png", np.zeros((64, 64, 3)))
    _save(tmp_path / "tiny.png", np.zeros((63, 200, 3)))
    with pytest.raises(InputError, match=r"tiny\.png is 200x63"):
        load_image_folder(tmp_path)


def test_load_folder_scales_big_images_down_to_the_short_side_it_needs(tmp_path):
    """A 12 MP phone photo kept whole is 140 MB of float32: twenty of them, or a class folder, ran out of RAM."""
    stripes = np.zeros((300, 400, 3))
    stripes[:, ::2] = 255
    _save(tmp_path / "big.png", stripes)
    _save(tmp_path / "small.png", np.full((64, 96, 3), 128))
    big, small = [image for image, _ in load_image_folder(tmp_path, max_short_side=120)]
    assert big.shape == (120, 160, 3) and small.shape == (64, 96, 3)  # the aspect ratio kept; small ones untouched
    torch.testing.assert_close(big.mean(), torch.tensor(0.5), atol=0.01, rtol=0)  # antialiased: stripes average
    assert [image.shape for image, _ in load_image_folder(tmp_path)][0] == (300, 400, 3)  # no cap: as stored
    assert fit_image(big, (96, 96)).shape == (96, 96, 3)


def test_load_folder_skips_hidden_files_such_as_macos_metadata(tmp_path):
    _save(tmp_path / "a.png", np.zeros((64, 64, 3)))
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # not an image
    assert len(load_image_folder(tmp_path)) == 1


def test_class_images_made_per_bucket_are_found_by_size_else_all_are_fitted():
    from comfyui_personalize.training.datasets import PriorPreservation

    square, tall = (torch.rand(64, 64, 3),) * 2, (torch.rand(128, 64, 3),) * 2
    prior = PriorPreservation("class_images", "a dog", images=square + tall,
                              by_bucket=(((64, 64), square), ((128, 64), tall)))
    assert prior.for_buckets([(128, 64)]) == {(128, 64): tall}
    assert prior.for_buckets([(64, 64), (64, 128)]) == {(64, 64): square + tall, (64, 128): square + tall}
    with pytest.raises(ValueError, match="as many"):
        PriorPreservation("class_images", "a dog", images=square + tall[:1],
                          by_bucket=(((64, 64), square), ((128, 64), tall[:1])))
