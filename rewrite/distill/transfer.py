"""Stage 1 of the recipe: the attention-transfer loss and the parameters it trains."""

from __future__ import annotations

from typing import Any

import torch

from rewrite.errors import RewriteError
from rewrite.mixers.transfer import record_transfer


def new_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters the plan's passes added (mixer decays, gates, convs, learned feature maps)."""
    report = getattr(module, "report", None)
    if report is None:
        raise RewriteError("attention transfer needs an OptimizedModule (from rewrite.optimize)")
    params = dict(module.named_parameters())
    return {n: params[n] for n in report.added_parameters if n in params}


def require_new_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """`new_parameters`, or an error saying how to get some."""
    found = new_parameters(module)
    if not found:
        raise RewriteError(
            "attention transfer has nothing to train: the plan's mixers added no parameters (kinds linear, "
            "gla, bidirectional and sliding_window have none). Use feature_map: hedgehog (a learned feature "
            "map), a kind with parameters (retention, gated_deltanet, mamba2, lawcat, hybrid_swa), or skip "
            "the stage (transfer steps 0)"
        )
    return found


def transfer_loss(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], *, layer_local: bool) -> torch.Tensor:
    """Sum over linearized layers of the MSE between each mixer's output and its softmax teacher."""
    with record_transfer(teacher_forcing=layer_local) as record:
        module(*args, **kwargs)
    return record.total()
