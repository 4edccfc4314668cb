import pytest
import torch

from comfyui_personalize.training.nearest_tokens import nearest_tokens


def test_nearest_by_cosine_across_chunks_and_skipping_excluded_ids():
    torch.manual_seed(0)
    table = torch.randn(50, 8)
    vectors = torch.stack([table[7] * 3.0, table[42] * 0.1 + 1e-4, table[3]])  # scale must not matter
    assert nearest_tokens(vectors, table, chunk=16) == [7, 42, 3]
    second = nearest_tokens(table[3:4], table, exclude=[3], chunk=16)[0]
    sims = torch.nn.functional.cosine_similarity(table[3:4], table)
    sims[3] = -2
    assert second == int(sims.argmax())


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="share D"):
        nearest_tokens(torch.zeros(1, 4), torch.zeros(10, 8))
