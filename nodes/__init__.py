"""ComfyUI glue: one module per node family. No algorithm lives here."""
from .attention_maps import NODES as _ATTENTION_MAPS
from .attention_reweight import NODES as _REWEIGHT
from .dataset import NODES as _DATASET
from .dual_path import NODES as _DUAL_PATH
from .fast_tune import NODES as _FAST_TUNE
from .identifier import NODES as _IDENTIFIER
from .image_reward import NODES as _IMAGE_REWARD
from .loss_plot import NODES as _LOSS_PLOT
from .p2p import NODES as _P2P
from .prior_dataset import NODES as _PRIOR
from .reward_rank import NODES as _REWARD_RANK
from .save_checkpoint import NODES as _SAVE_CHECKPOINT
from .save_embedding import NODES as _SAVE_EMBEDDING
from .save_lora import NODES as _SAVE_LORA
from .session import NODES as _OPTIONS
from .train_dreambooth import NODES as _TRAIN_DREAMBOOTH
from .train_embedding import NODES as _TRAIN_EMBEDDING
from .train_lora import NODES as _TRAIN_LORA

NODE_LIST = [*_IDENTIFIER, *_DATASET, *_PRIOR, *_OPTIONS, *_TRAIN_LORA, *_TRAIN_DREAMBOOTH, *_TRAIN_EMBEDDING,
             *_FAST_TUNE, *_SAVE_LORA, *_SAVE_EMBEDDING, *_SAVE_CHECKPOINT, *_LOSS_PLOT, *_REWEIGHT, *_P2P, *_DUAL_PATH,
             *_ATTENTION_MAPS, *_IMAGE_REWARD, *_REWARD_RANK]
