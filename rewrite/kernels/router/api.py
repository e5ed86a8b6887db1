"""Public router function: argument checks, then the op."""

import torch

from .op import route_op


def route(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, threshold: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score each sequence of x [B, L, D] and list the rows that run.

    Returns (prob, order, count): prob [B] (float32; float64 for float64 x) is sigmoid(mean over L of x[b] . weight + bias),
    the probability of skipping; a row is skipped when prob > threshold; order [B] int64 holds the
    active rows first, then the skipped ones, each in ascending order; count [] int64 is the number
    of active rows. Gradients flow to x, weight and bias through prob.
    """
    if x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"route: x must be a floating-point [B, L, D] tensor, got {x.dtype} {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError("route: x has an empty sequence dimension; there is nothing to pool")
    if weight.dim() != 1 or weight.shape[0] != x.shape[2]:
        raise ValueError(f"route: weight must have shape [{x.shape[2]}] (the last dim of x), got {tuple(weight.shape)}")
    if bias.numel() != 1:
        raise ValueError(f"route: bias must hold one value, got shape {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t.device != x.device or not t.is_floating_point():
            raise ValueError(f"route: {name} must be a floating-point tensor on {x.device}, got {t.dtype} on {t.device}")
    return route_op(x, weight, bias.reshape(1), float(threshold))
