"""Run control shared by every trainer: Cancel leaves nothing behind, previews and saves every N steps, resume."""
import pytest
import torch
from comfy_tiny import weights_hash
from safetensors.torch import load_file
from test_train_lora import TRAIN_ARGS, dataset, run_node

pytestmark = pytest.mark.host
COMMON = dict(steps=20, learning_rate=1e-3, batch_size=1, seed=0, dtype="auto", gradient_checkpointing=False)


def trainers():
    from comfyui_personalize.nodes.train_dreambooth import PersonalizeTrainDreamBooth
    from comfyui_personalize.nodes.train_embedding import PersonalizeTrainPivotal, PersonalizeTrainTextualInversion
    return {
        "dreambooth": (PersonalizeTrainDreamBooth, dict(train_text_encoder=True, text_encoder_lr=1e-4)),
        "textual_inversion": (PersonalizeTrainTextualInversion, dict(token="zwx", init_word="dog", num_vectors=1)),
        "pivotal": (PersonalizeTrainPivotal, dict(token="zwx", init_word="dog", num_vectors=1, embedding_lr=1e-3,
                                                  rank=2, alpha=2.0, targets="attention")),
    }


@pytest.mark.parametrize("name", ["dreambooth", "textual_inversion", "pivotal"])
def test_cancel_leaves_host_and_folders_untouched(comfy, tiny_sd15, name):
    import comfy.model_management as mm
    node, extra = trainers()[name]
    model, clip, vae = tiny_sd15
    mm.unload_all_models()
    before = weights_hash(model.model), weights_hash(clip.cond_stage_model)
    files = sorted(comfy.models.rglob("*"))
    mm.interrupt_current_processing(True)  # what the UI's Cancel button does
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run_node(node, model=model, clip=clip, vae=vae, dataset=dataset(), **COMMON, **extra)
    finally:
        mm.interrupt_current_processing(False)
    assert sorted(comfy.models.rglob("*")) == files
    # DreamBooth's trainable copies (the only parameters that require grad) are out of the host's slots.
    assert not any(p.requires_grad for p in [*model.model.parameters(), *clip.cond_stage_model.parameters()])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.model.modules())
    mm.unload_all_models()
    assert (weights_hash(model.model), weights_hash(clip.cond_stage_model)) == before


def test_options_preview_save_every_and_resume(comfy, tiny_sd15):
    import comfy.utils as comfy_utils

    from comfyui_personalize.nodes.session import PersonalizeTrainingOptions
    from comfyui_personalize.nodes.train_lora import PersonalizeTrainLoRA
    model, clip, vae = tiny_sd15
    options = run_node(PersonalizeTrainingOptions, lr_schedule="cosine", warmup_steps=1, gradient_accumulation=1,
                       max_grad_norm=1.0, min_snr_gamma=5.0, noise_offset=0.05, timestep_min=0, timestep_max=999,
                       ema_decay=0.0, sample_every=2, sample_prompt="", save_every=2).result[0]
    previews = []
    comfy_utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: previews.append(preview))
    try:
        _, _, lora, loss = run_node(PersonalizeTrainLoRA, model=model, clip=clip, vae=vae, dataset=dataset(),
                                    options=options, **dict(TRAIN_ARGS, steps=4, batch_size=1)).result
    finally:
        comfy_utils.set_progress_bar_global_hook(None)
    assert lora.metadata["ss_lr_scheduler"] == "cosine"  # the schedule trained with, in kohya's key
    shown = [p for p in previews if p is not None]
    assert len(shown) == 2 and shown[0][0] == "JPEG" and shown[0][1].size == (64, 64)
    saved = sorted((comfy.models / "loras" / "personalize_checkpoints").glob("lora_step*.safetensors"))
    assert [p.name for p in saved][-1:] == ["lora_step00002.safetensors"]  # the final result is the node's output
    step2 = load_file(str(saved[-1]))
    assert set(step2) == set(lora)

    # Resuming from the step-2 file with a negligible learning rate returns (about) that file.
    resumed = run_node(PersonalizeTrainLoRA, model=model, clip=clip, vae=vae, dataset=dataset(),
                       resume_from="personalize_checkpoints/" + saved[-1].name,
                       **dict(TRAIN_ARGS, steps=1, batch_size=1, learning_rate=1e-7)).result[2]
    for k in step2:
        torch.testing.assert_close(resumed[k].float(), step2[k].float(), rtol=0, atol=2e-3)


def test_a_save_every_n_steps_never_writes_weights_past_a_nan_loss(comfy, tiny_sd15, monkeypatch):
    """Losses were read back (and checked) every 10 steps only: a save at step 4 wrote weights that went NaN at
    step 3, and the error then said nothing was saved."""
    import dataclasses

    from comfyui_personalize.nodes import session
    from comfyui_personalize.nodes.session import PersonalizeTrainingOptions
    from comfyui_personalize.nodes.train_lora import PersonalizeTrainLoRA
    from comfyui_personalize.training.errors import TrainingDiverged

    def diverging(task, *args, **kwargs):  # the model's prediction turns NaN from the third step on
        calls = [0]

        def predict(x_t, t, cond):
            calls[0] += 1
            out = task.predict(x_t, t, cond)
            return out * float("nan") if calls[0] >= 3 else out
        return train(dataclasses.replace(task, predict=predict), *args, **kwargs)

    train = session.train
    monkeypatch.setattr(session, "train", diverging)
    options = run_node(PersonalizeTrainingOptions, lr_schedule="constant", warmup_steps=0, gradient_accumulation=1,
                       max_grad_norm=1.0, min_snr_gamma=0.0, noise_offset=0.0, timestep_min=0, timestep_max=999,
                       ema_decay=0.0, sample_every=0, sample_prompt="", save_every=2).result[0]
    folder = comfy.models / "loras" / "personalize_checkpoints"
    for old in folder.glob("lora_step*.safetensors"):
        old.unlink()
    model, clip, vae = tiny_sd15
    with pytest.raises(TrainingDiverged, match=r"step 3; the last good save is .*lora_step00002\.safetensors"):
        run_node(PersonalizeTrainLoRA, model=model, clip=clip, vae=vae, dataset=dataset(), options=options,
                 **dict(TRAIN_ARGS, steps=6, batch_size=1, dtype="fp32"))
    assert [p.name for p in folder.glob("lora_step*.safetensors")] == ["lora_step00002.safetensors"]


def test_loss_plot_node(comfy):
    from comfyui_personalize.nodes.loss_plot import PersonalizeLossPlot
    from comfyui_personalize.training.errors import InputError
    image = run_node(PersonalizeLossPlot, loss={"loss": [1.0, 0.8, 0.9, 0.5]}, title="t").result[0]
    assert image.shape[0] == 1 and image.shape[-1] == 3 and image.std() > 0
    with pytest.raises(InputError, match="loss"):
        run_node(PersonalizeLossPlot, loss={"loss": []}, title="t")


def test_the_loss_event_goes_to_the_client_that_queued_the_prompt(comfy, monkeypatch):
    """It went to every open tab, each drawing it on whichever node had that id."""
    import sys
    import types

    from comfyui_personalize.nodes.progress import LOSS_EVENT, TrainingProgress

    sent = []
    instance = types.SimpleNamespace(client_id="tab-1", send_sync=lambda *a: sent.append(a))
    monkeypatch.setitem(sys.modules, "server", types.SimpleNamespace(PromptServer=types.SimpleNamespace(
        instance=instance)))
    progress = TrainingProgress(4, "12:5")
    progress(1, [0.5])
    progress(2, [0.5, 0.25])
    assert sent == [(LOSS_EVENT, {"node": "12:5", "start": 0, "losses": [0.5], "step": 1, "total": 4}, "tab-1"),
                    (LOSS_EVENT, {"node": "12:5", "start": 1, "losses": [0.25], "step": 2, "total": 4}, "tab-1")]


def test_a_save_every_n_steps_that_cannot_be_written_names_the_folder(comfy, tmp_path, monkeypatch):
    """It named a 'subfolder' input, which no trainer has."""
    from comfyui_personalize.nodes import session
    from comfyui_personalize.training.errors import OutputFolderError
    (tmp_path / "personalize_checkpoints").write_text("a file where the folder goes")
    monkeypatch.setattr(session.folder_paths, "get_folder_paths", lambda kind: [str(tmp_path)])
    with pytest.raises(OutputFolderError, match="cannot write in .*personalize_checkpoints.*make that folder writable"):
        session.save_intermediate("loras", "lora_step00002", {"a": torch.ones(1)}, {})
