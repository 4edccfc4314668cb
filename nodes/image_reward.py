"""Load ImageReward and ImageReward Score: the scoring core (scoring/) as ComfyUI nodes.

The files come from models/image_reward (registered with folder_paths at import; nothing is downloaded). The
loaded model is wrapped in a ComfyUI ModelPatcher and loaded through model management before every scoring, so
other models can evict it and it comes back when needed.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..scoring.checkpoint import convert_to_safetensors
from ..scoring.files import checkpoint_path, find_reward_files
from ..scoring.preprocess import image_notes
from ..scoring.ranking import rank
from ..scoring.scorer import RewardScorer, load_scorer
from ..training.errors import InputError
from ..training.files import IF_EXISTS, resolve_output_path
from .reward_rank import single

log = logging.getLogger(__name__)

FOLDER = "image_reward"
EXTENSIONS = {".pt", ".pth", ".bin", ".safetensors"}
TOKENIZER_FOLDER = "bert-base-uncased"  # the tokenizer's own folder; its weight files are not checkpoints
PLACEHOLDER = "ImageReward.pt"  # offered when the folder is empty, so loading says where the files go
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROMPT_MODES = ("one for all", "one per line")
BADGE_THUMB_PX = 160  # longest side of the thumbnails under the score badges (web/js/score_badges.js)
BADGE_MAX_IMAGES = 64

# What the socket carries: LoadedImageReward.
ImageReward = io.Custom("PERSONALIZE_IMAGE_REWARD")


def register_folder() -> None:
    """models/image_reward with ImageReward's extensions; a folder the user already registered for
    image_reward (extra_model_paths.yaml runs before custom nodes load) is kept, and searched first."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    paths, extensions = folder_paths.folder_names_and_paths.get(FOLDER, ([], set()))
    paths = list(paths) + ([] if default in paths else [default])
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(extensions) | EXTENSIONS)


register_folder()


def checkpoint_files() -> list[str]:
    names = [n for n in folder_paths.get_filename_list(FOLDER)
             if not n.replace("\\", "/").startswith(TOKENIZER_FOLDER + "/")]
    return names or [PLACEHOLDER]


def folder_holding(name: str) -> Path:
    """The registered folder that has ``name`` (the first one when none has it: the error lists it)."""
    folders = folder_paths.get_folder_paths(FOLDER)
    for folder in folders:
        if (Path(folder) / name).is_file():
            return Path(folder)
    return Path(folders[0])


def pick_dtype(choice: str, load_device: torch.device) -> torch.dtype:
    """auto: fp16 where ComfyUI would run fp16 (most GPUs), else fp32. bf16 is refused where the GPU lacks it."""
    on_cpu = mm.is_device_cpu(load_device)
    if choice == "auto":
        return torch.float16 if not on_cpu and mm.should_use_fp16(load_device) else torch.float32
    if choice not in DTYPES:
        raise InputError("dtype", f"must be auto, {', '.join(DTYPES)}; got {choice!r}")
    if choice == "bf16" and not on_cpu:
        supported = (torch.cuda.is_bf16_supported() if load_device.type == "cuda"
                     else mm.should_use_bf16(load_device))
        if not supported:
            raise InputError("dtype", f"{mm.get_torch_device_name(load_device)} does not support bf16; "
                                      "pick fp16 or fp32")
    return DTYPES[choice]


def activation_bytes(scorer: RewardScorer, images: int) -> int:
    """A generous bound on the ViT's live activations for a chunk (the text side is far smaller), so model
    management frees that much besides the weights."""
    config = scorer.model.vision.config
    tokens = (config.image_size // config.patch_size) ** 2 + 1
    per_token = config.intermediate_size + 3 * config.hidden_size + 2 * config.num_attention_heads * tokens
    return images * tokens * per_token * scorer.dtype.itemsize * 2


@dataclass
class LoadedImageReward:
    scorer: RewardScorer
    patcher: comfy.model_patcher.ModelPatcher
    name: str

    def ready(self, batch_size: int) -> RewardScorer:
        """Load (or keep) the weights on the load device through model management, evicting others if needed.
        Fully: the port's layers are plain torch modules, which ComfyUI cannot run partially offloaded."""
        mm.load_models_gpu([self.patcher], memory_required=activation_bytes(self.scorer, batch_size),
                           force_full_load=True)
        return self.scorer

    def describe(self) -> str:
        dtype = str(self.scorer.dtype).removeprefix("torch.")
        return f"{self.name}, {dtype}, {self.patcher.load_device}"


class PersonalizeLoadImageReward(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PersonalizeLoadImageReward",
            display_name="Load ImageReward",
            category="personalize/reward",
            description="Loads the ImageReward preference model (Xu et al. 2023) from models/image_reward: "
                        "ImageReward.pt (or its safetensors conversion), bert-base-uncased/vocab.txt and "
                        "optionally med_config.json. Nothing is downloaded.",
            inputs=[
                io.Combo.Input("checkpoint", options=checkpoint_files(),
                               tooltip="A file in models/image_reward (e.g. ImageReward.pt from THUDM/ImageReward)."),
                io.Combo.Input("device", options=["default", "cpu"], default="default",
                               tooltip="default: ComfyUI's GPU; the model is moved there only while it scores "
                                       "and ComfyUI may offload it when other models need the memory."),
                io.Combo.Input("dtype", options=["auto", *DTYPES], default="auto",
                               tooltip="auto: fp16 on GPUs that run it well, else fp32. bf16 needs a GPU "
                                       "with bf16 (Ampere or newer)."),
            ],
            outputs=[ImageReward.Output(display_name="image_reward")],
        )

    @classmethod
    def execute(cls, checkpoint, device, dtype) -> io.NodeOutput:
        if device not in ("default", "cpu"):
            raise InputError("device", f"must be default or cpu, got {device!r}")
        if device == "cpu":
            load_device = offload_device = torch.device("cpu")
        else:
            load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
        torch_dtype = pick_dtype(dtype, load_device)
        files = find_reward_files(folder_holding(checkpoint), checkpoint)  # InputError lists missing files
        scorer = load_scorer(files, device=offload_device, dtype=torch_dtype)
        patcher = comfy.model_patcher.ModelPatcher(scorer.model, load_device=load_device,
                                                   offload_device=offload_device)
        loaded = LoadedImageReward(scorer, patcher, checkpoint)
        log.info("ImageReward ready (%s)", loaded.describe())
        return io.NodeOutput(loaded)


def prompt_list(prompt: str, mode: str, count: int) -> list[str]:
    """"one for all": the whole text is the prompt of every image. "one per line": one line per image, in
    batch order; blank lines are skipped, and the number of lines must equal the number of images."""
    if mode == "one for all":
        return [prompt]
    if mode != "one per line":
        raise InputError("prompt_mode", f"must be one of {list(PROMPT_MODES)}, got {mode!r}")
    lines = [line.strip() for line in prompt.splitlines() if line.strip()]
    if len(lines) != count:
        raise InputError("prompt", f"has {len(lines)} non-empty lines for {count} images; write one line per "
                                   "image (in batch order), or set prompt_mode to 'one for all'")
    return lines


@contextlib.contextmanager
def numbered_from(first: int, last: int):
    """An error about "image i" of a slice (a chunk, or one batch of an IMAGE list) says where the slice starts, so
    the user can find the image in the whole input."""
    try:
        yield
    except InputError as e:
        if first == 0:
            raise
        detail = str(e).removeprefix(f"{e.input_name}: ")
        raise InputError(e.input_name, f"{detail} (numbered within images {first}..{last} of the input: add "
                                       f"{first} for its position)") from e


def _score_in_chunks(scorer: RewardScorer, images: torch.Tensor, prompts: list[str], batch_size: int,
                     node_id, offset: int) -> torch.Tensor:
    """``offset``: the position of ``images[0]`` in the node's whole input (earlier batches of an IMAGE list)."""
    count = images.shape[0]
    bar = comfy.utils.ProgressBar(count, node_id=node_id)
    chunks = []
    for start in range(0, count, batch_size):
        mm.throw_exception_if_processing_interrupted()  # Cancel stops between chunks
        stop = min(start + batch_size, count)
        with numbered_from(offset + start, offset + stop - 1):
            chunks.append(scorer.score(images[start:stop], prompts if len(prompts) == 1 else prompts[start:stop],
                                       batch_size=stop - start))
        bar.update_absolute(stop, count)
    return torch.cat(chunks)


def summary_text(loaded: LoadedImageReward, scores: list[float], notes: list[str]) -> str:
    """The node's text: "image i" is a batch position (from 0, as ComfyUI's batch_index) and "#k" a rank (1 = best),
    as on the badges, so "#1" never means the second image in one line and the best in another."""
    order = rank(scores)
    place = {index: position + 1 for position, index in enumerate(order)}
    lines = [f"ImageReward ({loaded.describe()}): {len(scores)} image{'s' if len(scores) != 1 else ''}",
             f"best: image {order[0]} ({scores[order[0]]:+.4f}), mean {sum(scores) / len(scores):+.4f}"]
    lines += [f"note: {n}" for n in notes]  # before the per-image lines: the node shows the first lines
    lines += [f"image {i}: {s:+.4f} #{place[i]}" for i, s in enumerate(scores)]
    return "\n".join(lines)


def badge_previews(parts: list[torch.Tensor], scores: list[float], cls) -> list[dict]:
    """Small temp PNGs of the first images (over the batches of a list, in order) with their score and rank
    (1 = best), for the score badges the frontend draws on the node. Thumbnails keep the preview cheap."""
    saved, left = [], BADGE_MAX_IMAGES
    for part in parts:
        if left <= 0:
            break
        shown = part[:left].float()
        left -= shown.shape[0]
        shown = shown[..., :3] if shown.shape[-1] >= 3 else shown.expand(-1, -1, -1, 3)  # RGBA / gray -> RGB
        height, width = shown.shape[1:3]
        factor = BADGE_THUMB_PX / max(height, width)
        if factor < 1:
            size = (max(1, round(height * factor)), max(1, round(width * factor)))
            shown = torch.nn.functional.interpolate(shown.movedim(-1, 1), size=size, mode="bilinear",
                                                    antialias=True).movedim(1, -1).clamp(0, 1)
        saved += ui.ImageSaveHelper.save_images(shown, "personalize_reward", io.FolderType.temp, cls,
                                                compress_level=1)
    place = {index: position + 1 for position, index in enumerate(rank(scores))}
    return [{**dict(file), "index": i, "score": scores[i], "rank": place[i]} for i, file in enumerate(saved)]


class PersonalizeImageRewardScore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PersonalizeImageRewardScore",
            display_name="ImageReward Score",
            category="personalize/reward",
            description="Scores every image of the batch against its prompt with ImageReward: higher is better; "
                        "about 0 is average for SD 1.4 images (62% of them fall in -1..1, 98% in -2..2). "
                        "Outputs one FLOAT per image (a list, batch order) and a text summary shown on the node.",
            inputs=[
                ImageReward.Input("image_reward"),
                io.Image.Input("images"),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="The prompt the images were made from (only the first 35 tokens count, "
                                        "as in the official ImageReward)."),
                io.Combo.Input("prompt_mode", options=list(PROMPT_MODES), default="one for all",
                               tooltip="one for all: the whole text is every image's prompt. one per line: "
                                       "line i (blank lines skipped) is image i's prompt; the counts must match."),
                io.Int.Input("batch_size", default=64, min=1, max=256,
                             tooltip="Images per forward pass; lower it if the GPU runs out of memory."),
            ],
            outputs=[io.Float.Output(display_name="scores", is_output_list=True),
                     io.String.Output(display_name="summary")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
            is_input_list=True,
        )

    @classmethod
    def execute(cls, image_reward, images, prompt, prompt_mode, batch_size) -> io.NodeOutput:
        # Lists come whole (is_input_list): an IMAGE list (RebatchImages, a list of batches of other sizes) is
        # scored and ranked as one set of images, as Rank by Reward ranks it, not once per list item.
        image_reward, prompt_mode, batch_size = (single(image_reward, "image_reward"),
                                                 single(prompt_mode, "prompt_mode"), single(batch_size, "batch_size"))
        if not isinstance(image_reward, LoadedImageReward):
            raise InputError("image_reward", "connect the output of Load ImageReward")
        if batch_size < 1:
            raise InputError("batch_size", f"must be at least 1, got {batch_size}")
        parts = list(images)
        if not parts:
            raise InputError("images", "the list is empty")
        counts = [part.shape[0] if isinstance(part, torch.Tensor) else 0 for part in parts]
        offsets = [end - n for n, end in zip(counts, itertools.accumulate(counts))]
        notes = []
        for item, (part, offset, n) in enumerate(zip(parts, offsets, counts), 1):  # checks every batch first
            if n == 0 and len(parts) > 1:
                raise InputError("images", f"item {item} of the IMAGE list is an empty batch; remove it")
            with numbered_from(offset, offset + n - 1):
                notes += image_notes(part)
        notes = list(dict.fromkeys(notes))
        if len(prompt) not in (1, len(parts)):
            raise InputError("prompt", f"got a list of {len(prompt)} prompts for {len(parts)} image batches; give "
                                       "one prompt, or one per batch")
        if len(prompt) == 1:  # one text over the whole list: one prompt, or one line per image of the list
            whole = prompt_list(prompt[0], prompt_mode, sum(counts))
            per_part = [whole if len(whole) == 1 else whole[at:at + n] for n, at in zip(counts, offsets)]
        else:  # one text per batch of the list
            per_part = []
            for item, (text, n) in enumerate(zip(prompt, counts), 1):
                try:
                    per_part.append(prompt_list(text, prompt_mode, n))
                except InputError as e:
                    raise InputError("prompt", f"the prompt of item {item} of the list: "
                                               f"{str(e).removeprefix('prompt: ')}") from e
        per_image = [p for ps, n in zip(per_part, counts) for p in (ps * n if len(ps) == 1 else ps)]
        scorer = image_reward.ready(min(batch_size, max(counts)))
        notes += scorer.tokenize(per_image if len(set(per_image)) > 1 else per_image[:1])[2]  # "image i": position
        if not any(p.strip() for p in per_image):
            notes.append("the prompt is empty: ImageReward judges how well an image fits its prompt, so give the "
                         "prompt the images were made from")
        scores = [s for part, part_prompts, offset in zip(parts, per_part, offsets)
                  for s in _score_in_chunks(scorer, part, part_prompts, batch_size, cls.hidden.unique_id,
                                            offset).tolist()]
        for note in notes:
            log.info("ImageReward Score: %s", note)
        text = summary_text(image_reward, scores, notes)
        badges = badge_previews(parts, scores, cls)
        return io.NodeOutput(scores, text, ui={"text": (text,), "personalize_scores": badges})


class PersonalizeConvertImageReward(io.ComfyNode):
    """One-time conversion: the official pickle-format ImageReward.pt -> safetensors (port keys) beside it, so
    later loads memory-map a file that cannot carry code."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PersonalizeConvertImageReward",
            display_name="Convert ImageReward to safetensors",
            category="personalize/reward",
            description="Reads an ImageReward checkpoint from models/image_reward safely (tensors only; a file "
                        "with pickled code is refused), checks it against the architecture and writes it as "
                        "<name>.safetensors in the same folder. Pick the new file in Load ImageReward afterwards.",
            inputs=[
                io.Combo.Input("checkpoint", options=checkpoint_files(),
                               tooltip="The official ImageReward.pt in models/image_reward, to convert."),
                io.String.Input("name", default="ImageReward", tooltip="File name for the .safetensors file."),
                io.Combo.Input("if_exists", options=list(IF_EXISTS), default="error",
                               tooltip="When the .safetensors exists: error (keep it), overwrite or increment."),
            ],
            outputs=[io.String.Output(display_name="file")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, checkpoint, name, if_exists) -> io.NodeOutput:
        folder = folder_holding(checkpoint)
        source = checkpoint_path(folder, checkpoint)  # the tokenizer files are not needed to convert
        target = resolve_output_path(source.parent, "", name, ".safetensors", if_exists)
        if target == source:
            raise InputError("name", f"{target.name} is the checkpoint being converted; choose another name")
        written = convert_to_safetensors(source, target)
        # beside the checkpoint, as Load ImageReward lists it (resolved, a linked subfolder is elsewhere)
        relative = (source.parent / written.name).relative_to(os.path.abspath(folder)).as_posix()
        return io.NodeOutput(relative, ui=ui.PreviewText(f"wrote models/image_reward/{relative}; pick it in "
                                                         "Load ImageReward"))


NODES = [PersonalizeLoadImageReward, PersonalizeImageRewardScore, PersonalizeConvertImageReward]
