"""Output allocation for kernel launchers, with a switch that fills new buffers with NaN.

Tests turn the switch on so that any element a kernel forgets to write shows up as NaN
instead of as whatever the allocator happened to leave in memory.
"""

import contextlib
from collections.abc import Iterator, Sequence

import torch

_poison = False


def new_empty(shape: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor (while `poisoned()` is active: NaN-filled, or for integer / bool dtypes filled with
    the dtype's largest value / True)."""
    if _poison:
        fill = (float("nan") if dtype.is_floating_point else True if dtype == torch.bool
                else torch.iinfo(dtype).max)
        return torch.full(tuple(shape), fill, dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


@contextlib.contextmanager
def poisoned() -> Iterator[None]:
    """Fill every buffer from `new_empty` with NaN inside this block."""
    global _poison
    previous, _poison = _poison, True
    try:
        yield
    finally:
        _poison = previous
