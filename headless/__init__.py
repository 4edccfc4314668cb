"""Running the core without ComfyUI: a diffusers-module adapter, tiny random-weight models and the demo."""
