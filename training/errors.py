"""Errors that name the input a user has to change."""


class InputError(ValueError):
    """A bad node input; the message starts with the input's name and says what to do."""

    def __init__(self, input_name: str, message: str):
        self.input_name = input_name
        super().__init__(f"{input_name}: {message}")


class OutputFolderError(OSError):
    """Writing a file no node input names (the class-image cache, a trainer's saves every N steps) failed."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""

    def __init__(self, step: int, value: float, saved: str = ""):
        """``saved``: the last file a save every N steps wrote before it (its weights passed the check)."""
        self.step, self.value = step, value
        kept = f"the last good save is {saved}" if saved else "nothing was saved"
        super().__init__(
            f"loss became {value} at step {step + 1}; {kept}. Lower learning_rate, "
            "or train in bf16/fp32 instead of fp16."
        )
