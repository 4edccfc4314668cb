"""The web extension in ComfyUI's real frontend (headless Chromium): a training run draws its live loss chart on the
trainer node, at the root of the graph and inside a subgraph (execution id "<instance>:<inner>"); ImageReward Score
shows a badge and a loaded thumbnail per image; status text survives a cached rerun; a new node's seed starts
"fixed"; the example workflows load without overlapping nodes. The checks are asserted; the screenshots go to
--out for a look.

CI has no browser, so this is a manual check (its result is recorded in bench/results). Needs the ComfyUI host with
its frontend package (requirements.txt of ComfyUI), Debian's chromium and playwright from PyPI (their own venv is
fine: the script only drives the browser; ComfyUI runs in --python).

Usage: python bench/web_check.py --comfyui /opt/comfyui-host --python /opt/venv/bin/python --out DIR
       [--chromium /usr/bin/chromium]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "example_workflows" / "train_lora_then_sample.json"
TRAINER = "5"  # the Train LoRA node of that workflow
SCORING = ROOT / "example_workflows" / "image_reward_top2.json"
SCORER, RANKER = "9", "10"  # its ImageReward Score and Rank by Reward nodes
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # this machine has no network beyond loopback

# started in --python (ComfyUI's environment): a tiny checkpoint, the server, the API prompt of the workflow
SERVE = """
import json, sys, time, types
from pathlib import Path
pkg = types.ModuleType("comfyui_personalize"); pkg.__path__ = [sys.argv[1]]; sys.modules["comfyui_personalize"] = pkg
from PIL import Image
from comfyui_personalize.headless.comfy_server import (ComfyServer, cpu_overrides, ui_workflow_to_api,
                                                       write_tiny_sd15_checkpoint)
from comfyui_personalize.headless.tiny_reward import write_tiny_reward_files
from comfyui_personalize.headless.workflow_inputs import use_tiny_inputs
base, comfyui = Path(sys.argv[2]), sys.argv[3]
write_tiny_sd15_checkpoint(base / "models" / "checkpoints" / "tiny.safetensors", cache_dir=base / "cache",
                           comfyui_path=comfyui)
write_tiny_reward_files(base / "models" / "image_reward", name="tiny-reward.safetensors")
with ComfyServer(base, comfyui_path=comfyui) as server:
    def prompt(workflow):
        api = ui_workflow_to_api(json.loads(Path(workflow).read_text()), server.object_info())
        return cpu_overrides(use_tiny_inputs(api, "tiny.safetensors", server.input_dir,
                                             lambda p: Image.new("RGB", (64, 64), (200, 40, 40)).save(p),
                                             "tiny-reward.safetensors"))
    print(json.dumps({"url": server.base_url, "prompts": [prompt(w) for w in sys.argv[4:]]}), flush=True)
    sys.stdin.read()  # until the check closes stdin
"""


def queue(url: str, prompt: dict, client_id: str) -> dict:
    """Queue ``prompt`` for the browser's client (the loss events go to the client that queued); wait for it."""
    body = json.dumps({"prompt": prompt, "client_id": client_id}).encode()
    request = urllib.request.Request(url + "/prompt", body, {"Content-Type": "application/json"})
    prompt_id = json.loads(urllib.request.urlopen(request).read())["prompt_id"]
    for _ in range(1200):
        history = json.loads(urllib.request.urlopen(f"{url}/history/{prompt_id}").read())
        if prompt_id in history:
            assert history[prompt_id]["status"]["status_str"] == "success", history[prompt_id]["status"]
            return history[prompt_id]
        time.sleep(0.5)
    raise TimeoutError(prompt_id)


def renamed(prompt: dict, old: str, new: str) -> dict:
    """The API prompt with node ``old`` under the id ``new`` (as the frontend flattens a subgraph), links included."""
    out = {}
    for key, node in prompt.items():
        inputs = {k: [new, v[1]] if isinstance(v, list) and v and v[0] == old else v for k, v in node["inputs"].items()}
        out[new if key == old else key] = {**node, "inputs": inputs}
    return out


def show(page, node_id: int, path: Path) -> None:
    page.evaluate(f"""(() => {{ const n = window.app.graph.getNodeById({node_id}), c = window.app.canvas;
        c.ds.scale = 1; c.ds.offset = [100 - n.pos[0], 100 - n.pos[1]]; c.setDirty(true, true); }})()""")
    page.keyboard.press("Escape")  # the templates dialog a fresh frontend opens
    time.sleep(1)
    page.screenshot(path=str(path))


def check(url: str, prompt: dict, scoring: dict, out: Path, chromium: str) -> None:
    prompt[TRAINER]["inputs"]["steps"] = 24
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e.stack)))
        page.goto(url)
        page.wait_for_function("window.app?.graph && window.app.extensionManager", timeout=120_000)
        # every example loads with no node on top of another, at the sizes the frontend gives them
        for example in sorted((ROOT / "example_workflows").glob("*.json")):
            page.evaluate("wf => window.app.loadGraphData(wf)", json.loads(example.read_text()))
            boxes = page.evaluate("""window.app.graph.nodes.map((n) => [n.id, n.pos[0], n.pos[1] - 30, n.size[0],
                n.size[1] + 30])""")  # the title bar sits above pos
            hits = [(a[0], b[0]) for i, a in enumerate(boxes) for b in boxes[i + 1:]
                    if a[1] < b[1] + b[3] and b[1] < a[1] + a[3] and a[2] < b[2] + b[4] and b[2] < a[2] + a[4]]
            assert not hits, f"{example.name}: nodes on top of each other {hits}"

        # a new node's seed starts fixed (a saved workflow keeps its own choice); other packs' nodes are left alone
        made = page.evaluate("""["PersonalizeTrainLoRA", "PersonalizeIdentifier", "KSampler"].map((type) =>
            window.LiteGraph.createNode(type).widgets.find((w) => w.name === "control_after_generate")?.value)""")
        assert made == ["fixed", "fixed", "randomize"], made
        saved = json.loads(WORKFLOW.read_text())
        trainer = next(n for n in saved["nodes"] if str(n["id"]) == TRAINER)
        trainer["widgets_values"][trainer["widgets_values"].index("fixed")] = "randomize"
        page.evaluate("wf => window.app.loadGraphData(wf)", saved)
        kept = page.evaluate(f"""window.app.graph.getNodeById({TRAINER}).widgets.find(
            (w) => w.name === "control_after_generate").value""")
        assert kept == "randomize", kept
        page.evaluate("wf => window.app.loadGraphData(wf)", json.loads(WORKFLOW.read_text()))
        client_id = page.evaluate("window.app.api.clientId ?? window.app.api.initialClientId")
        queue(url, prompt, client_id)
        losses = page.evaluate(f"window.app.graph.getNodeById({TRAINER}).personalizeLoss?.losses?.length")
        assert losses == 24, f"root trainer: {losses} losses drawn, 24 expected"
        show(page, int(TRAINER), out / "loss_chart_root.png")

        # the trainer moved into a subgraph: events name it "<instance>:<inner>"; the root has no node of its id
        instance, inner = page.evaluate(f"""(() => {{ const g = window.app.graph;
            const made = g.convertToSubgraph(new Set([g.getNodeById({TRAINER})])), node = made.node ?? made;
            const trainer = node.subgraph.nodes.find((n) => n.comfyClass === "PersonalizeTrainLoRA");
            trainer.personalizeLoss = undefined; return [node.id, trainer.id]; }})()""")
        inner_prompt = renamed(prompt, TRAINER, f"{instance}:{inner}")
        inner_prompt[f"{instance}:{inner}"]["inputs"]["steps"] = 12
        queue(url, inner_prompt, client_id)
        losses = page.evaluate(f"""window.app.graph.getNodeById({instance}).subgraph.getNodeById({inner})
            .personalizeLoss?.losses?.length""")
        assert losses == 12, f"trainer in a subgraph: {losses} losses drawn, 12 expected"
        assert not page.evaluate(f"window.app.graph.getNodeById({inner})?.personalizeLoss"), "drawn on a root node"

        # score badges: one per image, each thumbnail loaded from /view
        page.evaluate("wf => window.app.loadGraphData(wf)", json.loads(SCORING.read_text()))
        queue(url, scoring, client_id)
        images = scoring[next(k for k, n in scoring.items() if n["class_type"] == "EmptyLatentImage")]["inputs"]
        page.wait_for_function(f"""window.app.graph.getNodeById({SCORER}).personalizeScores?.images?.every(
            (img) => img.complete && img.naturalWidth > 0)""", timeout=30_000)
        badges = page.evaluate(f"window.app.graph.getNodeById({SCORER}).personalizeScores.badges.length")
        assert badges == images["batch_size"], f"{badges} badges for {images['batch_size']} images"
        show(page, int(SCORER), out / "score_badges.png")

        # status text: a rerun taken from the cache keeps it (its nodes get no "executing", nor "executed")
        status = f"window.app.graph.getNodeById({RANKER}).personalizeStatus"
        first = page.evaluate(status)
        assert first and first[0].startswith("kept 2 of 4"), first
        queue(url, scoring, client_id)
        time.sleep(1)
        assert page.evaluate(status) == first, page.evaluate(status)
        ours = [e for e in errors if "/extensions/" in e]
        assert not ours, ours
        browser.close()
    print(f"ok: loss chart on the root trainer (24 steps) and inside subgraph {instance} (12 steps); {badges} score "
          "badges with their thumbnails; status text kept over a cached rerun; new seeds fixed; examples without "
          f"overlaps; screenshots in {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", required=True)
    ap.add_argument("--python", default=sys.executable, help="the Python that runs ComfyUI")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as base:
        server = subprocess.Popen([args.python, "-c", SERVE, str(ROOT), base, args.comfyui, str(WORKFLOW),
                                   str(SCORING)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            line = ""
            while not line.startswith('{"url"'):  # past anything else the setup prints
                line = server.stdout.readline()
                if not line:
                    raise RuntimeError("the ComfyUI server did not start (see above)")
            started = json.loads(line)
            check(started["url"], *started["prompts"], out, args.chromium)
        finally:
            server.stdin.close()
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
