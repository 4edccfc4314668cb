"""Host-agnostic training core: noise schedules, LoRA adapters, the trainer loop and file formats.

Nothing here imports ComfyUI. Hosts (ComfyUI in ``nodes/``, diffusers in ``headless/``) hand the core a
``DiffusionTask`` built from their own modules.
"""
