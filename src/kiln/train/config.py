"""TrainConfig: every setting of a fine-tuning run, checked once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from kiln.errors import ConfigError
from kiln.train.lora import LoRAConfig

DATA_FORMATS = ("dolly", "alpaca", "chat")


@dataclass(frozen=True)
class TrainConfig:
    """How to fine-tune (see ``kiln finetune --help`` for each field)."""

    data_format: str = "dolly"
    chat_template: str | None = None
    """The chat format's template: a built-in name or a file (None: the model's own)."""
    sequence_length: int = 512
    packing: bool = True
    lora: LoRAConfig | None = field(default_factory=LoRAConfig)
    """None: full fine-tuning (every weight trains, embeddings included)."""
    epochs: int = 1
    max_steps: int | None = None
    """Optimizer steps to run; None: ``epochs`` passes over the training set."""
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int | None = None
    """None: 5% of the steps (at least one)."""
    batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    eval_fraction: float = 0.05
    eval_every: int | None = None
    save_every: int | None = None
    seed: int = 0
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping
    them: less memory for more compute (the losses do not change)."""
    bf16: bool = False
    """Run the forward under bfloat16 autocast (weights, optimizer state and the loss stay
    float32)."""

    def __post_init__(self) -> None:
        if self.data_format not in DATA_FORMATS:
            raise ConfigError(f"format must be one of {', '.join(DATA_FORMATS)}")
        positive = {
            "sequence_length": self.sequence_length,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
        }
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        for name in ("max_steps", "eval_every", "save_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resume_key(self) -> dict[str, Any]:
        """What must match for a checkpoint to continue this run exactly (how often to save or
        evaluate, and gradient checkpointing, which changes no number, may change)."""
        free = ("save_every", "eval_every", "gradient_checkpointing")
        return {k: v for k, v in self.to_dict().items() if k not in free}
