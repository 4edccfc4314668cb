"""Host-agnostic attention edits on (q, k, v) tensors (reweight, prompt-to-prompt, dual-path blend).

Planned (issue 4); nothing here imports ComfyUI.
"""
