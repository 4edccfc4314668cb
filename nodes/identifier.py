"""Personalize Identifier: the DreamBooth rare-token word for the subject, and the prompts that use it."""
from __future__ import annotations

from comfy.sd1_clip import SDTokenizer
from comfy_api.latest import io, ui

from ..training.errors import InputError
from ..training.identifier import (
    WordTokenizer,
    class_prompt,
    hf_word_tokenizer,
    identifier_prompt,
    pick_identifier,
    validate_identifier,
)


def clip_word_tokenizers(clip) -> list[WordTokenizer]:
    """One WordTokenizer per text encoder of the CLIP (SD1: clip_l; SDXL: clip_g, clip_l; SD2: clip_h).

    ComfyUI's model tokenizers keep one SDTokenizer per encoder as attributes; a word is tokenized the way
    SDTokenizer.tokenize_with_weights does it (start token skipped, end token dropped).
    """
    if clip is None or getattr(clip, "tokenizer", None) is None:
        raise InputError("clip", "is missing; connect the CLIP output of the checkpoint loader")
    encoders = sorted(((name, t) for name, t in vars(clip.tokenizer).items() if isinstance(t, SDTokenizer)),
                      key=lambda item: item[0])
    if not encoders:
        raise InputError("clip", f"{type(clip.tokenizer).__name__} has no CLIP-style tokenizer; "
                                 "type the identifier into a prompt yourself")
    return [hf_word_tokenizer(name, t.tokenizer, t.tokens_start, t.tokenizer_adds_end_token) for name, t in encoders]


class PersonalizeIdentifier(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PersonalizeIdentifier",
            display_name="Personalize Identifier",
            category="personalize/training",
            description="Picks a rare word that is one token in every text encoder of the CLIP (DreamBooth's "
                        "rare-token identifier), or checks yours, and builds the instance and class prompts.",
            inputs=[
                io.Clip.Input("clip"),
                io.String.Input("class_noun", default="dog", tooltip="What the subject is: dog, person, backpack."),
                io.String.Input("identifier", default="",
                                tooltip="Empty: pick a rare one-token word. Typed: checked to be one token."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1,
                             tooltip="Which rare word is picked; the same seed gives the same word."),
            ],
            outputs=[
                io.String.Output(display_name="identifier"),
                io.String.Output(display_name="instance_prompt"),
                io.String.Output(display_name="class_prompt"),
            ],
        )

    @classmethod
    def execute(cls, clip, class_noun, identifier, seed) -> io.NodeOutput:
        class_text = class_prompt(class_noun)  # checks class_noun before any tokenizing
        tokenizers = clip_word_tokenizers(clip)
        if (identifier or "").strip():
            word = validate_identifier(identifier, tokenizers)
        else:
            word = pick_identifier(tokenizers, seed)
        instance_text = identifier_prompt(word, class_noun)
        encoders = ", ".join(t.name for t in tokenizers)
        preview = f"identifier: {word} (one token in {encoders})\n{instance_text}\n{class_text}"
        return io.NodeOutput(word, instance_text, class_text, ui=ui.PreviewText(preview))


NODES = [PersonalizeIdentifier]
