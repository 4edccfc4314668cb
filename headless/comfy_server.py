"""Drive a real ComfyUI process: a tiny SD1.5 checkpoint, a server on loopback, UI -> API workflow conversion.

Used by the server test tier. Nothing here imports ComfyUI into the calling process: the checkpoint is built in
a subprocess (this file run as a script) and the server is a child process. All HTTP goes to 127.0.0.1 only.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

PACK_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_COMFYUI = Path(os.environ.get("COMFYUI_PATH", "/opt/comfyui-host"))
CHECKPOINT_VERSION = "tiny-sd15-v2"  # bump when the layout/init below changes, so cached files are rebuilt

# SD1.5 is detected by model_channels 320, context_dim 768, conv proj_in, no adm; the rest is read from shapes,
# so one level, one res block and one transformer each keeps the UNet at ~26 M params.
TINY_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
    "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
SD_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                   "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}


# ---------------------------------------------------------------- tiny checkpoint

def write_tiny_sd15_checkpoint(path, cache_dir=None, comfyui_path=DEFAULT_COMFYUI, timeout: float = 900) -> Path:
    """Write a random-weight checkpoint that CheckpointLoaderSimple detects as SD1.5 (tiny UNet, full CLIP-L and VAE).

    The key names come from ComfyUI's own model classes, built in a subprocess. With ``cache_dir`` the file is
    kept there as ``<CHECKPOINT_VERSION>.safetensors`` and reused (hard link, else copy) on later calls.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    target = Path(cache_dir) / f"{CHECKPOINT_VERSION}.safetensors" if cache_dir else path
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + f".{os.getpid()}.partial")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--write-tiny-checkpoint", str(partial),
               "--comfyui", str(comfyui_path)]
        log.info("building tiny SD1.5 checkpoint %s", target)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_child_env())
        if done.returncode != 0:
            partial.unlink(missing_ok=True)
            raise RuntimeError(f"tiny checkpoint build failed ({done.returncode}):\n{done.stderr[-4000:]}")
        os.replace(partial, target)
    if target != path:
        path.unlink(missing_ok=True)
        try:
            os.link(target, path)
        except OSError:
            shutil.copyfile(target, path)
    return path


def _random_like(key: str, t, gen):
    import torch

    if key.endswith("position_ids"):
        return torch.arange(t.shape[-1]).expand(t.shape).clone()
    if t.dim() >= 2:
        return torch.randn(t.shape, generator=gen) * 0.02
    return torch.ones(t.shape) if key.endswith(".weight") else torch.zeros(t.shape)  # 1-dim weights are norms


def _build_checkpoint_in_subprocess(out: str, comfyui_path: str) -> None:
    sys.path.insert(0, comfyui_path)
    from comfy.cli_args import args

    args.cpu = True
    import comfy.sd1_clip
    import comfy.supported_models
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from safetensors.torch import save_file

    parts = {
        "model.diffusion_model.": comfy.supported_models.SD15(TINY_UNET_CONFIG)
        .get_model({}, "model.diffusion_model.", device="cpu").diffusion_model.state_dict(),
        "cond_stage_model.": comfy.sd1_clip.SDClipModel(device="cpu").state_dict(),
        "first_stage_model.": AutoencoderKL(ddconfig=SD_VAE_DDCONFIG, embed_dim=4).state_dict(),
    }
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for prefix, sd in parts.items():
        for k, v in sd.items():
            if k in ("logit_scale", "transformer.text_projection.weight"):  # real SD1.5 files carry neither
                continue
            t = _random_like(k, v, gen)
            tensors[prefix + k] = t if k.endswith("position_ids") else t.to(torch.float16)
    save_file(tensors, out, metadata={"personalize": CHECKPOINT_VERSION})


# ---------------------------------------------------------------- server process

def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # no __pycache__ written into the ComfyUI tree
    env.setdefault("OMP_NUM_THREADS", str(max(1, os.cpu_count() or 1)))
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServerError(RuntimeError):
    pass


class ComfyServer:
    """``with ComfyServer(base_dir) as srv:`` runs ``main.py --cpu`` with every writable folder under ``base_dir``.

    ``base_dir`` gets models/, input/, output/, temp/, user/ and custom_nodes/<pack name> (a symlink to this pack),
    so nothing is written into the ComfyUI tree. The database lives in base_dir/user too.
    """

    def __init__(self, base_dir, comfyui_path=DEFAULT_COMFYUI, pack_dir=PACK_ROOT, pack_name="ComfyUI-Personalize",
                 port: int | None = None, startup_timeout: float = 300, extra_args=()):
        self.base = Path(base_dir).resolve()
        self.comfyui_path = Path(comfyui_path)
        self.pack_dir, self.pack_name = Path(pack_dir), pack_name
        self.port = port or _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args)
        self.log_path = self.base / "comfyui.log"
        self.proc: subprocess.Popen | None = None
        # Loopback only: never route through an HTTP(S)_PROXY from the environment.
        self._http = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # folders ComfyUI will read from / write to
    @property
    def models_dir(self) -> Path:
        return self.base / "models"

    @property
    def input_dir(self) -> Path:
        return self.base / "input"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    def __enter__(self) -> "ComfyServer":
        for sub in ("models/checkpoints", "models/loras", "input", "output", "temp", "user", "custom_nodes"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / self.pack_name
        if not link.exists():
            link.symlink_to(self.pack_dir, target_is_directory=True)
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--user-directory", str(self.base / "user"),
               "--database-url", f"sqlite:///{self.base / 'user' / 'comfyui.db'}",
               "--disable-auto-launch", "--disable-api-nodes", "--preview-method", "none", *self.extra_args]
        log.info("starting ComfyUI: %s", " ".join(cmd))
        self._log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.comfyui_path, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=_child_env())
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        if getattr(self, "_log_file", None):
            self._log_file.close()

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "<no server log>"

    def _fail(self, msg: str) -> ComfyServerError:
        return ComfyServerError(f"{msg}\n--- ComfyUI log tail ({self.log_path}) ---\n{self.log_tail()}")

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise self._fail(f"ComfyUI exited with code {self.proc.returncode}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                self.object_info()
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        raise self._fail(f"ComfyUI did not answer /object_info within {self.startup_timeout:.0f} s")

    # HTTP
    def _request(self, route: str, body: dict | None = None, timeout: float = 30):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + route, data=data,
                                     headers={"Content-Type": "application/json"} if data else {})
        with self._http.open(req, timeout=timeout) as resp:
            return json.loads(resp.read() or b"null")

    def object_info(self) -> dict:
        return self._request("/object_info")

    def queue(self, api_prompt: dict) -> str:
        """POST /prompt; returns the prompt id. A rejected prompt raises with ComfyUI's node_errors."""
        try:
            answer = self._request("/prompt", {"prompt": api_prompt, "client_id": uuid.uuid4().hex})
        except urllib.error.HTTPError as e:
            raise self._fail(f"/prompt rejected ({e.code}): {e.read().decode(errors='replace')[:4000]}") from None
        return answer["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return self._request(f"/history/{prompt_id}").get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 600, poll: float = 0.5) -> dict:
        """Poll /history/<id> until the prompt finished (success or error); returns the history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            entry = self.history(prompt_id)
            status = (entry or {}).get("status") or {}
            if entry is not None and (status.get("completed") or status.get("status_str") in ("success", "error")):
                return entry
            time.sleep(poll)
        raise self._fail(f"prompt {prompt_id} did not finish within {timeout:.0f} s")


# ---------------------------------------------------------------- workflows

def _links_by_id(workflow: dict) -> dict:
    """link id -> (from_node, from_slot); accepts the 0.4 list form and the 1.x object form."""
    out = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):
            out[link["id"]] = (link["origin_id"], link["origin_slot"])
        else:
            out[link[0]] = (link[1], link[2])
    return out


def _input_order(info: dict) -> list[tuple[str, list]]:
    spec = info.get("input", {})
    order = info.get("input_order") or {g: list(spec.get(g, {})) for g in ("required", "optional")}
    return [(name, spec[g][name]) for g in ("required", "optional")
            for name in order.get(g, []) if name in spec.get(g, {})]


def _is_widget(spec: list) -> bool:
    kind = spec[0] if spec else None
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput")


def _has_control(name: str, spec: list) -> bool:
    """The frontend's rule: the input's own control_after_generate, else an INT named seed/noise_seed has one."""
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("control_after_generate") is not None:
        return bool(opts["control_after_generate"])
    return spec[0] == "INT" and name in ("seed", "noise_seed")


def _default(spec: list) -> tuple[bool, object]:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in opts:
        return True, opts["default"]
    if isinstance(spec[0], list) and spec[0]:
        return True, spec[0][0]
    return False, None


def _is_control_value(value) -> bool:
    return isinstance(value, bool) or (isinstance(value, str) and value in CONTROL_VALUES)


def ui_workflow_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow (what the frontend saves) into the API prompt ``POST /prompt`` takes.

    Widget values are matched to the node's required-then-optional inputs in object_info order; the frontend's
    extra ``control_after_generate`` value (fixed/increment/...) after a seed is skipped. Muted (mode 2) and
    bypassed (mode 4) nodes and notes are dropped; links through Reroutes and bypassed nodes are followed,
    links from muted nodes are dropped, and inputs driven by a PrimitiveNode take the stored widget value.
    """
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = _links_by_id(workflow)

    def resolve(link_id, want_type=None, hops=0):
        if link_id is None or link_id not in links or hops > 64:
            return None
        src_id, slot = links[link_id]
        src = nodes.get(src_id)
        if src is None or src.get("mode") == 2:
            return None
        if src["type"] == "PrimitiveNode":
            return "widget"
        if src["type"] == "Reroute" or src.get("mode") == 4:
            # bypass passes through the first input of the same type (the frontend's rule); a Reroute has one input
            outs = src.get("outputs") or []
            want = want_type or (outs[slot].get("type") if slot < len(outs) else None)
            ins = src.get("inputs") or []
            match = [i for i in ins if src["type"] == "Reroute" or i.get("type") == want]
            return resolve(match[0].get("link"), want, hops + 1) if match else None
        return [str(src_id), slot]

    prompt = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if node.get("mode") in (2, 4) or kind in FRONTEND_ONLY:
            continue
        if kind not in object_info:
            raise ValueError(f"node {node['id']}: type {kind!r} is not installed on this server (or is a subgraph)")
        ui_inputs = {i["name"]: i for i in node.get("inputs") or []}
        values = node.get("widgets_values")
        values = values if values is not None else []
        pos, inputs = 0, {}
        for name, spec in _input_order(object_info[kind]):
            ui_in = ui_inputs.get(name, {})
            linked = resolve(ui_in.get("link"), ui_in.get("type"))
            widget = _is_widget(spec) and not (name in ui_inputs and "widget" not in ui_in)
            if widget:
                if isinstance(values, dict):
                    value, present = values.get(name), name in values
                else:
                    present = pos < len(values)
                    value = values[pos] if present else None
                    pos += 1
                    # old workflows stored the control as a bool; only a control-looking value is skipped
                    if _has_control(name, spec) and pos < len(values) and _is_control_value(values[pos]):
                        pos += 1
                if not present:  # what the frontend does for a widget the file has no value for
                    present, value = _default(spec)
                if present and linked in (None, "widget"):
                    inputs[name] = value
            if linked not in (None, "widget"):
                inputs[name] = linked
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs,
                                   "_meta": {"title": node.get("title") or kind}}
    return prompt


def cpu_overrides(api_prompt: dict) -> dict:
    """A copy of an API prompt made cheap enough for a CPU smoke run.

    Every input named ``steps`` becomes 2 (sampler, class-image and trainer steps alike), ``width``/``height``
    (unless 0, which takes its size from elsewhere) and the dataset's ``resolution`` become 64, ``batch_size``
    becomes 1 (latent batch and trainer batch alike; a workflow that ranks its images keeps its latent batch) and
    ``num_class_images`` becomes 2. Linked inputs (``[node, slot]``) are left alone. Example workflows keep
    realistic values for users; the server tests run them through this.
    """
    fixed = {"steps": 2, "width": 64, "height": 64, "resolution": 64, "batch_size": 1, "num_class_images": 2}
    ranks = any(node.get("class_type") == "PersonalizeRankByReward" for node in api_prompt.values())
    out = copy.deepcopy(api_prompt)
    for node in out.values():
        for name, value in node.get("inputs", {}).items():
            if ranks and node.get("class_type") == "EmptyLatentImage" and name == "batch_size":
                continue  # ranking needs a batch of candidates
            if name in ("width", "height") and value == 0:
                continue  # 0: the size comes from elsewhere (the model's native size, a dataset's buckets)
            if name in fixed and not isinstance(value, list):
                node["inputs"][name] = fixed[name]
    return out


if __name__ == "__main__":  # subprocess entry for write_tiny_sd15_checkpoint; imports ComfyUI here only
    import argparse

    logging.basicConfig(level=logging.INFO)
    ap = argparse.ArgumentParser()
    ap.add_argument("--write-tiny-checkpoint", required=True)
    ap.add_argument("--comfyui", default=str(DEFAULT_COMFYUI))
    a = ap.parse_args()
    _build_checkpoint_in_subprocess(a.write_tiny_checkpoint, a.comfyui)
