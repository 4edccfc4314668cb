"""Personalize Instance Dataset inside real ComfyUI: batches and folders become one InstanceDataset with finished
captions; bad inputs name the input."""
import numpy as np
import pytest
import torch
from PIL import Image
from test_train_lora import run_node

pytestmark = pytest.mark.host

ARGS = dict(caption="a photo of {identifier} {class}", identifier="sks", class_noun="dog", resolution=64,
            bucketing=True, flip=True, caption_dropout=0.1)


@pytest.fixture(scope="module")
def node(comfy):
    from comfyui_personalize.nodes.dataset import PersonalizeInstanceDataset
    return PersonalizeInstanceDataset


@pytest.fixture()
def input_dir(comfy, tmp_path):
    previous = comfy.folder_paths.get_input_directory()
    comfy.folder_paths.set_input_directory(str(tmp_path))
    yield tmp_path
    comfy.folder_paths.set_input_directory(previous)


def batch(n=2, height=64, width=64, channels=3):
    with torch.inference_mode():  # IMAGE tensors arrive as inference tensors from upstream nodes
        return torch.rand(n, height, width, channels, generator=torch.Generator().manual_seed(0))


def write_folder(folder, captions):
    folder.mkdir()
    for i, (name, text) in enumerate(captions.items()):
        Image.fromarray(np.full((64, 128, 3), 40 * i, np.uint8)).save(folder / f"{name}.png")
        if text is not None:
            (folder / f"{name}.txt").write_text(text, encoding="utf-8")


def test_image_batch_gives_trainable_images_with_filled_captions(node):
    from comfyui_personalize.training.datasets import InstanceDataset
    images = batch(2, channels=4)
    out = run_node(node, images=images, **ARGS)
    dataset = out.result[0]
    assert isinstance(dataset, InstanceDataset) and len(dataset) == 2
    assert dataset.captions == ("a photo of sks dog", "a photo of sks dog")
    assert (dataset.resolution, dataset.bucketing, dataset.flip, dataset.caption_dropout) == (64, True, True, 0.1)
    first = dataset.images[0]
    assert first.shape == (64, 64, 3) and not first.is_inference()
    alpha = images[0, ..., 3:]
    torch.testing.assert_close(first, images[0, ..., :3] * alpha + (1 - alpha))  # composited on white
    first.mul_(1.0)  # trainers may work in place outside inference mode
    (torch.nn.Linear(3, 3)(first).sum()).backward()  # and through autograd
    summary = out.ui.as_dict()["text"][0]
    assert "2 images" in summary and "64x64: 2" in summary and "a photo of sks dog" in summary


def test_load_images_mask_makes_transparent_parts_white_as_in_a_folder(comfy, node, input_dir):
    """Load Image drops a PNG's alpha from its IMAGE (the colour stored under it, here black, was trained) and
    gives it as MASK; a folder composites the same file on white."""
    rgba = np.zeros((64, 96, 4), np.uint8)
    rgba[..., 0], rgba[:, :48, 3] = 255, 255  # left half opaque red, right half transparent (stored black)
    Image.fromarray(rgba, "RGBA").save(input_dir / "cutout.png")
    image, mask = comfy.nodes.LoadImage().load_image("cutout.png")
    from_batch = run_node(node, images=image, mask=mask, **ARGS).result[0].images[0]
    (input_dir / "folder").mkdir()
    (input_dir / "cutout.png").rename(input_dir / "folder" / "cutout.png")
    from_folder = run_node(node, folder="folder", **ARGS).result[0].images[0]
    torch.testing.assert_close(from_batch, from_folder)
    torch.testing.assert_close(from_batch[:, 48:], torch.ones(64, 48, 3))
    plain, no_alpha = comfy.nodes.LoadImage().load_image("folder/cutout.png")[0], torch.zeros(1, 64, 64)
    torch.testing.assert_close(run_node(node, images=batch(1), mask=no_alpha, **ARGS).result[0].images[0],
                               batch(1)[0])  # Load Image's 64x64 zero mask of a file without alpha changes nothing
    from comfyui_personalize.training.errors import InputError
    with pytest.raises(InputError) as e:
        run_node(node, images=plain, mask=torch.ones(1, 32, 32), **ARGS)
    assert e.value.input_name == "mask"


def test_folder_captions_win_and_batch_comes_first(node, input_dir):
    write_folder(input_dir / "subject", {"b": "{identifier} on a sofa", "a": None})
    out = run_node(node, images=batch(1), **dict(ARGS, folder="subject", caption="one {class}\ntwo\nthree",
                                                  resolution=128))
    dataset = out.result[0]
    assert [tuple(image.shape) for image in dataset.images] == [(64, 64, 3), (64, 128, 3), (64, 128, 3)]
    assert dataset.captions == ("one dog", "two", "sks on a sofa")  # a.png: template line 2; b.png: its file
    assert not any(image.is_inference() for image in dataset.images)
    summary = out.ui.as_dict()["text"][0]
    assert "128x128: 1" in summary and "192x64: 2" in summary  # width x height: the 2:1 folder images' bucket


def test_folder_images_are_kept_at_the_size_training_needs(node, tmp_path):
    """Kept whole, a folder of phone photos took 140 MB of float32 each."""
    folder = tmp_path / "big"
    folder.mkdir()
    Image.fromarray(np.full((300, 200, 3), 90, np.uint8)).save(folder / "tall.png")
    dataset = run_node(node, **dict(ARGS, folder=str(folder), resolution=64)).result[0]
    assert tuple(dataset.images[0].shape) == (96, 64, 3)  # the shorter side at the resolution, aspect kept


def test_absolute_folder_with_all_caption_files_needs_no_template(node, tmp_path):
    write_folder(tmp_path / "abs", {"x": "photo of {class}", "y": "another"})
    dataset = run_node(node, **dict(ARGS, folder=str(tmp_path / "abs"), caption="", identifier="")).result[0]
    assert dataset.captions == ("photo of dog", "another")


@pytest.mark.parametrize("override,input_name", [
    ({}, "images"),  # neither images nor folder
    ({"images": "batch", "caption": "one\ntwo\nthree"}, "caption"),
    ({"images": "batch", "identifier": "  "}, "identifier"),
    ({"images": "batch", "class_noun": ""}, "class_noun"),
    ({"folder": "does_not_exist"}, "folder"),
    ({"folder": "../outside"}, "folder"),  # a relative path stays in the input folder
    ({"images": "batch", "caption": "a photo of a {class}"}, "caption"),  # no caption has the identifier
    ({"images": "tiny"}, "images"),
])
def test_bad_inputs_name_the_input(node, input_dir, override, input_name):
    from comfyui_personalize.training.errors import InputError
    kwargs = dict(ARGS, **override)
    if kwargs.get("images") == "batch":
        kwargs["images"] = batch(2)  # three caption lines for two images
    elif kwargs.get("images") == "tiny":
        kwargs["images"] = batch(1, 48, 48)
    with pytest.raises(InputError) as err:
        run_node(node, **kwargs)
    assert err.value.input_name == input_name


def test_a_folder_is_read_again_when_its_files_change(node, input_dir):
    """ComfyUI compared the inputs only: images added to the folder, or a caption file fixed, kept the old dataset
    (and the old LoRA) with no hint."""
    write_folder(input_dir / "subject", {"a": "{identifier} dog"})
    before = node.fingerprint_inputs(folder="subject")
    assert node.fingerprint_inputs(folder="subject") == before  # unchanged: cached
    (input_dir / "subject" / "a.txt").write_text("{identifier} dog on grass", encoding="utf-8")
    recaptioned = node.fingerprint_inputs(folder="subject")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(input_dir / "subject" / "b.png")
    added = node.fingerprint_inputs(folder="subject")
    assert len({repr(before), repr(recaptioned), repr(added)}) == 3
    (input_dir / "subject" / ".DS_Store").write_bytes(b"finder")  # files training does not read change nothing
    (input_dir / "subject" / "notes.md").write_text("todo", encoding="utf-8")
    assert repr(node.fingerprint_inputs(folder="subject")) == repr(added)
    missing = node.fingerprint_inputs(folder="nowhere")
    assert missing != missing  # never equal: the node runs and names the problem
    assert node.fingerprint_inputs(folder="") == ""


def test_captions_without_the_identifier_are_noted(node, input_dir):
    write_folder(input_dir / "mixed", {"a": "{identifier} dog", "b": "a dog on a sofa"})
    out = run_node(node, **dict(ARGS, folder="mixed"))
    assert "note: 1 of 2 captions do not contain 'sks' (image 1)" in out.ui.as_dict()["text"][0]
    assert "note" not in run_node(node, images=batch(2), **ARGS).ui.as_dict()["text"][0]


def test_a_folder_linked_into_the_input_folder_is_read(node, input_dir, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("other_disk")
    write_folder(elsewhere / "dog", {"a": "{identifier} dog"})
    (input_dir / "mydog").symlink_to(elsewhere / "dog", target_is_directory=True)
    assert len(run_node(node, **dict(ARGS, folder="mydog")).result[0]) == 1


@pytest.mark.parametrize("text", ["SKS dog", "Sks dog, grass", "sks_dog, 1girl", "sks2 dog"])
def test_the_identifier_is_found_as_clip_finds_it(node, text):
    """CLIP reads each of these as the sks token; they were refused as captions without the identifier."""
    out = run_node(node, images=batch(1), **dict(ARGS, caption=text))
    assert "note" not in out.ui.as_dict()["text"][0]


def test_caption_files_without_the_identifier_name_the_identifier(node, input_dir):
    from comfyui_personalize.training.errors import InputError
    write_folder(input_dir / "files", {"a": "a dog", "b": "a sksx dog"})  # sksx is another token
    with pytest.raises(InputError) as err:
        run_node(node, **dict(ARGS, folder="files"))
    assert err.value.input_name == "identifier"  # the template is not used: the files or the identifier must change
