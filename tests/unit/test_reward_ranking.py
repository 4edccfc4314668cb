"""Ranking by reward: numeric, best first, stable for ties, top-k and threshold, NaN refused."""
import pytest
import torch

from comfyui_personalize.scoring.ranking import rank
from comfyui_personalize.training.errors import InputError


def test_numeric_not_string_order():
    # as strings "9.5" > "10.2" > "-3" > "-20"; as numbers 10.2 > 9.5 > -3 > -20
    assert rank([9.5, 10.2, -20.0, -3.0]) == [1, 0, 3, 2]
    assert rank(["9.5", "10.2", "-20", "-3"]) == [1, 0, 3, 2]


def test_negative_scores_and_tensors():
    scores = torch.tensor([-1.4132, 0.5812, -2.0296, 0.2745])  # the README example, shuffled
    assert rank(scores) == [1, 3, 0, 2]
    assert rank(scores.view(4, 1)) == [1, 3, 0, 2]
    assert rank(scores.to(torch.bfloat16)) == [1, 3, 0, 2]


def test_ties_keep_batch_order_and_are_deterministic():
    scores = [0.5, 1.0, 0.5, 1.0, -0.0, 0.0, 0.5]
    assert rank(scores) == [1, 3, 0, 2, 6, 4, 5]
    assert all(rank(scores) == rank(list(scores)) for _ in range(5))
    assert rank([2.0] * 4, top_k=2) == [0, 1]


def test_top_k_and_threshold():
    scores = [0.1, -0.5, 1.2, 0.7, 0.7]
    assert rank(scores, top_k=2) == [2, 3]
    assert rank(scores, top_k=0) == [2, 3, 4, 0, 1]
    assert rank(scores, top_k=10) == [2, 3, 4, 0, 1]
    assert rank(scores, threshold=0.7) == [2, 3, 4]  # >= keeps equal scores
    assert rank(scores, top_k=4, threshold=0.0) == [2, 3, 4, 0]
    assert rank(scores, threshold=5.0) == []
    assert rank([], top_k=3) == []
    assert rank([float("-inf"), float("inf"), 0.0]) == [1, 2, 0]


def test_bad_values_are_input_errors():
    with pytest.raises(InputError, match="score 1 is NaN") as e:
        rank([0.2, float("nan"), 0.1])
    assert e.value.input_name == "scores"
    with pytest.raises(InputError, match="score 0 is NaN"):
        rank(torch.tensor([float("nan")]))
    with pytest.raises(InputError) as e:
        rank([0.1], top_k=-1)
    assert e.value.input_name == "top_k"
    with pytest.raises(InputError):
        rank([0.1], threshold=float("nan"))
    with pytest.raises(InputError, match="must be numbers"):
        rank(["high", "low"])
