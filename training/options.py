"""The training settings every trainer shares beyond its own essentials (the Training Options node)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import InputError
from .objective import Objective
from .trainer import TrainConfig


@dataclass(frozen=True)
class TrainOptions:
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    gradient_accumulation: int = 1
    max_grad_norm: float = 1.0
    ema_decay: float = 0.0
    objective: Objective = Objective()
    sample_every: int = 0  # 0: no preview samples
    sample_prompt: str = ""  # "" = the first training caption
    save_every: int = 0  # 0: only the final result
    optimizer: str = "adamw"  # optimizers.OPTIMIZERS

    def config(self, steps: int, learning_rate: float, batch_size: int, seed: int, dtype: str,
               gradient_checkpointing: bool) -> TrainConfig:
        if self.sample_every < 0 or self.save_every < 0:
            raise InputError("sample_every" if self.sample_every < 0 else "save_every", "must be 0 (off) or positive")
        cfg = TrainConfig(steps=steps, learning_rate=learning_rate, batch_size=batch_size, seed=seed, dtype=dtype,
                          gradient_checkpointing=gradient_checkpointing)
        cfg = replace(cfg, lr_schedule=self.lr_schedule, warmup_steps=self.warmup_steps,
                      gradient_accumulation=self.gradient_accumulation, max_grad_norm=self.max_grad_norm,
                      ema_decay=self.ema_decay, objective=self.objective, optimizer=self.optimizer)
        cfg.validate()
        return cfg
