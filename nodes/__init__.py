"""ComfyUI glue: one module per node family. No algorithm lives here."""
from .save_lora import NODES as _SAVE
from .train_lora import NODES as _TRAIN

NODE_LIST = [*_TRAIN, *_SAVE]
