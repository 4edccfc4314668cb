"""The usual wiring slips with the paired edits and the reweight: a prompt, latent or model from elsewhere at the
sampler gave wrong images with no word; each is now refused (naming the input) or warned about."""
import logging

import pytest
from test_attention_nodes import empty_latent, encode, nodes, p2p, reweight, sample  # noqa: F401

from comfyui_personalize.training.errors import InputError

pytestmark = pytest.mark.host
SOURCE, TARGET = "a photo of a cat on a sofa", "a photo of a dog on a sofa"


def test_p2p_refuses_a_positive_that_is_not_its_pair(comfy, tiny_sd15, nodes):  # noqa: F811
    """One's own prompt is repeated over both rows: source and edit came out the same image."""
    model, clip, _ = tiny_sd15
    m, positive, latent = p2p(nodes, model, clip, SOURCE, TARGET)
    with pytest.raises(InputError, match="positive holds 1 prompt") as e:
        sample(comfy, m, encode(comfy, clip, TARGET), latent, clip)
    assert e.value.input_name == "target"
    assert sample(comfy, m, positive, latent, clip).shape[0] == 2  # its own pair runs


def test_p2p_refuses_a_latent_whose_pairs_do_not_share_noise(comfy, tiny_sd15, nodes):  # noqa: F811
    """An Empty Latent of batch 2 gave source and edit different noise: no layout kept."""
    model, clip, _ = tiny_sd15
    m, positive, _ = p2p(nodes, model, clip, SOURCE, TARGET)
    with pytest.raises(InputError, match="not this node's LATENT") as e:
        sample(comfy, m, positive, empty_latent(2), clip)
    assert e.value.input_name == "latent"
    with pytest.raises(InputError, match="odd batch"):
        sample(comfy, m, positive, empty_latent(3), clip)


def test_a_second_paired_edit_on_the_same_model_is_refused(comfy, tiny_sd15, nodes):  # noqa: F811
    """Two P2P nodes in a row re-paired the pairs with the first one's token map: duplicated, mis-mapped images."""
    model, clip, _ = tiny_sd15
    first, _, _ = p2p(nodes, model, clip, SOURCE, TARGET)
    with pytest.raises(InputError, match="already carries a paired edit") as e:
        p2p(nodes, first, clip, TARGET, "a photo of a dog on a bed")
    assert e.value.input_name == "model"
    locked, _, _ = reweight(nodes, model, clip, "red:2", mode="p2p_locked")
    with pytest.raises(InputError, match="already carries a paired edit"):
        p2p(nodes, locked, clip, SOURCE, TARGET)
    p2p(nodes, model, clip, SOURCE, TARGET)  # the model before the first edit takes another


def test_p2p_locked_names_itself_when_the_pairing_is_lost(comfy, tiny_sd15, nodes):  # noqa: F811
    model, clip, _ = tiny_sd15
    m, positive, _ = reweight(nodes, model, clip, "red:2", mode="p2p_locked")
    with pytest.raises(InputError, match="^latent: Reweight p2p_locked: .*odd batch"):
        sample(comfy, m, positive, empty_latent(1), clip)


def test_reweight_warns_when_the_sampler_gets_another_prompt(comfy, tiny_sd15, nodes, caplog):  # noqa: F811
    """The weights sit at token positions of the node's text: another prompt of the same length took them on
    other words ("blue" instead of "red"), silently."""
    model, clip, _ = tiny_sd15
    m, positive, _ = reweight(nodes, model, clip, "red:0")
    with caplog.at_level(logging.WARNING):
        sample(comfy, m, positive, empty_latent(), clip)
    assert "is not this node's text" not in caplog.text
    with caplog.at_level(logging.WARNING):
        sample(comfy, m, encode(comfy, clip, "a photo of a blue car on a street"), empty_latent(), clip)
    assert "Attention Reweight: the positive conditioning the sampler got is not this node's text" in caplog.text


def test_a_word_of_the_negative_prompt_with_apply_to_cond_points_to_apply_to(comfy, tiny_sd15, nodes):  # noqa: F811
    model, clip, _ = tiny_sd15
    with pytest.raises(InputError, match="'blurry' is not in the prompt.*blurry is in negative_text: set apply_to "
                                         "to uncond or both") as e:
        reweight(nodes, model, clip, "blurry:0.5", negative_text="blurry, low quality")
    assert e.value.input_name == "apply_to"
    with pytest.raises(InputError) as e:  # in neither prompt: the words error as before
        reweight(nodes, model, clip, "purple:0.5", negative_text="blurry, low quality")
    assert e.value.input_name == "words"
