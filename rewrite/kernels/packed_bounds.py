"""The checks of packed `cu_seqlens` every kernel shares, and a scope that trusts them.

Reading `cu_seqlens` back to the host stalls the device queue. Callers that built `cu_seqlens`
themselves (the varlen pass's runtime) run the kernels inside `trusted_cu_seqlens()`, so a layer
of packed mixers makes no host read; every other call is checked.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

_TRUSTED: contextvars.ContextVar[bool] = contextvars.ContextVar("rewrite_trusted_cu_seqlens", default=False)


@contextlib.contextmanager
def trusted_cu_seqlens() -> Iterator[None]:
    """Within this scope the kernels do not read `cu_seqlens` back to validate them."""
    token = _TRUSTED.set(True)
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def cu_seqlens_trusted() -> bool:
    """Whether the caller is inside `trusted_cu_seqlens()` (kernels then make no host read of cu_seqlens)."""
    return _TRUSTED.get()


def read_bounds(cu_seqlens: torch.Tensor) -> list[int]:
    """`cu_seqlens` on the host (one device sync)."""
    return cu_seqlens.tolist()


def check_bounds(op: str, cu_seqlens: torch.Tensor, total: int) -> None:
    """Raise ValueError naming `op` unless cu_seqlens = [0, ..., total] without decreasing.

    Skipped while compiling and inside `trusted_cu_seqlens()`.
    """
    if torch.compiler.is_compiling() or cu_seqlens_trusted():  # compiling first: Dynamo cannot trace a ContextVar
        return
    bounds = read_bounds(cu_seqlens)
    if bounds[0] != 0 or bounds[-1] != total or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"{op}: cu_seqlens must rise from 0 to T = {total} without decreasing, got {bounds}")


def check_packed(op: str, cu_seqlens: torch.Tensor | None, x: torch.Tensor) -> int:
    """The number of sequences N of `x` [B, T, ...]; with cu_seqlens, a 1-D int tensor [N + 1] on x's device,
    B == 1, and bounds [0, ..., T] (see `check_bounds`). Raises ValueError naming `op`."""
    if cu_seqlens is None:
        return x.shape[0]
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.numel() < 2:
        raise ValueError(
            f"{op}: cu_seqlens must be a 1-D int32/int64 tensor [N + 1], got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != x.device:
        raise ValueError(f"{op}: cu_seqlens must be on {x.device}, got {cu_seqlens.device}")
    if x.shape[0] != 1:
        raise ValueError(f"{op}: cu_seqlens needs packed inputs with B == 1, got B = {x.shape[0]}")
    check_bounds(op, cu_seqlens, x.shape[1])
    return cu_seqlens.shape[0] - 1
