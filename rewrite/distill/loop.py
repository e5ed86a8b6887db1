"""One training stage of the recipe: AdamW on chosen parameters, progress bar, checkpoints, resume."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from rewrite.distill.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from rewrite.errors import RewriteError

STAGES = ("transfer", "finetune")
"""Stages in the order they run (a checkpoint of a later stage means the earlier ones are done)."""


@dataclass
class StageRun:
    """Everything a stage needs besides its loss."""

    module: torch.nn.Module
    checkpoint_dir: object = None
    checkpoint_every: int = 50
    resume: bool = True
    progress: bool = True
    log: Callable[[str], None] | None = None
    log_every: int = 10
    trained: set[str] = field(default_factory=set)  # every parameter trained by a stage so far
    history: dict[str, list[float]] = field(default_factory=dict)


def _restore(module: torch.nn.Module, checkpoint: Checkpoint) -> None:
    params = dict(module.named_parameters())
    missing = [n for n in checkpoint.tensors if n not in params]
    if missing:
        raise RewriteError(
            f"the checkpoint holds parameters the model does not have ({', '.join(missing[:3])}...): "
            "it was written for another model or plan"
        )
    with torch.no_grad():
        for name, value in checkpoint.tensors.items():
            params[name].copy_(value)


def _snapshot(run: StageRun, stage: str, step: int, optimizer: torch.optim.Optimizer) -> None:
    if run.checkpoint_dir is None:
        return
    params = dict(run.module.named_parameters())
    tensors = {n: params[n].detach().cpu().clone() for n in sorted(run.trained)}
    save_checkpoint(run.checkpoint_dir, Checkpoint(stage, step, tensors, optimizer.state_dict(), run.history))


def train_stage(
    run: StageRun,
    stage: str,
    trainable: dict[str, torch.nn.Parameter],
    loss_fn: Callable[[int], torch.Tensor],
    *,
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
) -> None:
    """Run `steps` optimizer steps of `loss_fn(step)` on `trainable` only, checkpointing as it goes.

    Resumes from `run.checkpoint_dir` when it holds a checkpoint of this stage (or skips the stage
    when the checkpoint is of a later one), so an interrupted run ends as an uninterrupted one would.
    """
    if steps == 0:
        return
    if not trainable:
        raise RewriteError(f"stage {stage!r} has no parameter to train")
    run.trained |= set(trainable)
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=lr, weight_decay=weight_decay)
    start = 0
    checkpoint = load_checkpoint(run.checkpoint_dir) if run.resume else None
    if checkpoint is not None and checkpoint.stage in STAGES:
        done, here = STAGES.index(checkpoint.stage), STAGES.index(stage)
        if done > here or (done == here and checkpoint.step >= steps):
            _restore(run.module, checkpoint)
            run.history.update(checkpoint.history)
            return
        if done == here:
            _restore(run.module, checkpoint)
            optimizer.load_state_dict(checkpoint.optimizer)
            run.history.update(checkpoint.history)
            start = checkpoint.step
    losses = run.history.setdefault(stage, [])
    del losses[start:]
    flags = {n: p.requires_grad for n, p in run.module.named_parameters()}
    for name, p in run.module.named_parameters():
        p.requires_grad_(name in trainable)
    bar = _progress(range(start, steps), stage, steps, start, run.progress)
    try:
        for step in bar:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(step)
            if not math.isfinite(loss.item()):
                raise RewriteError(f"stage {stage!r}: the loss became {loss.item()} at step {step}; lower the lr")
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss.item():.4g}")
            if run.log is not None and (step % run.log_every == 0 or step == steps - 1):
                run.log(f"{stage} step {step + 1}/{steps}: loss {loss.item():.5g}")
            if (step + 1) % run.checkpoint_every == 0 or step == steps - 1:
                _snapshot(run, stage, step + 1, optimizer)
    finally:
        for name, p in run.module.named_parameters():
            p.requires_grad_(flags[name])


def _progress(steps: range, stage: str, total: int, start: int, enabled: bool):
    if not enabled:
        return steps
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are optional
        return steps
    return tqdm(steps, desc=stage, total=total, initial=start, leave=False)
