"""ComfyUI glue: one module per node family. No algorithm lives here."""
from .dataset import NODES as _DATASET
from .identifier import NODES as _IDENTIFIER
from .loss_plot import NODES as _LOSS_PLOT
from .prior_dataset import NODES as _PRIOR
from .save_checkpoint import NODES as _SAVE_CHECKPOINT
from .save_embedding import NODES as _SAVE_EMBEDDING
from .save_lora import NODES as _SAVE_LORA
from .session import NODES as _OPTIONS
from .train_dreambooth import NODES as _TRAIN_DREAMBOOTH
from .train_embedding import NODES as _TRAIN_EMBEDDING
from .train_lora import NODES as _TRAIN_LORA

NODE_LIST = [*_IDENTIFIER, *_DATASET, *_PRIOR, *_OPTIONS, *_TRAIN_LORA, *_TRAIN_DREAMBOOTH, *_TRAIN_EMBEDDING,
             *_SAVE_LORA, *_SAVE_EMBEDDING, *_SAVE_CHECKPOINT, *_LOSS_PLOT]
