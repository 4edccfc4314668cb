"""Personalize Loss Plot: a trainer's loss history as an IMAGE (raw per-step loss and its moving average)."""
from __future__ import annotations

import math

from comfy_api.latest import io

from ..training.errors import InputError
from ..training.plot import image_to_tensor, loss_plot


class PersonalizeLossPlot(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PersonalizeLossPlot",
            display_name="Personalize Loss Plot",
            category="personalize/training",
            description="Draws the loss output of a Personalize trainer (per step, with a moving average).",
            inputs=[io.LossMap.Input("loss"), io.String.Input("title", default="training loss",
                                                                     tooltip="The plot's title.")],
            outputs=[io.Image.Output(display_name="plot")],
        )

    @classmethod
    def execute(cls, loss, title) -> io.NodeOutput:
        values = loss.get("loss") if isinstance(loss, dict) else None
        if not values:
            raise InputError("loss", "has no values; connect the loss output of a Personalize trainer")
        if not any(math.isfinite(float(v)) for v in values):
            raise InputError("loss", "every value is NaN or infinite: the training diverged; lower the learning rate")
        return io.NodeOutput(image_to_tensor(loss_plot([float(v) for v in values], title=title)))


NODES = [PersonalizeLossPlot]
