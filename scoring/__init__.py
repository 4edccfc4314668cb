"""ImageReward scoring core: the model on transformers' BLIP modules, safe checkpoint loading, the official
preprocessing, batched scoring and ranking. Imports no ComfyUI (the nodes in ``nodes/`` wrap it)."""
