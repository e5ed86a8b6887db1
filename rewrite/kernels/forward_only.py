"""When a forward-only op may stand in for the PyTorch ops it replaces at run time."""

import torch


def forward_only_applies(*tensors: torch.Tensor) -> bool:
    """Whether a forward-only kernel may replace PyTorch ops on `tensors` here: not while torch.compile traces
    (Inductor fuses those ops with their neighbours itself) and no gradient asked of them (the op has no backward)."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
