"""Checkpoints of the recipe: which stage and step, the trained tensors, the optimizer, the losses so far."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FILE = "distill_checkpoint.pt"


@dataclass
class Checkpoint:
    """Where a run stands: `stage` and the next `step` of it, with everything needed to continue."""

    stage: str
    step: int
    tensors: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    history: dict[str, list[float]] = field(default_factory=dict)


def save_checkpoint(directory: Path | str, checkpoint: Checkpoint) -> Path:
    """Write the checkpoint atomically (a crash mid-write leaves the previous one)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILE
    tmp = path.with_suffix(".tmp")
    torch.save(
        {"stage": checkpoint.stage, "step": checkpoint.step, "tensors": checkpoint.tensors,
         "optimizer": checkpoint.optimizer, "history": checkpoint.history},
        tmp,
    )
    os.replace(tmp, path)
    return path


def load_checkpoint(directory: Path | str | None) -> Checkpoint | None:
    """The checkpoint in `directory`, or None when there is none."""
    if directory is None:
        return None
    path = Path(directory) / FILE
    if not path.exists():
        return None
    data = torch.load(path, map_location="cpu", weights_only=True)
    return Checkpoint(data["stage"], int(data["step"]), data["tensors"], data["optimizer"], data["history"])
