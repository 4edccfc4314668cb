"""ComfyUI-Personalize: train LoRA / DreamBooth / Textual Inversion on the loaded checkpoint, edit attention,
rank by ImageReward. ComfyUI imports this folder as a package; nodes register through ``comfy_entrypoint``."""
from comfy_api.latest import ComfyExtension, io

from .nodes import NODE_LIST

WEB_DIRECTORY = "./web"


class PersonalizeExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_LIST)


async def comfy_entrypoint() -> PersonalizeExtension:
    return PersonalizeExtension()
