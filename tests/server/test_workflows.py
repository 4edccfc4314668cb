"""Server tier: every example workflow queued on a real ComfyUI process; plus plain tests of the UI->API converter.

The server tests start ``main.py --cpu`` once per session with everything under a tmp base directory, a tiny
random-weight SD1.5 checkpoint (cached between runs) and this pack symlinked into its custom_nodes.
"""
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from comfyui_personalize.headless.comfy_server import (
    ComfyServer,
    _input_order,
    cpu_overrides,
    ui_workflow_to_api,
    write_tiny_sd15_checkpoint,
)
from comfyui_personalize.headless.tiny_reward import write_tiny_reward_files
from comfyui_personalize.headless.workflow_inputs import execution_errors, use_tiny_inputs

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))
COMFYUI_PATH = Path(os.environ.get("COMFYUI_PATH", "/opt/comfyui-host"))
CACHE_DIR = Path(os.environ.get("PERSONALIZE_CACHE_DIR", Path.home() / ".cache" / "comfyui-personalize"))
TINY_CKPT = "personalize_tiny_sd15.safetensors"
TINY_REWARD = "ImageReward-tiny.safetensors"
PROMPT_TIMEOUT_S = 600
# save node -> the models/ subfolder it writes to
SAVED_TO = {"PersonalizeSaveLoRA": "loras", "PersonalizeSaveEmbedding": "embeddings",
            "PersonalizeSaveCheckpoint": "checkpoints"}


def write_subject_png(path: Path) -> None:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (64, 64), (30, 60, 200))
    ImageDraw.Draw(img).ellipse((16, 16, 48, 48), fill=(220, 30, 30))
    img.save(path)


# ---------------------------------------------------------------- server tier

@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_base")
    started = time.monotonic()
    write_tiny_sd15_checkpoint(base / "models" / "checkpoints" / TINY_CKPT, cache_dir=CACHE_DIR,
                               comfyui_path=COMFYUI_PATH)
    write_tiny_reward_files(base / "models" / "image_reward", name=TINY_REWARD)
    with ComfyServer(base, comfyui_path=COMFYUI_PATH) as server:
        log.info("ComfyUI up at %s after %.1f s", server.base_url, time.monotonic() - started)
        yield server


def _prepare(server, path: Path) -> dict:
    prompt = ui_workflow_to_api(json.loads(path.read_text()), server.object_info())
    return cpu_overrides(use_tiny_inputs(prompt, TINY_CKPT, server.input_dir, write_subject_png, TINY_REWARD))


@dataclass
class WorkflowRun:
    prompt: dict  # the API prompt as queued
    entry: dict  # its /history entry
    new_files: dict  # models/ subfolder -> the .safetensors files that appeared there during the run


def _model_files(server) -> dict:
    return {folder: set((server.models_dir / folder).rglob("*.safetensors")) for folder in SAVED_TO.values()}


def _run_workflow(server, path: Path) -> WorkflowRun:
    prompt = _prepare(server, path)
    before = _model_files(server)
    started = time.monotonic()
    entry = server.wait(server.queue(prompt), timeout=PROMPT_TIMEOUT_S)
    log.info("%s ran in %.1f s", path.name, time.monotonic() - started)
    after = _model_files(server)
    return WorkflowRun(prompt, entry, {folder: sorted(after[folder] - before[folder]) for folder in after})


@pytest.fixture(scope="session")
def run_workflow(comfy_server):
    """Queue an example workflow once per session (the checkpoint test reuses the DreamBooth run)."""
    runs = {}

    def run(path: Path) -> WorkflowRun:
        if path not in runs:
            runs[path] = _run_workflow(comfy_server, path)
        return runs[path]
    return run


def _assert_success(server, entry: dict) -> None:
    detail = f"{execution_errors(entry)}\n--- log ---\n{server.log_tail()}"
    assert entry["status"].get("status_str") == "success", detail


def _assert_saved_images(server, prompt: dict, entry: dict) -> None:
    outputs = entry.get("outputs", {})
    saves = [node_id for node_id, node in prompt.items() if node["class_type"] == "SaveImage"]
    assert saves, "the workflow has no SaveImage node"
    for node_id in saves:
        images = outputs.get(node_id, {}).get("images", [])
        assert images, f"SaveImage {node_id} produced no image: {outputs.get(node_id)}"
        for img in images:
            assert (server.output_dir / img["subfolder"] / img["filename"]).is_file(), img


def _check_lora_file(path: Path) -> dict:
    """Checks the kohya keys; returns the bundled word's tensors' shapes (bundle_emb.*), if any."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        bundled = {k: f.get_slice(k).get_shape() for k in keys if k.startswith("bundle_emb.")}
    assert keys, f"{path} is empty"
    for k, shape in bundled.items():  # a pivotal word bundled in: bundle_emb.<token>.<encoder> = [vectors, width]
        assert len(k.split(".")) == 3 and k.split(".")[2] in ("clip_l", "clip_g", "clip_h") and len(shape) == 2, k
    keys = [k for k in keys if k not in bundled]
    assert all(k.startswith(("lora_unet_", "lora_te")) for k in keys), keys[:5]
    assert any(k.startswith("lora_unet_") for k in keys), keys[:5]
    suffixes = (".lora_down.weight", ".lora_up.weight", ".alpha")
    assert all(k.endswith(suffixes) for k in keys), [k for k in keys if not k.endswith(suffixes)][:5]
    modules = {k.rsplit(".lora_", 1)[0] if ".lora_" in k else k.rsplit(".", 1)[0] for k in keys}
    for m in modules:  # each module has the full down/up/alpha triple
        assert {m + s for s in suffixes} <= set(keys), m
    return bundled


def _check_embedding_file(path: Path, prompt: dict) -> None:
    import torch
    from safetensors.torch import load_file

    vectors = next(n["inputs"]["num_vectors"] for n in prompt.values()
                   if n["class_type"] in ("PersonalizeTrainTextualInversion", "PersonalizeTrainPivotal",
                                          "PersonalizeFastTune"))
    tensors = load_file(str(path))
    assert set(tensors) == {"clip_l"}, sorted(tensors)  # SD1.5: one text encoder, CLIP-L (768 wide)
    assert tensors["clip_l"].shape == (vectors, 768) and torch.isfinite(tensors["clip_l"]).all()


def _check_checkpoint_file(path: Path, base: Path) -> None:
    """The UNet of the saved checkpoint is the base's, trained: same keys, some tensors changed."""
    from safetensors import safe_open

    prefix = "model.diffusion_model."
    with safe_open(str(path), "pt") as saved, safe_open(str(base), "pt") as original:
        unet = sorted(k for k in saved.keys() if k.startswith(prefix))
        assert unet == sorted(k for k in original.keys() if k.startswith(prefix))
        changed = [k for k in unet if not saved.get_tensor(k).float().equal(original.get_tensor(k).float())]
    assert changed, f"{path}: the UNet equals the base checkpoint's; the training was not saved"


@pytest.mark.server
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_example_workflow_runs(comfy_server, run_workflow, path):
    run = run_workflow(path)
    _assert_success(comfy_server, run.entry)
    _assert_saved_images(comfy_server, run.prompt, run.entry)
    for save_node, folder in SAVED_TO.items():
        expected = sum(n["class_type"] == save_node for n in run.prompt.values())
        new = run.new_files[folder]
        assert len(new) == expected, f"{save_node}: expected {expected} new file(s) in models/{folder}, got {new}"
    # the pivotal and Fast Tune examples bundle their word into the LoRA (Save LoRA's bundle_embedding)
    saves = [n for n in json.loads(path.read_text())["nodes"] if n["type"] == "PersonalizeSaveLoRA"]
    bundles = sum(bool(i.get("link")) for n in saves for i in n.get("inputs", []) if i["name"] == "bundle_embedding")
    assert sum(bool(_check_lora_file(f)) for f in run.new_files["loras"]) == bundles
    for f in run.new_files["embeddings"]:
        _check_embedding_file(f, run.prompt)
    for f in run.new_files["checkpoints"]:
        _check_checkpoint_file(f, comfy_server.models_dir / "checkpoints" / TINY_CKPT)


def _sample_prompt(ckpt_name: str, text: str, prefix: str) -> dict:
    """Stock nodes only: load a checkpoint and sample one 64 px image in 2 steps."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": text}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 0, "steps": 2, "cfg": 7.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


@pytest.mark.server
def test_dreambooth_checkpoint_loads_in_stock_loader(comfy_server, run_workflow):
    run = run_workflow(ROOT / "example_workflows" / "dreambooth_prior_preservation.json")
    _assert_success(comfy_server, run.entry)
    (saved,) = run.new_files["checkpoints"]
    name = saved.relative_to(comfy_server.models_dir / "checkpoints").as_posix()
    prompt = _sample_prompt(name, "a photo of a dog", "personalize/reloaded_dreambooth")
    entry = comfy_server.wait(comfy_server.queue(prompt), timeout=PROMPT_TIMEOUT_S)
    _assert_success(comfy_server, entry)
    _assert_saved_images(comfy_server, prompt, entry)


@pytest.mark.server
def test_image_reward_workflow_keeps_the_best_two(comfy_server, run_workflow):
    run = run_workflow(ROOT / "example_workflows" / "image_reward_top2.json")
    _assert_success(comfy_server, run.entry)
    outputs = run.entry["outputs"]
    saved = next(outputs[node_id]["images"] for node_id, n in run.prompt.items() if n["_meta"]["title"] == "Best 2")
    assert len(saved) == 2, saved
    (summary,) = outputs[_node_id(run.prompt, "PersonalizeImageRewardScore")]["text"]
    scores = [float(line.split(": ")[1].split()[0]) for line in summary.splitlines() if line.startswith("image ")]
    assert len(scores) == 4 and len(set(scores)) == 4, summary
    (kept,) = outputs[_node_id(run.prompt, "PersonalizeRankByReward")]["text"]
    best_two = sorted(range(4), key=lambda i: -scores[i])[:2]
    assert [line for line in kept.splitlines() if line.startswith("#")] == [
        f"#{k} image {i}: {scores[i]:+.4f}" for k, i in enumerate(best_two, 1)], (summary, kept)


def _widgets(prompt: dict, class_type: str) -> dict:
    inputs = next(n["inputs"] for n in prompt.values() if n["class_type"] == class_type)
    return {k: v for k, v in inputs.items() if not isinstance(v, list)}


def _node_id(prompt: dict, class_type: str) -> str:
    return next(node_id for node_id, n in prompt.items() if n["class_type"] == class_type)


@pytest.mark.server
def test_train_node_widgets_map_with_server_schema(comfy_server):
    """The converter against the real schema: the seed's control value must not shift dtype & co."""
    path = ROOT / "example_workflows" / "train_lora_then_sample.json"
    prompt = ui_workflow_to_api(json.loads(path.read_text()), comfy_server.object_info())
    assert _widgets(prompt, "PersonalizeTrainLoRA") == {
        "steps": 500, "learning_rate": 0.0001, "batch_size": 1, "seed": 0, "dtype": "auto",
        "gradient_checkpointing": False, "rank": 8, "alpha": 8.0, "targets": "attention",
        "train_text_encoder": False, "resume_from": "none"}
    assert _widgets(prompt, "PersonalizeInstanceDataset") == {
        "folder": "", "caption": "a photo of {identifier} {class}", "identifier": "otte", "class_noun": "dog",
        "resolution": 512, "bucketing": True, "flip": False, "caption_dropout": 0.0}
    train = next(n["inputs"] for n in prompt.values() if n["class_type"] == "PersonalizeTrainLoRA")
    assert train["dataset"] == [_node_id(prompt, "PersonalizeInstanceDataset"), 0]
    assert train["options"] == [_node_id(prompt, "PersonalizeTrainingOptions"), 0]
    sampler = next(n["inputs"] for n in prompt.values() if n["class_type"] == "KSampler")
    assert (sampler["seed"], sampler["steps"], sampler["sampler_name"], sampler["denoise"]) == (42, 20, "euler", 1)


@pytest.mark.server
def test_dreambooth_strings_wired_into_widget_inputs(comfy_server):
    """Identifier outputs drive widget inputs (dataset identifier, class prompt, sampling prompt); the prior's
    seed has no control widget, so batch_size and folder keep their places."""
    path = ROOT / "example_workflows" / "dreambooth_prior_preservation.json"
    prompt = ui_workflow_to_api(json.loads(path.read_text()), comfy_server.object_info())
    ident = _node_id(prompt, "PersonalizeIdentifier")
    assert prompt[_node_id(prompt, "PersonalizeInstanceDataset")]["inputs"]["identifier"] == [ident, 0]
    prior = prompt[_node_id(prompt, "PersonalizePriorDataset")]["inputs"]
    assert prior["class_prompt"] == [ident, 2]
    assert (prior["mode"], prior["seed"], prior["batch_size"], prior["folder"]) == ("generate", 0, 4, "")
    positive = next(n["inputs"] for n in prompt.values() if n["_meta"]["title"] == "Positive")
    assert positive["text"] == [ident, 1]
    train = prompt[_node_id(prompt, "PersonalizeTrainDreamBooth")]["inputs"]
    assert train["prior"] == [_node_id(prompt, "PersonalizePriorDataset"), 0]
    assert _widgets(prompt, "PersonalizeIdentifier") == {"class_noun": "dog", "identifier": "", "seed": 0}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_example_workflow_nodes_of_the_pack_show_the_inputs_and_outputs_the_server_has(comfy_server, path):
    """A node saved before an input or output was added loads without it in the frontend until it is re-created
    (the reweight node's negative output, needed for apply_to uncond, was missing from its example)."""
    info = comfy_server.object_info()
    for node in json.loads(path.read_text())["nodes"]:
        if not node["type"].startswith("Personalize"):
            continue
        spec = info[node["type"]]
        inputs = {name for name, _ in _input_order(spec)}  # (their order in a saved node is the frontend's)
        assert {i["name"] for i in node.get("inputs", [])} == inputs, (node["type"], node["id"])
        assert [o["type"] for o in node.get("outputs", [])] == spec["output"], (node["type"], node["id"])


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_example_workflow_is_consistent(path):
    wf = json.loads(path.read_text())
    assert wf["version"] == 0.4 and {"last_node_id", "last_link_id", "groups", "config", "extra"} <= set(wf)
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert wf["last_node_id"] >= max(nodes) and wf["last_link_id"] >= max((lk[0] for lk in wf["links"]), default=0)
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        assert link_id in nodes[src]["outputs"][src_slot]["links"], link_id
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id, link_id
        assert nodes[dst]["inputs"][dst_slot]["type"] == kind == nodes[src]["outputs"][src_slot]["type"], link_id


def test_the_server_serves_every_web_script_and_what_it_imports(comfy_server):
    """The frontend loads what /extensions lists; a script importing a sibling that is not served breaks every
    widget of the pack (the import fails the whole module)."""
    import re
    import urllib.request

    listed = set(comfy_server._request("/extensions"))
    scripts = sorted((ROOT / "web" / "js").glob("*.js"))
    assert scripts
    for script in scripts:
        url = f"/extensions/ComfyUI-Personalize/js/{script.name}"
        assert url in listed, url
        with urllib.request.urlopen(comfy_server.base_url + url, timeout=30) as resp:
            assert resp.read().decode() == script.read_text()
        for sibling in re.findall(r'from "\./([\w.]+)"', script.read_text()):
            assert f"/extensions/ComfyUI-Personalize/js/{sibling}" in listed, (script.name, sibling)
