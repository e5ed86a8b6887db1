"""Calling a causal language model the same way whatever its family: ids in, logits out."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F


def takes_input_ids(model: torch.nn.Module) -> bool:
    """Whether the model's forward names its token argument `input_ids` (Hugging Face style)."""
    forward = getattr(model, "source", None) or model
    try:
        return "input_ids" in inspect.signature(forward.forward).parameters
    except (TypeError, ValueError):
        return False


def logits_of(module: torch.nn.Module, ids: torch.Tensor, *, keyword: bool) -> torch.Tensor:
    """[B, L, V] logits of `module` on token ids [B, L]."""
    out: Any = module(input_ids=ids) if keyword else module(ids)
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"the model returned {type(out).__name__}; expected logits (a tensor or an output with .logits)")


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of next-token targets [B, L]."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
