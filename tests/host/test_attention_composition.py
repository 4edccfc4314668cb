"""The attention nodes among ComfyUI's own sampling nodes: guiders that number their prompts otherwise, replaces
another node sets over ours, guidance that calls the model again. Each either works or is refused naming what to
do; before, the edit landed on the wrong prompt or vanished, silently."""
import pytest
import torch
from test_attention_nodes import PROMPT, attention_lora, dual, empty_latent, encode, nodes, p2p, reweight, sample  # noqa: F401
from test_train_lora import run_node

from comfyui_personalize.training.errors import InputError

pytestmark = pytest.mark.host


def guided(guider, latent, steps=3):
    from comfy_extras import nodes_custom_sampler as cs

    sigmas = cs.BasicScheduler().get_sigmas(guider.model_patcher, "normal", steps, 1.0)[0]
    with torch.inference_mode():
        return cs.SamplerCustomAdvanced().sample(cs.RandomNoise().get_noise(3)[0], guider,
                                                 cs.KSamplerSelect().get_sampler("euler")[0], sigmas, latent)[0][
            "samples"]


def test_a_guider_that_numbers_its_prompts_otherwise_is_refused(comfy, tiny_sd15, nodes):  # noqa: F811
    """DualCFGGuider calls the model with [negative, middle, positive]: read as positive = 0, the edits landed on
    the negative (with cfg_cond2_negative 1 ComfyUI drops it, and the edit had no effect at all)."""
    from comfy_extras.nodes_custom_sampler import CFGGuider, DualCFGGuider
    from comfy_extras.nodes_perpneg import PerpNegGuider

    model, clip, _ = tiny_sd15
    negative, middle = encode(comfy, clip, "blurry"), encode(comfy, clip, "a photo")
    edited, positive, _ = reweight(nodes, model, clip, "red:4")
    m, pair, latent = p2p(nodes, model, clip, PROMPT, PROMPT.replace("car", "bus"))
    blend = dual(nodes, model, encode(comfy, clip, "a photo of a dog"), attention_lora(model), 0.0, "cross")
    for patched, prompt, lat in ((edited, positive, empty_latent()), (m, pair, latent),
                                 (blend, encode(comfy, clip, "a photo of zwx dog"), empty_latent())):
        guider = DualCFGGuider().get_guider(patched, prompt, middle, negative, 5.0, 1.0, "regular")[0]
        with pytest.raises(InputError, match="model: the sampler's guider has prompts named middle"):
            guided(guider, lat)
    plain = encode(comfy, clip, PROMPT)
    for make in (lambda mdl, pos: CFGGuider().get_guider(mdl, pos, negative, 5.0)[0],
                 lambda mdl, pos: PerpNegGuider.execute(mdl, pos, negative, middle, 5.0, 1.0)[0]):
        assert (guided(make(edited, positive), empty_latent()) - guided(make(model, plain), empty_latent())
                ).abs().max() > 1e-2  # these number positive 0, negative 1: the edit applies


def ip_adapter_like(model):
    """Another pack's attn2 replace on every block, set over what is there (IPAdapter does)."""
    import comfy.ldm.modules.attention as attention

    from comfyui_personalize.nodes.attention_hooks import transformer_blocks

    m = model.clone()
    for block in transformer_blocks(m):
        m.set_model_attn2_replace(lambda q, k, v, extra_options: attention.optimized_attention(
            q, k, v, extra_options["n_heads"]) * 1.5, *block.key)
    return m


def test_a_replace_set_over_ours_afterwards_is_refused_and_before_ours_is_chained(comfy, tiny_sd15, nodes):  # noqa: F811
    from comfy_extras.nodes_sag import SelfAttentionGuidance

    model, clip, _ = tiny_sd15
    latent = empty_latent()
    m, pair, paired_latent = p2p(nodes, model, clip, PROMPT, PROMPT.replace("car", "bus"))
    with pytest.raises(InputError, match="after Personalize P2P replaces cross-attention on 7 of its layers"):
        sample(comfy, ip_adapter_like(m), pair, paired_latent, clip)
    renormalized, positive, _ = reweight(nodes, model, clip, "red:4", mode="renormalized")
    with pytest.raises(InputError, match="model: a node applied after Personalize Attention Reweight"):
        sample(comfy, ip_adapter_like(renormalized), positive, latent, clip)
    soft = encode(comfy, clip, "a photo of zwx dog")
    blend = dual(nodes, model, encode(comfy, clip, "a photo of a dog"), attention_lora(model), 0.5)
    sag = run_node(SelfAttentionGuidance, model=blend, scale=0.0, blur_sigma=2.0).result[0]
    with pytest.raises(InputError, match="after Personalize Dual-Path Attention Blend replaces self-attention on 1"):
        sample(comfy, sag, soft, empty_latent(size=16), clip)
    # the other order: ours chains theirs, and a model node that sets no replace is fine after ours
    theirs_first, pair, paired_latent = p2p(nodes, ip_adapter_like(model), clip, PROMPT, PROMPT.replace("car", "bus"))
    edited = sample(comfy, theirs_first, pair, paired_latent, clip)[1:]
    theirs = sample(comfy, ip_adapter_like(model), encode(comfy, clip, PROMPT.replace("car", "bus")), latent, clip)
    assert (edited - theirs).abs().max() > 1e-2  # the swap keeps the source's layout over their attention
    sample(comfy, renormalized.clone(), positive, latent, clip)


def test_attention_maps_show_one_evaluation_of_the_prompt_under_guidance_that_calls_the_model_again(comfy, tiny_sd15,
                                                                                                      nodes):  # noqa: F811
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance
    from comfy_extras.nodes_sag import SelfAttentionGuidance

    model, clip, _ = tiny_sd15
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))}

    def maps(m):
        return run_node(nodes["maps"], model=m, clip=clip, text=PROMPT, words="red, street", latent=latent,
                        resolution="all", at_percent=0.5, seed=0).result[0]

    plain = maps(model)
    for guidance in (run_node(PerturbedAttentionGuidance, model=model, scale=3.0).result[0],
                     run_node(SelfAttentionGuidance, model=model, scale=0.5, blur_sigma=2.0).result[0]):
        torch.testing.assert_close(maps(guidance), plain)
