"""The pack's own socket types, defined once so every node names them the same way."""
from comfy_api.latest import io

# training.datasets.InstanceDataset: the subject photos with finished captions.
Dataset = io.Custom("PERSONALIZE_DATASET")
# training.datasets.PriorPreservation: class images (or the frozen-model mode) for prior preservation.
Prior = io.Custom("PERSONALIZE_PRIOR")
# training.embedding.TrainedEmbedding: learned token vectors ({"clip_l": [n, 768], "clip_g": [n, 1280]}).
Embedding = io.Custom("PERSONALIZE_EMBEDDING")
# training.options.TrainOptions: schedule, loss weighting and run control shared by the trainers.
Options = io.Custom("PERSONALIZE_TRAIN_OPTIONS")
