"""A loop-by-loop router in float64: the independent reference the tests compare against."""

import torch


def route_naive(
    x: torch.Tensor, weight: torch.Tensor, bias: float, threshold: float
) -> tuple[torch.Tensor, list[int], int]:
    """(skip probability [B] float64, row order, number of active rows), one row at a time."""
    batch, length, _ = x.shape
    probs = []
    active: list[int] = []
    skipped: list[int] = []
    for b in range(batch):
        total = torch.zeros((), dtype=torch.float64)
        for t in range(length):
            total = total + (x[b, t].double() * weight.double()).sum()
        logit = total / length + bias
        prob = 1.0 / (1.0 + torch.exp(-logit))
        probs.append(prob)
        (skipped if prob.item() > threshold else active).append(b)
    return torch.stack(probs), active + skipped, len(active)
