"""ComfyUI glue: one module per node family. No algorithm lives here."""
from .identifier import NODES as _IDENTIFIER
from .save_lora import NODES as _SAVE
from .session import NODES as _OPTIONS
from .train_lora import NODES as _TRAIN

NODE_LIST = [*_IDENTIFIER, *_TRAIN, *_SAVE, *_OPTIONS]
