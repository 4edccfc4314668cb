import math

import numpy as np
import pytest
import torch

from comfyui_personalize.training.plot import CLIP_COLOUR, EMA_COLOUR, ema, image_to_tensor, loss_plot, plot_area


def _colour_rows(img, colour):
    """(x, y) of every pixel of exactly ``colour`` inside the chart box (the legend swatch sits above it)."""
    x0, y0, x1, y1 = plot_area(img.size)
    arr = np.asarray(img)[y0 + 1:y1, x0 + 1:x1]
    ys, xs = np.nonzero((arr == colour).all(axis=-1))
    return xs, ys


def test_size_and_mode():
    img = loss_plot([1.0, 0.5, 0.25], size=(500, 300))
    assert img.size == (500, 300) and img.mode == "RGB"
    assert np.asarray(img)[2, 2].tolist() == [255, 255, 255]  # white background


def test_ema_line_falls_for_a_falling_loss():
    rng = np.random.default_rng(0)
    losses = (np.exp(-np.arange(120) / 30) + 0.05 * rng.standard_normal(120)).tolist()
    img = loss_plot(losses)
    xs, ys = _colour_rows(img, EMA_COLOUR)
    width = plot_area(img.size)[2] - plot_area(img.size)[0]
    left, right = ys[xs < width / 3], ys[xs > 2 * width / 3]
    assert len(left) > 50 and len(right) > 50
    assert right.mean() > left.mean() + 100  # image y grows downwards: a falling loss sits lower on the right
    columns_with_line = np.unique(xs)
    assert len(ys) / len(columns_with_line) >= 2.5  # drawn bold (~3 px), not a hairline


def test_a_spike_is_clipped_and_marked_without_flattening_the_curve():
    losses = np.linspace(1.0, 0.5, 200).tolist()
    losses[100] = 1000.0
    img = loss_plot(losses)
    xs, ys = _colour_rows(img, EMA_COLOUR)
    x0, y0, x1, y1 = plot_area(img.size)
    height = y1 - y0
    assert np.ptp(ys[xs < (x1 - x0) / 10]) > 0.05 * height  # 1.0 -> 0.975 still spans rows: not flattened
    assert ys.max() > 0.8 * height  # and the curve ends near the bottom
    assert (np.asarray(img) == CLIP_COLOUR).all(axis=-1).any()  # the off-scale step is marked


def test_a_smooth_curve_is_not_clipped():
    img = loss_plot(np.linspace(2.0, 0.1, 150).tolist())
    assert not (np.asarray(img) == CLIP_COLOUR).all(axis=-1).any()


@pytest.mark.parametrize("losses", [[0.7], [0.3] * 25, [0.0, 0.0], [5.0, 1e-8]])
def test_degenerate_inputs_draw(losses):
    img = loss_plot(losses)
    assert len(_colour_rows(img, EMA_COLOUR)[0]) > 0


def test_empty_raises():
    with pytest.raises(ValueError, match="losses: no finite value"):
        loss_plot([])
    with pytest.raises(ValueError, match="losses: no finite value"):
        loss_plot([math.nan, math.inf])
    with pytest.raises(ValueError, match="size"):
        loss_plot([1.0], size=(64, 48))


def test_nan_steps_break_the_line_and_are_marked():
    """ComfyUI's own Train LoRA hands on a loss map with NaN steps (it does not stop on them): the chart raised."""
    losses = np.linspace(1.0, 0.5, 60).tolist()
    losses[30:33] = [math.nan, math.inf, math.nan]
    img = loss_plot(losses)
    xs, ys = _colour_rows(img, EMA_COLOUR)
    x0, _, x1, _ = plot_area(img.size)
    gap = [(x1 - x0) * i / 59 for i in (29.5, 32.5)]  # between steps 29 and 33, the finite ones either side
    assert len(xs) and not ((xs > gap[0]) & (xs < gap[1])).any()  # the line breaks there
    assert ys.max() > 0.8 * (plot_area(img.size)[3] - plot_area(img.size)[1])  # the range ignores the NaNs
    assert (np.asarray(img) == CLIP_COLOUR).all(axis=-1).any()  # and they are marked
    assert ema([math.nan, 2.0, math.inf, 2.0])[1:] == pytest.approx([2.0, 2.0, 2.0])


def test_ema_is_bias_corrected():
    assert ema([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # uncorrected it would start at 0.2
    assert ema([0.0, 1.0], alpha=0.5) == pytest.approx([0.0, 0.5 / 0.75])


def test_image_to_tensor_layout():
    img = loss_plot([1.0, 0.5], size=(240, 160))
    t = image_to_tensor(img)
    assert t.shape == (1, 160, 240, 3) and t.dtype == torch.float32
    assert 0.0 <= t.min() and t.max() <= 1.0 and math.isclose(t[0, 0, 0, 0].item(), 1.0)
