"""Attention nodes on tiny ComfyUI models: SDXL prompts, prompts of several 77-token chunks, inputs left alone."""
import pytest
import torch
from comfy_tiny import weights_hash
from test_attention_nodes import PROMPT, empty_latent, encode, nodes, p2p, reweight, sample  # noqa: F401
from test_sdxl import tiny_sdxl, tiny_sdxl_clip  # noqa: F401  (fixtures)
from test_train_lora import run_node

pytestmark = pytest.mark.host
# 8 copies of PROMPT (79 tokens) overflow the first chunk's 75 content tokens; "giraffe" is in the second only
LONG_PROMPT = ", ".join([PROMPT] * 8) + ", and a giraffe"


def test_p2p_on_sdxl_pairs_both_encoders_and_the_pooled_output(comfy, tiny_sdxl, tiny_sdxl_clip, nodes):  # noqa: F811
    model, clip = tiny_sdxl, tiny_sdxl_clip
    edited = PROMPT.replace("red", "blue")
    same, positive, latent = p2p(nodes, model, clip, PROMPT, PROMPT)
    swap, swapped, _ = p2p(nodes, model, clip, PROMPT, edited)
    (context, extra), = swapped
    assert context.shape == (2, 77, 2048) and extra["pooled_output"].shape == (2, 1280)  # CLIP-L + CLIP-G
    (src_context, src_extra), = encode(comfy, clip, PROMPT)
    (tgt_context, tgt_extra), = encode(comfy, clip, edited)
    # row 0 is the source prompt and row 1 the target, for the context and for CLIP-G's pooled output alike
    torch.testing.assert_close(context, torch.cat([src_context, tgt_context]))
    torch.testing.assert_close(extra["pooled_output"], torch.cat([src_extra["pooled_output"],
                                                                  tgt_extra["pooled_output"]]))
    assert (src_extra["pooled_output"] - tgt_extra["pooled_output"]).abs().max() > 1e-3  # the rows can be told apart
    pair = sample(comfy, same, positive, latent, clip, steps=2)
    torch.testing.assert_close(pair[1], pair[0], atol=1e-5, rtol=1e-5)
    edited_pair = sample(comfy, swap, swapped, latent, clip, steps=2)
    torch.testing.assert_close(edited_pair[0], pair[0], atol=1e-5, rtol=1e-5)  # the source keeps its prompt
    assert (edited_pair[1] - pair[1]).abs().max() > 1e-3  # the swap reaches the target


def test_reweight_reaches_words_in_the_second_77_token_chunk(comfy, tiny_sd15, nodes):  # noqa: F811
    from comfyui_personalize.nodes.attention_text import prompt_tokens, word_tokenizer
    model, clip, _ = tiny_sd15
    tokens = prompt_tokens(clip, LONG_PROMPT)
    giraffe = [p for p in range(tokens.length) if tokens.ids[p] in word_tokenizer(clip)("giraffe")]
    assert tokens.n_chunks == 2 and giraffe and min(giraffe) >= 77  # the word is in the second chunk only

    def image(words, mode):
        m, positive, latent = reweight(nodes, model, clip, words, mode=mode, text=LONG_PROMPT)
        return sample(comfy, m, positive, latent if mode == "p2p_locked" else empty_latent(), clip, steps=2)

    plain = sample(comfy, model, encode(comfy, clip, LONG_PROMPT), empty_latent(), clip, steps=2)
    for mode in ("value", "renormalized"):
        torch.testing.assert_close(image("giraffe:1", mode), plain, atol=1e-5, rtol=1e-5)
        assert (image("giraffe:4", mode) - plain).abs().max() > 1e-3, mode
    # p2p_locked: [unweighted, reweighted] pairs; batch 2 vs 1 changes the float summation order a little
    pair = image("giraffe:1", "p2p_locked")
    torch.testing.assert_close(pair, plain.expand_as(pair), atol=2e-3, rtol=1e-3)
    pair = image("giraffe:4", "p2p_locked")
    torch.testing.assert_close(pair[0], plain[0], atol=2e-3, rtol=1e-3)
    assert (pair[1] - pair[0]).abs().max() > 1e-3


def patcher_state(model) -> dict:
    """What a node must leave as it found on its input MODEL: the weights, the options, and which functions are
    registered as wrappers and callbacks (by identity) and as patches."""
    def registered(table):
        return {k: registered(v) if isinstance(v, dict) else [id(f) for f in v] for k, v in table.items()}
    return dict(weights=weights_hash(model.model), options=repr(model.model_options),
                wrappers=registered(model.wrappers), callbacks=registered(model.callbacks),
                patches=sorted(model.patches), object_patches=sorted(model.object_patches))


EDITS = {  # node helper and its inputs besides model and clip
    "reweight value": (reweight, dict(words="red:2", mode="value")),
    "reweight renormalized": (reweight, dict(words="red:2", mode="renormalized")),
    "reweight p2p_locked": (reweight, dict(words="red:2", mode="p2p_locked")),
    "p2p with local blend": (p2p, dict(source=PROMPT, target=PROMPT.replace("car", "bus"), blend_words="car, bus",
                                       word_windows="red:0.5")),
}


@pytest.mark.parametrize("edit", [*EDITS, "attention maps"])
def test_the_input_model_is_left_as_it_was(comfy, tiny_sd15, nodes, edit):  # noqa: F811
    """Each node patches a clone; after it ran and the clone sampled, the input MODEL is as before."""
    model, clip, _ = tiny_sd15
    before = patcher_state(model)
    if edit == "attention maps":  # samples inside the node
        run_node(nodes["maps"], model=model, clip=clip, text=PROMPT, words="red, street",
                 latent={"samples": torch.randn(1, 4, 8, 8)}, resolution="all", at_percent=0.5, seed=0)
    else:
        node, inputs = EDITS[edit]
        m, positive, latent = node(nodes, model, clip, **inputs)
        sample(comfy, m, positive, latent, clip, steps=2)
        assert patcher_state(m) != before  # the clone does carry the edit
    after = patcher_state(model)
    assert [key for key in before if after[key] != before[key]] == []


def test_two_embeddings_in_a_prompt_are_told_apart(comfy, tiny_sd15):  # noqa: F811
    """Every embedding vector once had the same placeholder id: looking up embedding:foo found embedding:bar's rows
    too, and refinement aligned foo -> bar as an unchanged token (bar took foo's maps)."""
    from comfyui_personalize.attention.align import refine_mapper
    from comfyui_personalize.attention.tokens import word_positions
    from comfyui_personalize.nodes.attention_text import prompt_tokens, word_tokenizer
    from comfyui_personalize.nodes.embeddings import clip_with_embeddings, text_encoders

    _, clip, _ = tiny_sd15
    (key, _), = text_encoders(clip).items()
    g = torch.Generator().manual_seed(0)
    clip = clip_with_embeddings(clip, {"foo": {key: torch.randn(2, 768, generator=g)},
                                       "bar": {key: torch.randn(2, 768, generator=g)}})
    tokens = prompt_tokens(clip, "a photo of embedding:foo in the style of embedding:bar")
    found = word_positions(tokens, ["embedding:foo", "embedding:bar"], word_tokenizer(clip))
    assert found == {"embedding:foo": [4, 5], "embedding:bar": [10, 11]}
    again = prompt_tokens(clip, "embedding:foo")  # the same vectors have the same ids wherever they are
    assert again.content_ids() == [tokens.ids[4], tokens.ids[5]] and tokens.ids[4] != tokens.ids[5]
    mapper, alphas = refine_mapper(prompt_tokens(clip, "a photo of embedding:foo"),
                                   prompt_tokens(clip, "a photo of embedding:bar on a beach"))
    assert alphas[4] == alphas[5] == 0  # bar is new in the target: it keeps its own maps
    assert alphas[1] == alphas[3] == 1 and mapper[1, 1] == 1


def test_a_word_is_not_found_inside_a_longer_word(comfy, tiny_sd15):  # noqa: F811
    """ComfyUI's tokenizer makes "seahorse" sea + horse</w>: "horse" used to weight, map and blend its tail too."""
    from comfyui_personalize.attention.tokens import word_positions
    from comfyui_personalize.nodes.attention_text import prompt_tokens, word_tokenizer

    clip = tiny_sd15[1]
    tokens = prompt_tokens(clip, "a seahorse next to a horse, red horse")
    assert clip.tokenize("seahorse")["l"][0][2][0] == word_tokenizer(clip)("horse")[0]  # the compound's tail
    found = word_positions(tokens, ["horse", "seahorse", "red horse"], word_tokenizer(clip))
    assert found == {"horse": [7, 10], "seahorse": [2, 3], "red horse": [9, 10]}  # BOS is row 0
    chinese = prompt_tokens(clip, "一匹白马")  # written without spaces: one BPE word, each character found
    assert word_positions(chinese, ["马", "白马"], word_tokenizer(clip))["马"]


def test_p2p_pairs_every_keyframe_of_a_clip_with_scheduled_hooks(comfy, tiny_sd15, nodes):  # noqa: F811
    """CLIPTextEncode on a CLIP with scheduled hooks makes one conditioning per keyframe; P2P kept the first only,
    so from the second keyframe on sampling had no positive prompt."""
    from comfy import hooks as comfy_hooks  # not "import comfy.hooks": that would shadow the comfy fixture
    from comfy_extras.nodes_hooks import CreateHookKeyframe, SetClipHooks, SetHookKeyframes

    model, clip, _ = tiny_sd15
    keyframes = CreateHookKeyframe().create_hook_keyframe(1.0, 0.0)[0]
    keyframes = CreateHookKeyframe().create_hook_keyframe(0.5, 0.5, keyframes)[0]
    hooks = SetHookKeyframes().set_hook_keyframes(comfy_hooks.create_hook_lora({}, 1.0, 1.0), keyframes)[0]
    scheduled = SetClipHooks().apply_hooks(clip, schedule_clip=True, apply_to_conds=True, hooks=hooks)[0]
    source, target = PROMPT, PROMPT.replace("red", "blue")
    stock_src, stock_tgt = encode(comfy, scheduled, source), encode(comfy, scheduled, target)
    assert len(stock_src) == 2
    _, positive, latent = p2p(nodes, model, scheduled, source, target)
    span = lambda entry: (entry[1]["clip_start_percent"], entry[1]["clip_end_percent"])  # noqa: E731
    assert [span(e) for e in positive] == [span(e) for e in stock_src] == [(0.0, 0.5), (0.5, 1.0)]
    for pair, s, t in zip(positive, stock_src, stock_tgt):
        torch.testing.assert_close(pair[0], torch.cat([s[0], t[0]]))


@pytest.mark.parametrize("mask_batch", [1, 2, 3])
def test_paired_latent_gives_both_images_of_a_pair_the_mask_of_their_latent(comfy, mask_batch):  # noqa: F811
    """A noise_mask of another batch than the latent's (here 3 masks for 2 latents) was passed on as it was, and the
    sampler then spread it over the 4 paired rows: a pair's source and target got different masks."""
    from comfyui_personalize.nodes.attention_text import paired_latent

    masks = torch.rand(mask_batch, 1, 8, 8)
    out = paired_latent({"samples": torch.zeros(2, 4, 8, 8), "noise_mask": masks})
    unpaired = masks[[i % mask_batch for i in range(2)]]  # what the sampler gives latent i (repeat_to_batch_size)
    torch.testing.assert_close(out["noise_mask"], unpaired.repeat_interleave(2, dim=0))
    assert out["batch_index"] == [0, 0, 1, 1]
