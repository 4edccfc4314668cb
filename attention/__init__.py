"""Host-agnostic attention edits on (q, k, v) tensors: reweighting, prompt-to-prompt mappers and V-side
edits, local blend, the dual-path blend. Nothing here imports ComfyUI."""
