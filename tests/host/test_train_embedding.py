"""Textual Inversion and pivotal tuning inside real ComfyUI: only the new vectors train, the saved file gives the
in-graph conditioning through the stock embedding:NAME syntax, and the pivotal LoRA loads in LoraLoader."""
import copy

import pytest
import torch
from comfy_tiny import weights_hash
from safetensors.torch import load_file
from test_train_lora import dataset, ksample, run_node

pytestmark = pytest.mark.host
ARGS = dict(steps=3, learning_rate=5e-2, batch_size=2, seed=0, dtype="auto", gradient_checkpointing=False,
            token="zwx", init_word="dog", num_vectors=2)


@pytest.fixture(scope="module")
def nodes(comfy):
    from comfyui_personalize.nodes.save_embedding import PersonalizeSaveEmbedding
    from comfyui_personalize.nodes.save_lora import PersonalizeSaveLoRA
    from comfyui_personalize.nodes.train_embedding import PersonalizeTrainPivotal, PersonalizeTrainTextualInversion
    return PersonalizeTrainTextualInversion, PersonalizeTrainPivotal, PersonalizeSaveEmbedding, PersonalizeSaveLoRA


def stock_clip(comfy, clip):
    """The CLIP as CheckpointLoader gives it: its tokenizer looks in models/embeddings."""
    out = clip.clone()
    out.tokenizer = copy.copy(clip.tokenizer)
    out.tokenizer.clip_l = copy.copy(clip.tokenizer.clip_l)
    out.tokenizer.clip_l.embedding_directory = comfy.folder_paths.get_folder_paths("embeddings")
    return out


def encode(comfy, clip, text):
    return comfy.nodes.CLIPTextEncode().encode(clip, text)[0][0][0]


def test_textual_inversion_trains_only_the_token_and_the_file_gives_the_same_conditioning(comfy, tiny_sd15, nodes):
    import comfy.model_management as mm

    from comfyui_personalize.training.errors import InputError

    train_ti, _, save_embedding, _ = nodes
    model, clip, vae = tiny_sd15
    mm.unload_all_models()  # hash the shared model's own weights, not an earlier test's patched ones
    table = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight
    before_table, before_clip, before_unet = table.detach().to("cpu", copy=True), weights_hash(clip.cond_stage_model), \
        weights_hash(model.model)
    out_clip, embedding, loss = run_node(train_ti, model=model, clip=clip, vae=vae, dataset=dataset(), **ARGS).result
    assert len(loss["loss"]) == 3 and set(embedding) == {"clip_l"} and embedding["clip_l"].shape == (2, 768)
    init = before_table[clip.tokenizer.clip_l.tokenizer("dog")["input_ids"][1]]
    assert (embedding["clip_l"] - init.float()).abs().max() > 1e-4  # the vectors moved from the init word
    mm.unload_all_models()
    assert torch.equal(clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight.cpu(), before_table)
    assert weights_hash(clip.cond_stage_model) == before_clip and weights_hash(model.model) == before_unet

    name = run_node(save_embedding, embedding=embedding, name="", subfolder="", if_exists="overwrite").result[0]
    assert name == "zwx"
    for subfolder in ("my embs", "a/b c", "x(1)"):  # "embedding:my embs/zwx" is read as embedding:my: vectors lost
        with pytest.raises(InputError) as e:
            run_node(save_embedding, embedding=embedding, name="", subfolder=subfolder, if_exists="overwrite")
        assert e.value.input_name == "subfolder"
    nested = run_node(save_embedding, embedding=embedding, name="", subfolder="sd1.5/pets", if_exists="overwrite")
    assert nested.result[0] == "sd1.5/pets/zwx"
    torch.testing.assert_close(encode(comfy, stock_clip(comfy, clip), "a photo of embedding:sd1.5/pets/zwx dog"),
                               encode(comfy, out_clip, "a photo of embedding:zwx dog"), rtol=0, atol=0)
    saved = load_file(str(comfy.models / "embeddings" / "zwx.safetensors"))
    assert set(saved) == {"clip_l"} and torch.equal(saved["clip_l"], embedding["clip_l"])
    prompt = "a photo of embedding:zwx dog"
    ours, stock = encode(comfy, out_clip, prompt), encode(comfy, stock_clip(comfy, clip), prompt)
    torch.testing.assert_close(ours, stock, rtol=0, atol=0)
    plain = "a photo of a dog"  # prompts without the token are untouched
    torch.testing.assert_close(encode(comfy, out_clip, plain), encode(comfy, clip, plain), rtol=0, atol=0)
    assert not torch.equal(ours, encode(comfy, clip, "a photo of dog dog"))


def test_pivotal_lora_and_embedding_load_in_stock_nodes(comfy, tiny_sd15, nodes):
    _, train_pivotal, save_embedding, save_lora = nodes
    model, clip, vae = tiny_sd15
    out_model, out_clip, lora, embedding, loss = run_node(
        train_pivotal, model=model, clip=clip, vae=vae, dataset=dataset(caption="a photo of qwv dog"),
        embedding_lr=5e-2, rank=4, alpha=4.0,
        targets="attention", **dict(ARGS, token="qwv", learning_rate=1e-2)).result
    assert len(loss["loss"]) == 3 and any(v.abs().sum() > 0 for k, v in lora.items() if k.endswith("up.weight"))
    run_node(save_embedding, embedding=embedding, name="", subfolder="", if_exists="overwrite")
    lora_name = run_node(save_lora, lora=lora, name="pivotal", subfolder="", save_dtype="fp32",
                         if_exists="overwrite", bundle_embedding=embedding).result[0]
    saved = load_file(str(comfy.models / "loras" / lora_name))
    # A1111's Lora extension: key.split(".")[1:3] = (embedding name, encoder key) -> the embedding file's dict
    bundle = {k.split(".")[1:3][1]: v for k, v in saved.items() if k.startswith("bundle_emb.")}
    assert {k.split(".")[1] for k in saved if k.startswith("bundle_emb.")} == {"qwv"}
    assert bundle.keys() == embedding.keys() and all(torch.equal(bundle[k], embedding[k]) for k in bundle)
    stock_model, _ = comfy.nodes.LoraLoader().load_lora(model, clip, lora_name, 1.0, 0.0)  # skips bundle_emb
    stock = stock_clip(comfy, clip)
    prompt = "a photo of embedding:qwv dog"
    torch.testing.assert_close(ksample(comfy, out_model, out_clip, prompt=prompt),
                               ksample(comfy, stock_model, stock, prompt=prompt), rtol=0, atol=1e-5)


def test_bad_inputs_name_the_input(comfy, tiny_sd15, nodes):
    from comfyui_personalize.training.datasets import PriorPreservation
    from comfyui_personalize.training.errors import InputError
    train_ti = nodes[0]
    model, clip, vae = tiny_sd15
    cases = [({"token": "two words"}, "token"), ({"dataset": dataset(caption="a photo of a dog")}, "token"),
             ({"prior": PriorPreservation("prior_prediction", "a photo of a dog")}, "prior"),
             ({"init_word": " "}, "init_word"), ({"learning_rate": 0.0}, "learning_rate")]
    for override, name in cases:
        args = dict(ARGS, dataset=dataset(), **{k: v for k, v in override.items() if k != "dataset"})
        if "dataset" in override:
            args["dataset"] = override["dataset"]
        with pytest.raises(InputError) as e:
            run_node(train_ti, model=model, clip=clip, vae=vae, **args)
        assert e.value.input_name == name, override


@pytest.mark.parametrize("caption, without", [
    ("a photo of zwx.", "a photo of ."), ("zwx's dog", "'s dog"), ("photo,zwx dog", "photo, dog"),
    ("a dog named zwx!", "a dog named !"), ("a (zwx:1.2) dog", "a dog"), ("zwx, a dog", ", a dog")])
def test_the_token_next_to_punctuation_is_read_by_comfyuis_tokenizer(comfy, tiny_sd15, caption, without):
    """Captions end in "." and names take "'s": "embedding:zwx." named no embedding, so ComfyUI dropped the word and
    the vectors got no gradient (Textual Inversion failed, pivotal and fast tune trained the LoRA alone)."""
    from comfyui_personalize.nodes.embeddings import clip_with_embeddings, reads_embedding
    from comfyui_personalize.training.embedding import with_embedding_syntax

    clip = clip_with_embeddings(tiny_sd15[1], {"zwx": {"clip_l": torch.randn(2, 768)}})
    rewritten = with_embedding_syntax(caption, "zwx")
    assert reads_embedding(clip, rewritten), rewritten
    end = clip.tokenizer.clip_l.end_token

    def words(text):  # the word ids up to the end token (the vectors and the padding left out)
        ids = [t[0] for chunk in clip.tokenize(text)["l"] for t in chunk if isinstance(t[0], int)]
        return ids[:ids.index(end) + 1]

    assert words(rewritten) == words(without)  # the added spaces change no other token

def test_a_caption_whose_token_comfyui_cannot_read_is_refused(comfy, tiny_sd15):
    from comfyui_personalize.nodes.embeddings import clip_with_embeddings, reads_embedding

    clip = clip_with_embeddings(tiny_sd15[1], {"zwx": {"clip_l": torch.randn(2, 768)}})
    assert not reads_embedding(clip, "a photo of embedding:zwx.")  # what the old rewriting made of "zwx."
    assert reads_embedding(clip, "a photo of embedding:zwx .")


def test_previews_show_the_learned_word_and_captions_may_name_it_as_comfyui_does(comfy, tiny_sd15, nodes,
                                                                                  monkeypatch):
    """A preview prompt written like the captions ("zwx") used to sample the untrained plain word; a caption
    already written "embedding:zwx" was refused as not containing the token."""
    from comfyui_personalize.nodes.embeddings import reads_embedding
    from comfyui_personalize.nodes.session import TrainingSession
    from comfyui_personalize.training.options import TrainOptions

    seen = []
    monkeypatch.setattr(TrainingSession, "sample", lambda self, prompt, size, seed: seen.append(
        (prompt, reads_embedding(self.host.clip, prompt))))
    model, clip, vae = tiny_sd15
    options = TrainOptions(sample_every=2, sample_prompt="a photo of zwx dog on the beach")
    run_node(nodes[0], model=model, clip=clip, vae=vae, dataset=dataset(caption="a photo of embedding:zwx dog"),
             options=options, **dict(ARGS, steps=2))
    assert seen == [("a photo of embedding:zwx dog on the beach", True)]


def test_pivotal_saves_every_n_steps_hold_the_lora_with_its_vectors(comfy, tiny_sd15, nodes):
    """The saves every N steps wrote the embedding alone, which without its LoRA is not the model at that step."""
    from safetensors import safe_open

    from comfyui_personalize.training.options import TrainOptions
    loras, embeddings = (comfy.models / kind / "personalize_checkpoints" for kind in ("loras", "embeddings"))
    for old in [*loras.glob("qwz_*"), *embeddings.glob("qwz_*")]:
        old.unlink()
    model, clip, vae = tiny_sd15
    run_node(nodes[1], model=model, clip=clip, vae=vae, dataset=dataset(caption="a photo of qwz dog"),
             options=TrainOptions(save_every=2), embedding_lr=5e-2, rank=4, alpha=4.0, targets="attention",
             **dict(ARGS, token="qwz", steps=4))
    assert [p.name for p in embeddings.glob("qwz_*")] == ["qwz_step00002.safetensors"]
    assert [p.name for p in loras.glob("qwz_*")] == ["qwz_lora_step00002.safetensors"]
    with safe_open(str(loras / "qwz_lora_step00002.safetensors"), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sd_v1" and f.metadata()["personalize.token"] == "qwz"
        assert any(k.startswith("lora_unet_") and k.endswith(".lora_up.weight") for k in f.keys())
    stock, _ = comfy.nodes.LoraLoader().load_lora(model, clip, "personalize_checkpoints/qwz_lora_step00002.safetensors",
                                                  1.0, 0.0)
    assert len(stock.patches) > 0  # LoraLoader reads it


def test_an_init_word_longer_than_the_vectors_is_named(comfy, tiny_sd15, nodes, caplog):
    """"golden retriever" with one vector silently started from "golden" (the colour)."""
    model, clip, vae = tiny_sd15
    with caplog.at_level("WARNING"):
        run_node(nodes[0], model=model, clip=clip, vae=vae, dataset=dataset(),
                 **dict(ARGS, steps=1, init_word="golden retriever", num_vectors=1))
    assert "'golden retriever' is 2 tokens" in caplog.text and "set num_vectors to 2" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        run_node(nodes[0], model=model, clip=clip, vae=vae, dataset=dataset(),
                 **dict(ARGS, steps=1, init_word="golden retriever", num_vectors=2))
    assert "init_word" not in caplog.text


def test_several_init_words_start_the_vectors_from_the_one_the_model_sees_in_the_images(comfy, tiny_sd15, nodes,
                                                                                        monkeypatch, caplog):
    """init_word 'dog, cat, car': the base model denoises the subject images with each word written in the caption
    in place of the token; the vectors start from the word with the lowest error (training/init_word.py)."""
    import comfy.model_management as mm

    from comfyui_personalize.nodes import train_embedding
    from comfyui_personalize.training.errors import InputError

    model, clip, vae = tiny_sd15
    mm.unload_all_models()
    before = weights_hash(model.model)
    seen = {}
    ranked = train_embedding.denoising_errors

    def spy(words, buckets, caption_with, *args, **kwargs):
        seen["captions"] = [caption_with(c, "car") for b in buckets for c in b.captions]
        seen["errors"] = ranked(words, buckets, caption_with, *args, **kwargs)
        return seen["errors"]

    def train(init_word):
        return run_node(nodes[0], model=model, clip=clip, vae=vae, dataset=dataset(),
                        **dict(ARGS, steps=1, learning_rate=1e-9, init_word=init_word, num_vectors=1)).result[1]

    monkeypatch.setattr(train_embedding, "denoising_errors", spy)
    train("dog, cat, car")
    errors = seen["errors"]
    assert seen["captions"] == ["a photo of car dog"] * 2  # the caption as written, the word for the token
    assert len(set(errors.values())) == 3  # the word reaches the model
    chosen = min(errors, key=errors.get)
    with caplog.at_level("INFO"):  # listed last, behind the placeholder the vectors are made with first
        embedding = train(", ".join(sorted(errors, key=errors.get, reverse=True)))
    assert seen["errors"] == errors  # the same draws whatever the order
    assert embedding.metadata["personalize.init_word"] == chosen and f"best with {chosen!r}" in caplog.text
    table = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight.detach().float().cpu()
    word_id = clip.tokenizer.clip_l.tokenizer(chosen)["input_ids"][1]
    torch.testing.assert_close(embedding["clip_l"][0], table[word_id], atol=1e-6, rtol=0)  # lr 1e-9: the start
    mm.unload_all_models()
    assert weights_hash(model.model) == before
    with pytest.raises(InputError, match="init_word: lists 2 candidates, but resume_from"):
        run_node(nodes[0], model=model, clip=clip, vae=vae, dataset=dataset(),
                 **dict(ARGS, steps=1, init_word="dog, cat", resume_from="zwx.safetensors"))
