"""Personalize Train Textual Inversion and Personalize Train Pivotal (the same token vectors plus a UNet LoRA)."""
from __future__ import annotations

import dataclasses
import logging
import re

import comfy.model_management as mm
import comfy.sd
import folder_paths
import torch
from comfy_api.latest import io

from ..training.embedding import (
    TextualInversion,
    TrainedEmbedding,
    check_token_name,
    initial_vectors,
    with_embedding_syntax,
)
from ..training.errors import InputError
from ..training.files import architecture, base_model_metadata, load_safetensors, lora_metadata
from ..training.init_word import candidate_words, denoising_errors, pick_init_word
from ..training.lora import UNET_TARGET_PRESETS, LoRANetwork, TrainedLoRA
from ..training.regularizers import FastTuneRegularizer, NearestTokenContrastive
from ..training.trainer import ParamGroup
from .dual_path_training import TrainingBlend, with_hard_captions
from .embeddings import clip_with_embeddings, init_ids, reads_embedding, text_encoders, token_table
from .session import (
    ALPHA_TOOLTIP,
    RANK_TOOLTIP,
    TARGETS_TOOLTIP,
    TrainingSession,
    common_inputs,
    save_intermediate,
)
from .types import Embedding

log = logging.getLogger(__name__)
NONE = "none"
INIT_WORD_TOOLTIP = ("A word close to the subject (e.g. 'dog'): the vectors start from its token embeddings, the "
                     "nearest real tokens. Several words separated by commas (e.g. 'dog, cat, plush toy'): the one "
                     "the model itself denoises the images best with is picked before training (logged, and kept "
                     "in the file's metadata).")


def _embedding_inputs() -> list:
    return [
        io.String.Input("token", default="", tooltip="The word the captions use for the subject (e.g. from "
                        "Personalize Identifier); prompts then use embedding:<token>."),
        io.String.Input("init_word", default="person", tooltip=INIT_WORD_TOOLTIP),
        io.Int.Input("num_vectors", default=1, min=1, max=16, tooltip="Tokens the embedding takes in a prompt."),
    ]


def _init_vectors(clip, init_word: str, num_vectors: int, warn: bool = True) -> dict[str, torch.Tensor]:
    vectors, longest = {}, 0
    with torch.no_grad():
        for key, (_, tok, encoder) in text_encoders(clip).items():
            ids = init_ids(tok, init_word)
            vectors[key] = initial_vectors(token_table(encoder), ids, num_vectors)
            longest = max(longest, len(ids))
    if warn and longest > num_vectors:  # "golden retriever" with one vector starts from "golden", the colour
        log.warning("init_word %r is %d tokens; the %d vector(s) start from the first %d only; set num_vectors to "
                    "%d to start from the whole word", init_word, longest, num_vectors, num_vectors, longest)
    return vectors


def _make_inversion(session: TrainingSession, token: str, init_word: str, num_vectors: int,
                    resume_from: str, warn: bool = True) -> TextualInversion:
    inversion = TextualInversion(token, _init_vectors(session.host.clip, init_word, num_vectors, warn))
    if resume_from != NONE:
        path = folder_paths.get_full_path("embeddings", resume_from)
        if path is None or not path.endswith(".safetensors"):
            raise InputError("resume_from", f"{resume_from!r} is not a .safetensors file in models/embeddings")
        inversion.load_file_tensors(load_safetensors(path, "resume_from", "an embedding"))
    return inversion


def _pick_init_word(session: TrainingSession, data, inversion: TextualInversion, words: list[str]) -> str:
    """Of several candidate init words, the one the model denoises the subject images best with
    (training/init_word.py); the vectors restart from it."""
    host, name = session.host, f"embedding:{inversion.token}"
    pattern = re.compile(r"(?<![\w:])" + re.escape(name) + r"(?![\w])")
    errors = denoising_errors(words, data.buckets, lambda caption, word: pattern.sub(word, caption),
                              host.encode_text, host.predict, host.schedule, host.model.load_device,
                              session.cfg.seed, on_word=mm.throw_exception_if_processing_interrupted)
    chosen = pick_init_word(words, errors)
    inversion.load_file_tensors(_init_vectors(host.clip, chosen, inversion.num_vectors), "init_word")
    return chosen


def _fast_tune_regularizer(clip, inversion: TextualInversion, net: LoRANetwork, fast: dict, device):
    """The fast-tune regulariser: the vectors near real tokens of their own encoder's table, the LoRA near its
    start (zero change: the up factors start at zero)."""
    contrastive = {}
    for key, (_, tok, encoder) in text_encoders(clip).items():
        special = {t for t in (tok.start_token, tok.end_token, tok.pad_token) if t is not None}
        contrastive[key] = NearestTokenContrastive(token_table(encoder), exclude=special).to(device)
    return FastTuneRegularizer(dict(inversion.vectors), contrastive, list(net.parameters()), fast["nn_weight"],
                               fast["l2_weight"])


def _train(cls, model, clip, vae, dataset, prior, options, cfg_args: dict, token: str, init_word: str,
           num_vectors: int, resume_from: str, lora_args: dict | None, fast: dict | None = None):
    """Shared by the TI, pivotal and fast-tune nodes: returns (session, clip with the embedding,
    TrainedEmbedding, LoRA network or None, losses). ``fast``: the fast-tune regulariser weights."""
    token = check_token_name(token)
    if prior is not None and lora_args is None:
        raise InputError("prior", "Textual Inversion only learns the new token, so the model's prior cannot drift; "
                                  "disconnect prior (use it with Train Pivotal, LoRA or DreamBooth)")
    dataset = dataclasses.replace(dataset, captions=tuple(with_embedding_syntax(c, token) for c in dataset.captions))
    if options is not None and options.sample_prompt:  # the previews show the word as the captions train it
        options = dataclasses.replace(options, sample_prompt=with_embedding_syntax(options.sample_prompt, token,
                                                                                   required=False))
    session = TrainingSession(model, clip, vae, dataset, prior, options, cfg_args, cls.hidden.unique_id)
    host = session.host
    words = candidate_words(init_word)
    if len(words) > 1 and resume_from != NONE:
        raise InputError("init_word", f"lists {len(words)} candidates, but resume_from continues from saved vectors; "
                                      "give one init word (it is kept in the metadata) or set resume_from to none")
    with torch.inference_mode(False), torch.enable_grad():
        # several candidates: the first is a placeholder until the images pick one (the captions need the vectors)
        inversion = _make_inversion(session, token, words[0], num_vectors, resume_from, warn=len(words) == 1)
        host.clip = clip_with_embeddings(host.clip, {token: inversion.vectors})
        host.cache_tokens = False
        for caption in sorted(set(dataset.captions)):  # a caption that drops the token trains nothing
            if not reads_embedding(host.clip, caption):
                raise InputError("dataset", f"ComfyUI's tokenizer does not read the token in caption {caption!r}; "
                                            f"write {token} as a word of its own")
        preview = session.options.sample_prompt
        if session.options.sample_every and preview and not reads_embedding(host.clip, preview):
            log.warning("sample_prompt %r does not contain the token %r: the previews show the model without the "
                        "learned word", preview, token)
        net = None
        params = [*inversion.parameters()]
        groups = None
        if lora_args is not None:
            net = LoRANetwork(host.unet_lora_targets(lora_args["targets"]), lora_args["rank"], lora_args["alpha"],
                              seed=cfg_args["seed"])
            groups = [ParamGroup(params, lora_args["embedding_lr"]),
                      ParamGroup(list(net.parameters()), cfg_args["learning_rate"])]
        a_blend = 1.0 if fast is None else fast.get("a_blend", 1.0)
        blend = TrainingBlend(host, net, a_blend) if a_blend < 1.0 else None  # DATE: tune through the blend
        data = session.data(text_trains=True)
        init_word = words[0] if len(words) == 1 else _pick_init_word(session, data, inversion, words)
        inversion.to(host.model.load_device)
        if net is not None:
            net.to(host.model.load_device)
        if blend is not None:  # the hard captions: the learned word's nearest real word, now at its start
            data = with_hard_captions(data, host)

        def save(step: int) -> str:  # pivotal / fast tune: the LoRA too, which only works with its vectors
            paths = [save_intermediate("embeddings", f"{token}_step{step:05d}", inversion.file_tensors(),
                                       {"personalize.token": token})]
            if net is not None:
                meta = {**base_model_metadata(host.family, host.prediction), "personalize.token": token,
                        "personalize.step": str(step)}
                paths.append(save_intermediate("loras", f"{token}_lora_step{step:05d}",
                                               net.kohya_state_dict(torch.float16), meta))
            return " and ".join(paths)

        regularizer = (None if fast is None or net is None else
                       _fast_tune_regularizer(clip, inversion, net, fast, host.model.load_device))
        if regularizer is not None and not regularizer.active:
            regularizer = None  # both weights 0: plain pivotal tuning
        attach = [] if net is None else [net.attached() if blend is None else blend.attached()]
        losses = session.run(data, groups or params, attach, text_trains=True,
                             frozen=net.disabled if net is not None else None, save=save, regularizer=regularizer,
                             preview=None if blend is None else blend.preview)
    tensors = inversion.file_tensors()
    meta = {"personalize.token": token, "personalize.init_word": init_word, "personalize.steps": str(cfg_args["steps"]),
            "personalize.base_model": host.family,
            "modelspec.architecture": f"{architecture(host.family, host.prediction)}/textual-inversion",
            "personalize.final_loss": f"{losses[-1]:.6g}"}
    embedding = TrainedEmbedding(token, tensors, meta)
    out_clip = clip_with_embeddings(clip, {token: tensors})
    return session, out_clip, embedding, net, losses


def embedding_files() -> list[str]:
    return [NONE] + [f for f in folder_paths.get_filename_list("embeddings") if f.endswith(".safetensors")]


class PersonalizeTrainTextualInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PersonalizeTrainTextualInversion",
            display_name="Personalize Train Textual Inversion",
            category="personalize/training",
            description="Learns new token vectors for the subject (every text encoder of the CLIP); the model "
                        "and every existing token stay as they are. Prompts use embedding:<token>.",
            inputs=common_inputs(learning_rate=5e-3, steps=1000) + _embedding_inputs() + [
                io.Combo.Input("resume_from", options=embedding_files(), default=NONE,
                               tooltip="Continue training an embedding saved in models/embeddings (its vectors "
                                       "replace the init word's)."),
            ],
            outputs=[io.Clip.Output(display_name="clip"), Embedding.Output(display_name="embedding"),
                     io.LossMap.Output(display_name="loss")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, steps, learning_rate, batch_size, seed, dtype, gradient_checkpointing,
                token, init_word, num_vectors, resume_from=NONE, prior=None, options=None) -> io.NodeOutput:
        cfg_args = dict(steps=steps, learning_rate=learning_rate, batch_size=batch_size, seed=seed, dtype=dtype,
                        gradient_checkpointing=gradient_checkpointing)
        _, out_clip, embedding, _, losses = _train(cls, model, clip, vae, dataset, prior, options, cfg_args, token,
                                                   init_word, num_vectors, resume_from, None)
        log.info("learned %d vectors for embedding:%s; loss %.4f -> %.4f", num_vectors, embedding.token, losses[0],
                 losses[-1])
        return io.NodeOutput(out_clip, embedding, {"loss": losses})


class PersonalizeTrainPivotal(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PersonalizeTrainPivotal",
            display_name="Personalize Train Pivotal (TI + LoRA)",
            category="personalize/training",
            description="Pivotal tuning: learns the subject's token vectors and a UNet LoRA together. Returns the "
                        "model with the LoRA, the CLIP resolving embedding:<token>, and both files' contents.",
            inputs=common_inputs(learning_rate=1e-4) + _embedding_inputs() + [
                io.Float.Input("embedding_lr", default=5e-4, min=1e-8, max=1.0, step=1e-6, round=False,
                               tooltip="The token vectors' learning rate (learning_rate is the LoRA's)."),
                io.Int.Input("rank", default=8, min=1, max=256, tooltip=RANK_TOOLTIP),
                io.Float.Input("alpha", default=8.0, min=0.01, max=1024.0, step=0.5, tooltip=ALPHA_TOOLTIP),
                io.Combo.Input("targets", options=list(UNET_TARGET_PRESETS), default="attention",
                               tooltip=TARGETS_TOOLTIP),
            ],
            outputs=pivotal_output_sockets(),
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, steps, learning_rate, batch_size, seed, dtype, gradient_checkpointing,
                token, init_word, num_vectors, embedding_lr, rank, alpha, targets, prior=None,
                options=None) -> io.NodeOutput:
        if not embedding_lr > 0:
            raise InputError("embedding_lr", f"must be positive, got {embedding_lr}")
        cfg_args = dict(steps=steps, learning_rate=learning_rate, batch_size=batch_size, seed=seed, dtype=dtype,
                        gradient_checkpointing=gradient_checkpointing)
        lora_args = dict(rank=rank, alpha=alpha, targets=targets, embedding_lr=embedding_lr)
        return pivotal_outputs(cls, model, clip, vae, dataset, prior, options, cfg_args, token, init_word,
                               num_vectors, lora_args, "Personalize pivotal LoRA")


def pivotal_output_sockets() -> list:
    """What Train Pivotal and Fast Tune output, in this order (``pivotal_outputs`` fills them)."""
    return [io.Model.Output(display_name="model"), io.Clip.Output(display_name="clip"),
            io.LoraModel.Output(display_name="lora"), Embedding.Output(display_name="embedding"),
            io.LossMap.Output(display_name="loss")]


def pivotal_outputs(cls, model, clip, vae, dataset, prior, options, cfg_args: dict, token: str, init_word: str,
                    num_vectors: int, lora_args: dict, title: str, fast: dict | None = None) -> io.NodeOutput:
    """Train the vectors and the LoRA together; (model with the LoRA, clip, LORA, embedding, loss)."""
    session, out_clip, embedding, net, losses = _train(cls, model, clip, vae, dataset, prior, options, cfg_args,
                                                       token, init_word, num_vectors, NONE, lora_args, fast)
    extra = {"token": embedding.token, "prior": prior.mode if prior else "none"}
    if fast is not None:
        extra.update({f"fast_tune_{k}": str(v) for k, v in fast.items()})
    meta = lora_metadata(
        base_model=session.host.family, rank=lora_args["rank"], alpha=lora_args["alpha"],
        learning_rate=cfg_args["learning_rate"], steps=cfg_args["steps"], batch_size=cfg_args["batch_size"],
        resolution=session.size, num_images=len(dataset), seed=cfg_args["seed"], title=title,
        text_encoder_trained=False, prediction=session.host.prediction, targets=lora_args["targets"],
        **session.schedule_metadata(), captions=dataset.captions, extra=extra)
    lora = TrainedLoRA(net.kohya_state_dict(torch.float32), meta)
    out_model, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    return io.NodeOutput(out_model, out_clip, lora, embedding, {"loss": losses})


NODES = [PersonalizeTrainTextualInversion, PersonalizeTrainPivotal]
