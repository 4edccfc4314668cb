"""ImageReward nodes inside real ComfyUI (CPU): Load + Score + Rank on a tiny random-weight checkpoint in the
official layout; scores equal the core scorer's; model management owns the model; bad inputs are named."""
import pytest
import torch
from comfy_tiny import weights_hash

pytestmark = pytest.mark.host


def run_node(node_cls, **kwargs):
    """Execute a V3 node the way ComfyUI's executor does (class clone + hidden inputs, inference mode)."""
    from comfy_api.latest import io

    cls = node_cls.PREPARE_CLASS_CLONE({io.Hidden.unique_id: "7"})
    with torch.inference_mode():
        out = cls.execute(**kwargs)
    assert isinstance(out, io.NodeOutput)
    return out


def batch_of_images(n=4, size=64, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():  # IMAGE tensors arrive as inference tensors from upstream nodes
        return torch.rand(n, size, size, channels, generator=g)


@pytest.fixture(scope="module")
def reward(comfy, tmp_path_factory):
    """Tiny reward files in a temp models/image_reward, registered as the only image_reward folder."""
    from comfyui_personalize.headless.tiny_reward import write_tiny_reward_files
    from comfyui_personalize.nodes import image_reward as nodes

    folder = tmp_path_factory.mktemp("image_reward")
    files = write_tiny_reward_files(folder)
    fp = comfy.folder_paths
    saved = fp.folder_names_and_paths[nodes.FOLDER]
    fp.folder_names_and_paths[nodes.FOLDER] = ([str(folder)], nodes.EXTENSIONS)
    fp.filename_list_cache.pop(nodes.FOLDER, None)
    yield nodes, files
    fp.folder_names_and_paths[nodes.FOLDER] = saved
    fp.filename_list_cache.pop(nodes.FOLDER, None)


@pytest.fixture(scope="module")
def loaded(reward):
    nodes, files = reward
    return run_node(nodes.PersonalizeLoadImageReward, checkpoint=files.checkpoint.name, device="cpu",
                    dtype="auto").result[0]


@pytest.fixture(scope="module")
def core_scorer(reward):
    from comfyui_personalize.scoring.scorer import load_scorer

    return load_scorer(reward[1])


def score(reward, loaded, images, prompt="a photo of a dog on a beach", mode="one for all", batch_size=16):
    """One batch (or a list of batches, as an upstream IMAGE list gives them): the node takes whole lists."""
    parts = images if isinstance(images, list) else [images]
    prompts = prompt if isinstance(prompt, list) else [prompt]
    return run_node(reward[0].PersonalizeImageRewardScore, image_reward=[loaded], images=parts, prompt=prompts,
                    prompt_mode=[mode], batch_size=[batch_size])


def rank(images, scores, top_k=0, threshold=None, if_none_pass="error", **carried):
    from comfyui_personalize.nodes.reward_rank import PersonalizeRankByReward

    lists = {k: [v] for k, v in carried.items()}  # the node takes whole lists (is_input_list)
    return run_node(PersonalizeRankByReward, images=[images], scores=list(scores), top_k=[top_k],
                    use_threshold=[threshold is not None], threshold=[0.0 if threshold is None else threshold],
                    if_none_pass=[if_none_pass], **lists)


# ---------------------------------------------------------------- folder registration

def test_folder_registration_keeps_a_users_extra_model_paths_entry(comfy, monkeypatch):
    import os

    from comfyui_personalize.nodes import image_reward as nodes

    fp = comfy.folder_paths
    default = os.path.join(fp.models_dir, "image_reward")
    monkeypatch.setitem(fp.folder_names_and_paths, "image_reward", (["/users/own/image_reward"], set()))
    nodes.register_folder()
    nodes.register_folder()  # a second import must not add the default twice
    paths, extensions = fp.folder_names_and_paths["image_reward"]
    assert paths == ["/users/own/image_reward", default]
    assert extensions == {".pt", ".pth", ".bin", ".safetensors"}

    monkeypatch.delitem(fp.folder_names_and_paths, "image_reward")
    nodes.register_folder()
    assert fp.folder_names_and_paths["image_reward"] == ([default], {".pt", ".pth", ".bin", ".safetensors"})


def test_checkpoint_choices_skip_tokenizer_files_and_offer_a_placeholder_when_empty(comfy, reward, tmp_path,
                                                                                      monkeypatch):
    nodes, files = reward
    (files.vocab.parent / "model.safetensors").write_bytes(b"")  # a user dropped the whole BERT folder in
    try:
        comfy.folder_paths.filename_list_cache.pop("image_reward", None)
        assert nodes.checkpoint_files() == [files.checkpoint.name]
    finally:
        (files.vocab.parent / "model.safetensors").unlink()
    monkeypatch.setitem(comfy.folder_paths.folder_names_and_paths, "image_reward", ([str(tmp_path)], nodes.EXTENSIONS))
    comfy.folder_paths.filename_list_cache.pop("image_reward", None)
    assert nodes.checkpoint_files() == ["ImageReward.pt"]
    comfy.folder_paths.filename_list_cache.pop("image_reward", None)


def test_missing_files_are_listed_with_where_they_go(comfy, reward, tmp_path, monkeypatch):
    from comfyui_personalize.training.errors import InputError

    nodes = reward[0]
    monkeypatch.setitem(comfy.folder_paths.folder_names_and_paths, "image_reward", ([str(tmp_path)], nodes.EXTENSIONS))
    with pytest.raises(InputError) as e:
        run_node(nodes.PersonalizeLoadImageReward, checkpoint="ImageReward.pt", device="cpu", dtype="auto")
    message = str(e.value)
    assert str(tmp_path / "ImageReward.pt") in message
    assert str(tmp_path / "bert-base-uncased" / "vocab.txt") in message and "nothing is downloaded" in message


# ---------------------------------------------------------------- load + score

def test_scores_equal_the_core_scorer_and_show_on_the_node(reward, loaded, core_scorer):
    images = batch_of_images()
    before = weights_hash(loaded.scorer.model)
    out = score(reward, loaded, images)
    scores, summary = out.result
    expected = core_scorer.score(images, ["a photo of a dog on a beach"])
    assert isinstance(scores, list) and len(scores) == 4 and all(isinstance(s, float) for s in scores)
    assert torch.equal(torch.tensor(scores), expected)
    assert len(set(scores)) == 4  # the tiny model really tells these images apart
    assert loaded.scorer.dtype == torch.float32  # auto on the CPU
    assert out.ui["text"] == (summary,)
    order = sorted(range(4), key=lambda i: -scores[i])
    for i, s in enumerate(scores):  # batch position, score and rank (as on the badges)
        assert f"image {i}: {s:+.4f} #{order.index(i) + 1}" in summary.splitlines()
    assert f"best: image {order[0]} ({scores[order[0]]:+.4f})" in summary
    assert "smaller than 224" in summary  # 64 px images: the upsampling note is shown
    assert weights_hash(loaded.scorer.model) == before  # scoring never changes the weights


def test_an_image_list_is_scored_and_ranked_as_one_set(comfy, reward, loaded):
    """Run once per list item, each item was ranked alone: two "#1" badges and positions 0, 1, 0, 1."""
    parts = [batch_of_images(n=2, size=64, seed=1), batch_of_images(n=1, size=80, seed=2),
             batch_of_images(n=2, size=64, seed=3)]  # a list of batches of different sizes
    out = score(reward, loaded, parts)
    scores, summary = out.result
    alone = [s for part in parts for s in score(reward, loaded, part).result[0]]
    torch.testing.assert_close(torch.tensor(scores), torch.tensor(alone))  # each image's score is its own
    badges = out.ui["personalize_scores"]
    assert [b["index"] for b in badges] == [0, 1, 2, 3, 4]
    order = sorted(range(5), key=lambda i: -scores[i])
    assert [badges[i]["rank"] for i in order] == [1, 2, 3, 4, 5]
    assert out.ui["text"] == (summary,) and f"best: image {order[0]} " in summary
    lines = "\n".join(f"prompt {i}" for i in range(5))  # one per line runs over the whole list
    per_line = score(reward, loaded, parts, prompt=lines, mode="one per line").result[0]
    by_batch = score(reward, loaded, parts, prompt=["prompt 0\nprompt 1", "prompt 2", "prompt 3\nprompt 4"],
                     mode="one per line").result[0]
    assert per_line == by_batch and per_line != scores


def test_score_badges_carry_rank_and_a_thumbnail_per_image(comfy, reward, loaded):
    from PIL import Image

    images = torch.rand(3, 200, 320, 4, generator=torch.Generator().manual_seed(3))  # RGBA, wider than tall
    out = score(reward, loaded, images)
    scores, badges = out.result[0], out.ui["personalize_scores"]
    assert [b["index"] for b in badges] == [0, 1, 2]
    assert [b["score"] for b in badges] == scores
    best_first = sorted(range(3), key=lambda i: -scores[i])
    assert [badges[i]["rank"] for i in best_first] == [1, 2, 3]
    for badge in badges:
        assert badge["type"] == "temp"
        path = comfy.folder_paths.get_temp_directory() + "/" + badge["subfolder"] + "/" + badge["filename"]
        with Image.open(path) as thumb:
            assert thumb.size == (160, 100) and thumb.mode == "RGB"


def test_chunks_report_progress_and_match_one_pass(reward, loaded, core_scorer, monkeypatch):
    import comfy.utils

    calls = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None:
                        calls.append((value, total, node_id)))
    images = batch_of_images(n=5, seed=1)
    scores = score(reward, loaded, images, batch_size=2).result[0]
    assert calls == [(2, 5, "7"), (4, 5, "7"), (5, 5, "7")]
    assert torch.allclose(torch.tensor(scores), core_scorer.score(images, ["a photo of a dog on a beach"]), atol=1e-5)


def test_one_prompt_per_line(reward, loaded, core_scorer):
    images = batch_of_images()
    lines = ["a red car", "a cat on a table", "a dog", "an old castle at night"]
    scores = score(reward, loaded, images, prompt="\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n",
                   mode="one per line").result[0]
    assert torch.equal(torch.tensor(scores), core_scorer.score(images, lines))
    assert not torch.equal(torch.tensor(scores), core_scorer.score(images, [lines[0]]))


def test_notes_and_errors_name_the_images_position_in_the_whole_input(reward, loaded):
    """The long-prompt note counted prompts sorted and de-duplicated; a NaN in the second batch of an IMAGE list
    was numbered within that batch."""
    from comfyui_personalize.training.errors import InputError

    long = "a beautiful painting of a castle " * 6  # over 35 tokens
    summary = score(reward, loaded, batch_of_images(n=3), prompt=f"zzz dog\n{long}\nzzz dog",
                    mode="one per line").result[1]
    assert "note: the prompt of image 1 is longer than 35 tokens" in summary
    summary = score(reward, loaded, [batch_of_images(n=2), batch_of_images(n=1)], prompt=long).result[1]
    assert "note: the prompt is longer than 35 tokens" in summary  # one prompt for every image of the list
    bad = batch_of_images(n=2).clone()
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match=r"image 1 contains NaN.*within images 3\.\.4 of the input: add 3"):
        score(reward, loaded, [batch_of_images(n=3), bad])


def test_an_empty_prompt_scores_with_a_note(reward, loaded, core_scorer):
    images = batch_of_images(n=2)
    scores, summary = score(reward, loaded, images, prompt="").result
    assert torch.equal(torch.tensor(scores), core_scorer.score(images, [""]))  # [CLS][SEP], as the official
    assert "the prompt is empty" in summary


def test_prompt_lines_must_match_the_batch(reward, loaded):
    from comfyui_personalize.training.errors import InputError

    with pytest.raises(InputError, match=r"prompt: has 3 non-empty lines for 4 images"):
        score(reward, loaded, batch_of_images(), prompt="a\nb\nc", mode="one per line")
    # in an IMAGE list the message names the list item (it named neither the item nor its place before)
    with pytest.raises(InputError, match=r"prompt: the prompt of item 2 of the list: has 2 non-empty lines for 1"):
        score(reward, loaded, [batch_of_images(n=2), batch_of_images(n=1)], prompt=["a\nb", "c\nd"],
              mode="one per line")
    with pytest.raises(InputError, match=r"images: item 2 of the IMAGE list is an empty batch"):
        score(reward, loaded, [batch_of_images(n=2), batch_of_images(n=2)[:0]])  # it said "images 2..1"


def test_alpha_and_gray_images_are_converted_with_a_note(reward, loaded, core_scorer):
    rgba, gray = batch_of_images(n=2, channels=4), batch_of_images(n=2, channels=1)
    for images, word in ((rgba, "alpha"), (gray, "one channel")):
        scores, summary = score(reward, loaded, images).result
        assert word in summary
        assert torch.equal(torch.tensor(scores), core_scorer.score(images, ["a photo of a dog on a beach"]))


def test_model_management_owns_the_scorer(reward, loaded):
    import comfy.model_management as mm

    def managed():
        return any(m.model is loaded.patcher for m in mm.current_loaded_models)

    images = batch_of_images(n=2)
    first = score(reward, loaded, images).result[0]
    assert managed()
    mm.free_memory(1e30, loaded.patcher.load_device)  # what ComfyUI does when another model needs the memory
    assert not managed()
    assert score(reward, loaded, images).result[0] == first  # loaded again, same scores
    assert managed()


def test_cancel_stops_between_chunks(reward, loaded, monkeypatch):
    import comfy.model_management as mm
    import comfy.utils

    done = []

    def cancel_after_first_chunk(value, total, preview, node_id=None):
        done.append(value)
        mm.interrupt_current_processing(True)  # the user presses Cancel while chunk 1 is scored

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", cancel_after_first_chunk)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            score(reward, loaded, batch_of_images(n=6), batch_size=2)
    finally:
        mm.interrupt_current_processing(False)
    assert done == [2]  # chunk 1 finished, chunks 2 and 3 never ran


def test_bf16_and_fp16_on_the_cpu(reward):
    nodes, files = reward
    for dtype, expected in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        loaded = run_node(nodes.PersonalizeLoadImageReward, checkpoint=files.checkpoint.name, device="cpu",
                          dtype=dtype).result[0]
        assert loaded.scorer.model.vision.embeddings.patch_embedding.weight.dtype == expected


# ---------------------------------------------------------------- rank

def test_rank_reorders_images_latent_and_mask_together(reward, loaded):
    images = batch_of_images()
    scores = score(reward, loaded, images).result[0]
    latent = {"samples": torch.arange(4.0).view(4, 1, 1, 1).expand(4, 4, 8, 8).clone(), "batch_index": [10, 11, 12, 13]}
    mask = torch.arange(4.0).view(4, 1, 1).expand(4, 64, 64).clone()
    out = rank(images, scores, top_k=2, latent=latent, mask=mask)
    out_images, out_latent, out_mask, indices, kept = out.result
    best_first = sorted(range(4), key=lambda i: -scores[i])
    assert indices == best_first[:2]
    assert out.ui.as_dict()["text"][0].splitlines()[1:] == [  # rank, then batch position, as the badges
        f"#{k} image {i}: {scores[i]:+.4f}" for k, i in enumerate(best_first[:2], 1)]
    assert kept == [scores[i] for i in best_first[:2]]
    assert torch.equal(out_images, images[best_first[:2]])
    assert out_latent["samples"][:, 0, 0, 0].tolist() == [float(i) for i in best_first[:2]]
    assert out_latent["batch_index"] == [10 + i for i in best_first[:2]]
    assert out_mask[:, 0, 0].tolist() == [float(i) for i in best_first[:2]]
    assert latent["samples"][:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0]  # the input LATENT is untouched


def test_rank_is_numeric_stable_with_top_k_and_threshold():
    images = batch_of_images(n=4, size=8)
    scores = [0.5, 10.0, 9.0, 10.0]  # as text "9.0" > "10.0"; ties keep batch order
    assert rank(images, scores).result[3] == [1, 3, 2, 0]
    assert rank(images, scores, top_k=2).result[3] == [1, 3]
    assert rank(images, scores, threshold=1.0).result[3] == [1, 3, 2]
    assert rank(images, scores, top_k=1, threshold=1.0).result[3] == [1]
    out = rank(images, scores, top_k=9)  # more than the batch: all of them
    assert out.result[3] == [1, 3, 2, 0] and out.result[0].shape[0] == 4


def test_a_threshold_that_keeps_nothing(comfy):
    from comfy_execution.graph_utils import ExecutionBlocker

    from comfyui_personalize.training.errors import InputError

    images, scores = batch_of_images(n=3, size=8), [0.25, -1.0, 1.5]
    with pytest.raises(InputError, match=r"threshold: no image scored 2 or more \(best: image 2 with 1.5000\)"):
        rank(images, scores, threshold=2.0)
    out = rank(images, scores, threshold=2.0, if_none_pass="keep best")
    assert out.result[3] == [2] and torch.equal(out.result[0], images[2:3])
    assert "kept the best image" in out.ui.as_dict()["text"][0]
    out = rank(images, scores, threshold=2.0, if_none_pass="stop quietly")
    assert all(isinstance(r, ExecutionBlocker) and r.message is None for r in out.result)


def test_rank_bad_inputs_are_named(comfy):
    from comfy_execution.graph_utils import ExecutionBlocker

    from comfyui_personalize.training.errors import InputError

    images = batch_of_images(n=3, size=8)
    with pytest.raises(InputError, match=r"scores: got 2 scores for 3 images"):
        rank(images, [1.0, 2.0])
    with pytest.raises(InputError, match=r"latent: has 2 latents for 3 images"):
        rank(images, [1.0, 2.0, 3.0], latent={"samples": torch.zeros(2, 4, 1, 1)})
    with pytest.raises(InputError, match=r"mask: has 2 masks for 3 images"):
        rank(images, [1.0, 2.0, 3.0], mask=torch.zeros(2, 8, 8))
    with pytest.raises(InputError, match=r"scores: score 1 is NaN"):
        rank(images, [1.0, float("nan"), 3.0])
    out = rank(images, [1.0, 2.0, 3.0], top_k=1, mask=torch.ones(1, 8, 8))  # one mask applies to all images
    assert out.result[2].shape == (1, 8, 8)
    assert isinstance(out.result[1], ExecutionBlocker) and "latent input" in out.result[1].message


# ---------------------------------------------------------------- conversion

def test_convert_needs_only_the_checkpoint(comfy, reward, tmp_path, monkeypatch):
    import shutil

    nodes, files = reward
    shutil.copy(files.checkpoint, tmp_path / "ImageReward.safetensors")  # no vocab.txt, no med_config here
    monkeypatch.setitem(comfy.folder_paths.folder_names_and_paths, "image_reward", ([str(tmp_path)], nodes.EXTENSIONS))
    out = run_node(nodes.PersonalizeConvertImageReward, checkpoint="ImageReward.safetensors", name="converted",
                   if_exists="error")
    assert out.result == ("converted.safetensors",) and (tmp_path / "converted.safetensors").is_file()


def test_convert_in_a_linked_subfolder_names_the_file_as_the_loader_lists_it(comfy, reward, tmp_path, monkeypatch):
    """models/image_reward/ImageReward linked to a download elsewhere: the file is written beside the checkpoint
    and named through the link (a resolved path is outside the folder: the node raised after writing)."""
    import shutil

    nodes, files = reward
    real, folder = tmp_path / "elsewhere", tmp_path / "image_reward"
    real.mkdir(), folder.mkdir()
    shutil.copy(files.checkpoint, real / "ImageReward.safetensors")
    (folder / "ImageReward").symlink_to(real, target_is_directory=True)
    monkeypatch.setitem(comfy.folder_paths.folder_names_and_paths, "image_reward", ([str(folder)], nodes.EXTENSIONS))
    out = run_node(nodes.PersonalizeConvertImageReward, checkpoint="ImageReward/ImageReward.safetensors",
                   name="converted", if_exists="error")
    assert out.result == ("ImageReward/converted.safetensors",) and (real / "converted.safetensors").is_file()


def test_convert_writes_safetensors_that_scores_the_same(reward, loaded, core_scorer):
    from comfyui_personalize.training.errors import InputError

    nodes, files = reward
    out = run_node(nodes.PersonalizeConvertImageReward, checkpoint=files.checkpoint.name, name="converted",
                   if_exists="error")
    (name,) = out.result
    assert name == "converted.safetensors" and (files.checkpoint.parent / name).is_file()
    try:
        with pytest.raises(InputError, match="name: .*exists"):  # never overwrites silently
            run_node(nodes.PersonalizeConvertImageReward, checkpoint=files.checkpoint.name, name="converted",
                     if_exists="error")
        with pytest.raises(InputError, match="name"):
            run_node(nodes.PersonalizeConvertImageReward, checkpoint=files.checkpoint.name, name="../escape",
                     if_exists="error")
        again = run_node(nodes.PersonalizeLoadImageReward, checkpoint=name, device="cpu", dtype="fp32").result[0]
        images = batch_of_images(n=2)
        scores = score(reward, again, images).result[0]
        assert torch.equal(torch.tensor(scores), core_scorer.score(images, ["a photo of a dog on a beach"]))
    finally:
        (files.checkpoint.parent / name).unlink()
