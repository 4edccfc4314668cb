"""Training progress in the ComfyUI UI: the node's progress bar (which also honours Cancel) and a loss
event for the web loss chart."""
from __future__ import annotations

import comfy.model_management as mm
import comfy.utils

LOSS_EVENT = "personalize.loss"


class TrainingProgress:
    def __init__(self, total_steps: int, node_id: str | None):
        self.bar = comfy.utils.ProgressBar(total_steps, node_id=node_id)
        self.node_id, self.total, self.sent = node_id, total_steps, 0

    def __call__(self, step: int, losses: list[float], preview=None) -> None:
        """``preview``: a PIL image (a sample of the model being trained) to show on the node."""
        mm.throw_exception_if_processing_interrupted()  # Cancel stops here; nothing has been written yet
        self.bar.update_absolute(step, self.total, None if preview is None else ("JPEG", preview, 512))
        if len(losses) > self.sent:
            self._send({"node": self.node_id, "start": self.sent, "losses": losses[self.sent:],
                        "step": step, "total": self.total})
            self.sent = len(losses)

    @staticmethod
    def _send(data: dict) -> None:
        try:
            from server import PromptServer
        except ImportError:  # headless use of ComfyUI modules: there is no UI to tell
            return
        if getattr(PromptServer, "instance", None) is not None:
            # to the client that queued the prompt (as ComfyUI's own progress), not to every open tab
            PromptServer.instance.send_sync(LOSS_EVENT, data, PromptServer.instance.client_id)
