"""The recipe end to end: copy the model, linearize it, attention transfer, fine-tune."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import rewrite
from rewrite.distill.config import DistillConfig
from rewrite.distill.finetune import add_lora, kl_to_teacher, mse_to_teacher, next_token_loss
from rewrite.distill.loop import StageRun, train_stage
from rewrite.distill.transfer import new_parameters, require_new_parameters, transfer_loss
from rewrite.errors import RewriteError
from rewrite.lora import optimize_merged

Data = Callable[[int], Any]
"""Inputs of training step `step`: a dict of keyword arguments or a tuple of positional ones."""


@dataclass
class DistillResult:
    """The trained linearized module, the untouched original (the teacher) and the losses per stage.

    `lora_parameters` names the LoRA adapters' parameters as they trained; when the fine-tune merged
    them (`FinetuneConfig.merge`), `module` no longer has them: their products are in the base weights.
    """

    module: rewrite.OptimizedModule
    teacher: torch.nn.Module
    history: dict[str, list[float]]
    lora_parameters: list[str]


def split_inputs(inputs: Any) -> tuple[tuple, dict[str, Any]]:
    """(args, kwargs) of one batch."""
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, tuple | list):
        return tuple(inputs), {}
    return (inputs,), {}


def main_output(out: Any) -> torch.Tensor:
    """The tensor a loss compares: logits, else the last hidden state, else the (first) output tensor."""
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise RewriteError(f"cannot find the output tensor of a {type(out).__name__}")


def _ids_and_valid(args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    ids = kwargs.get("input_ids", args[0] if args else None)
    mask = kwargs.get("attention_mask")
    ids = ids if isinstance(ids, torch.Tensor) and not ids.is_floating_point() else None
    return ids, (mask.bool() if isinstance(mask, torch.Tensor) else None)


def distill(model: torch.nn.Module, plan: Any, data: Data, config: DistillConfig | None = None,
            *, log: Callable[[str], None] | None = None, seed: int = 0) -> DistillResult:
    """Linearize a copy of `model` by `plan` and recover its quality (see `rewrite.distill`).

    `model` itself is not changed: it is the teacher. `data(step)` gives each step's inputs (the
    same inputs for the same step, so a resumed run repeats an uninterrupted one). Training runs in
    eval mode (no dropout). After a LoRA fine-tune with `merge` on, the adapters are folded into the
    base weights and `module` is the merged student optimized again, holding the trained values of
    the parameters the passes added.
    """
    config = config or DistillConfig()
    config.validate()
    ft = config.finetune
    teacher = model.eval()
    torch.manual_seed(seed)
    student = copy.deepcopy(model).eval()
    lora_names: list[str] = []
    if ft.steps > 0 and ft.method == "lora":
        lora_names = add_lora(student, ft.lora_rank, ft.lora_alpha)
    args, kwargs = split_inputs(data(0))
    om = rewrite.optimize(student, plan, args, example_kwargs=kwargs)
    om.eval()
    run = StageRun(om, config.checkpoint_dir, config.checkpoint_every, config.resume, config.progress, log,
                   config.log_every)

    if config.transfer.steps > 0:
        trainable = require_new_parameters(om)

        def transfer_step(step: int) -> torch.Tensor:
            a, k = split_inputs(data(step))
            return transfer_loss(om, a, k, layer_local=config.transfer.mode == "layer")

        train_stage(run, "transfer", trainable, transfer_step, steps=config.transfer.steps, lr=config.transfer.lr,
                    weight_decay=config.transfer.weight_decay)

    if ft.steps > 0:
        params = dict(om.named_parameters())
        if ft.method == "lora":
            trainable = {n: params[n] for n in lora_names}
        else:
            trainable = {n: p for n, p in params.items() if p.is_floating_point()}
        if ft.train_mixers:
            trainable.update(require_new_parameters(om) if config.transfer.steps > 0 else _maybe_new(om))

        def finetune_step(step: int) -> torch.Tensor:
            a, k = split_inputs(data(step))
            out = main_output(om(*a, **k))
            ids, valid = _ids_and_valid(a, k)
            total = out.new_zeros((), dtype=torch.float32)
            target = None
            if "kl" in ft.losses or "mse" in ft.losses:
                with torch.no_grad():
                    target = main_output(teacher(*a, **k))
            for loss in ft.losses:
                if loss == "ce":
                    if ids is None:
                        raise RewriteError("loss 'ce' needs integer token ids (input_ids or the first argument)")
                    total = total + next_token_loss(out, ids, valid)
                elif loss == "kl":
                    total = total + kl_to_teacher(out, target, ft.kl_temperature, valid)
                else:
                    total = total + mse_to_teacher(out, target, valid)
            return total

        train_stage(run, "finetune", trainable, finetune_step, steps=ft.steps, lr=ft.lr)
        if lora_names and ft.merge:
            om = optimize_merged(om, student, args, kwargs, keep_adapters_hint="use FinetuneConfig(merge=False)")
    return DistillResult(om, teacher, run.history, lora_names)


def _maybe_new(om: rewrite.OptimizedModule) -> dict[str, torch.nn.Parameter]:
    return new_parameters(om)
