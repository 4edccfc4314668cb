"""What a MODEL brings from upstream nodes that changes its prediction when it is sampled, and that the trainers
leave out: they call the UNet itself, so the LoRA or weights fit the model a loader elsewhere (A1111, another
graph) sees. FreeU, HyperTile, ToMe, attention patches and wrappers are sampling-time edits; the user is told
instead of finding out from a LoRA fitted to another function than the previews show."""
from __future__ import annotations

from comfy.patcher_extension import WrappersMP

# wrappers around a prediction (the sampling-level ones, OUTER_SAMPLE / PREPARE_SAMPLING / SAMPLER_SAMPLE, do
# not change one)
_PREDICTION_WRAPPERS = (WrappersMP.PREDICT_NOISE, WrappersMP.CALC_COND_BATCH, WrappersMP.APPLY_MODEL,
                        WrappersMP.DIFFUSION_MODEL)
_OBJECTS_TRAINING_READS = {"model_sampling", "manual_cast_dtype"}  # the noise schedule and the compute dtype


def patches_training_leaves_out(model) -> list[str]:
    """Names of the patches on ``model`` (a ModelPatcher) that the trainers' UNet calls do not apply."""
    options = model.model_options
    transformer = options.get("transformer_options", {})
    found = [name for name, patches in transformer.get("patches", {}).items() if patches]
    found += [f"{name} replace" for name, patches in transformer.get("patches_replace", {}).items() if patches]
    if options.get("model_function_wrapper") is not None:
        found.append("a model function wrapper")
    for kind in _PREDICTION_WRAPPERS:
        keys = {**model.wrappers.get(kind, {}), **transformer.get("wrappers", {}).get(kind, {})}
        found += [f"{kind} wrapper {key!r}" for key, wrappers in keys.items() if wrappers]
    found += [f"object patch {name} (layers inside it do not train)" if name.startswith("diffusion_model.")
              else f"object patch {name}" for name in model.object_patches if name not in _OBJECTS_TRAINING_READS]
    return found
