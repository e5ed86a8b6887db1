"""Differentiable collectives over a `SequenceGroup`: gradients flow back to the rank that sent each value.

- `all_gather(x)`: [P, *x.shape]; backward sums every rank's gradient of this rank's row.
- `all_to_all(x)`: x [P, ...] row j to rank j; backward is the same exchange of gradients.
- `shift(x, dst, src)`: send x to rank dst, receive from src (zeros when src is None); backward
  sends the received value's gradient back to src.
"""

from __future__ import annotations

import torch

from rewrite.distributed.groups import SequenceGroup


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: SequenceGroup) -> torch.Tensor:
        ctx.group = group
        return group.all_gather(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # row r of every rank's gradient belongs to rank r: exchange rows, then sum what arrived
        return ctx.group.all_to_all(grad.contiguous()).sum(0), None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: SequenceGroup) -> torch.Tensor:
        ctx.group = group
        return group.all_to_all(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.group.all_to_all(grad.contiguous()), None


class _Shift(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: SequenceGroup, dst: int | None, src: int | None) -> torch.Tensor:
        ctx.group, ctx.dst, ctx.src = group, dst, src
        received = group.exchange(x, dst, src)
        return torch.zeros_like(x) if received is None else received

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = ctx.group.exchange(grad.contiguous(), ctx.src, ctx.dst)
        return (torch.zeros_like(grad) if back is None else back), None, None, None


def all_gather(x: torch.Tensor, group: SequenceGroup) -> torch.Tensor:
    """[P, *x.shape]: every rank's x in rank order (differentiable)."""
    return _AllGather.apply(x, group)


def all_to_all(x: torch.Tensor, group: SequenceGroup) -> torch.Tensor:
    """x [P, ...]: row j to rank j; returns rows received from each rank (differentiable)."""
    return _AllToAll.apply(x, group)


def shift(x: torch.Tensor, group: SequenceGroup, dst: int | None, src: int | None) -> torch.Tensor:
    """Send x to dst and return what src sent (zeros when src is None) (differentiable)."""
    return _Shift.apply(x, group, dst, src)


def gather_sequence(x: torch.Tensor, group: SequenceGroup, dim: int, order: torch.Tensor | None) -> torch.Tensor:
    """Every rank's shard of x concatenated along `dim`, in global order when `order` is given (differentiable)."""
    parts = all_gather(x, group)  # [P, ...]
    full = torch.cat(parts.unbind(0), dim=dim)
    return full if order is None else full.index_select(dim, order)
