"""Plain-PyTorch reference of the fused router: pool + linear + sigmoid + compaction of active rows."""

import torch


def route_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(skip probability [B] (float32, float64 for float64 x), row order [B] int64, number of active rows [] int64).

    x is [B, L, D]; the probability is sigmoid(mean_l(x[b, l]) . weight + bias). A row is skipped
    when its probability exceeds `threshold`; `order` lists the active rows first, then the skipped
    ones, each group in ascending row order.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    pooled = x.to(acc).mean(dim=1)
    prob = torch.sigmoid(pooled @ weight.to(acc) + bias.to(acc).reshape(()))
    skipped = prob > threshold
    order = torch.argsort(skipped.to(torch.int8), stable=True)
    count = (~skipped).sum()
    return prob, order.to(torch.int64), count.to(torch.int64)


def route_backward_reference(
    dprob: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, prob: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dx, dweight, dbias) of the router probability given its output gradient."""
    acc = prob.dtype
    dlogit = dprob.to(acc) * prob * (1 - prob)
    pooled = x.to(acc).mean(dim=1)
    dweight = dlogit @ pooled
    dbias = dlogit.sum().reshape(1)
    dx = (dlogit[:, None, None] * weight.to(acc)[None, None, :] / x.shape[1]).expand(x.shape)
    return dx.to(x.dtype).contiguous(), dweight.to(weight.dtype), dbias
