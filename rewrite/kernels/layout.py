"""Memory layout of an op's result: laid out as one of its inputs, as PyTorch's elementwise ops and SDPA lay theirs
out.

Model code may `view` a result in ways only its layout allows (attention output transposed back to [B, T, H, D]
and viewed without a copy), so an op that replaces PyTorch's must keep the layout PyTorch's would have given.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def layout_order(like: torch.Tensor) -> list[int] | None:
    """`like`'s dims from outermost to innermost in memory, when `like` is a permutation of a contiguous tensor
    whose last dim stays last (sizes-1 dims anywhere); None when it is contiguous or no such permutation."""
    if like.is_contiguous():
        return None
    order = sorted(range(like.dim()), key=lambda d: (-like.stride(d), d))
    if order[-1] != like.dim() - 1 or not like.permute(order).is_contiguous():
        return None
    return order


def unpermuted(x: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
    """`x`, whose dims are some tensor's dims taken in `order`, with that tensor's dim order again."""
    return x.permute(sorted(range(len(order)), key=order.__getitem__))


def empty_in_layout_of(like: torch.Tensor, shape: Sequence[int] | None = None, *, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """An uninitialised tensor of `shape` (default like's) whose dims lie in memory in `like`'s order
    (`layout_order`; contiguous when that is None)."""
    shape = list(like.shape if shape is None else shape)
    order = layout_order(like)
    if order is None:
        return like.new_empty(shape, dtype=dtype, device=device)
    return unpermuted(like.new_empty([shape[d] for d in order], dtype=dtype, device=device), order)


def in_layout_of(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value` laid out as `empty_in_layout_of(like, value.shape)`: itself when its strides already agree on every
    dim longer than one, else a copy."""
    target = empty_in_layout_of(like, value.shape, dtype=value.dtype, device="meta")
    if all(a == b for a, b, n in zip(value.stride(), target.stride(), value.shape) if n > 1):
        return value
    return empty_in_layout_of(like, value.shape, dtype=value.dtype).copy_(value)
