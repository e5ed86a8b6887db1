"""Settings of the recovery recipe, checked up front with errors naming the field."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rewrite.errors import PlanError

TRANSFER_MODES = ("layer", "joint")
FINETUNE_METHODS = ("lora", "full")
FINETUNE_LOSSES = ("ce", "kl", "mse")


@dataclass
class TransferConfig:
    """Stage 1: attention transfer of the mixers' new parameters."""

    steps: int = 100
    lr: float = 1e-2
    mode: str = "layer"  # layer: each layer fed the teacher's inputs; joint: the student's own
    weight_decay: float = 0.0


@dataclass
class FinetuneConfig:
    """Stage 2: a short fine-tune of the linearized model (0 steps skips it)."""

    steps: int = 0
    lr: float = 1e-4
    method: str = "lora"  # lora: peft adapters on the linear layers; full: every parameter
    losses: tuple[str, ...] = ("ce",)  # any of ce (next token), kl (to the teacher), mse (to the teacher)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    kl_temperature: float = 1.0
    train_mixers: bool = True  # keep training the mixers' new parameters too
    merge: bool = True  # lora: fold the adapters into the base weights at the end (no adapter ops left)


@dataclass
class DistillConfig:
    """The whole recipe: both stages, checkpointing and progress."""

    transfer: TransferConfig = field(default_factory=TransferConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    checkpoint_dir: Path | str | None = None
    checkpoint_every: int = 50
    resume: bool = True  # continue from checkpoint_dir's checkpoint when there is one
    progress: bool = True
    log_every: int = 10

    def validate(self) -> None:
        """Raise PlanError naming the first bad field."""
        t, f = self.transfer, self.finetune
        for name, value in (("transfer.steps", t.steps), ("finetune.steps", f.steps),
                            ("finetune.lora_rank", f.lora_rank)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise PlanError(f"distill.{name}", f"must be an int >= 0, got {value!r}")
        if f.lora_rank < 1:
            raise PlanError("distill.finetune.lora_rank", f"must be >= 1, got {f.lora_rank!r}")
        for name, value in (("transfer.lr", t.lr), ("finetune.lr", f.lr), ("finetune.kl_temperature", f.kl_temperature),
                            ("finetune.lora_alpha", f.lora_alpha)):
            if not isinstance(value, int | float) or not value > 0:
                raise PlanError(f"distill.{name}", f"must be > 0, got {value!r}")
        if t.mode not in TRANSFER_MODES:
            raise PlanError("distill.transfer.mode", f"unknown mode {t.mode!r}", list(TRANSFER_MODES))
        if f.method not in FINETUNE_METHODS:
            raise PlanError("distill.finetune.method", f"unknown method {f.method!r}", list(FINETUNE_METHODS))
        if not f.losses or any(loss not in FINETUNE_LOSSES for loss in f.losses):
            raise PlanError("distill.finetune.losses", f"unknown or no losses {list(f.losses)!r}", list(FINETUNE_LOSSES))
        if not isinstance(f.merge, bool):
            raise PlanError("distill.finetune.merge", f"must be true or false, got {f.merge!r}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 1:
            raise PlanError("distill.checkpoint_every", f"must be an int >= 1, got {self.checkpoint_every!r}")
