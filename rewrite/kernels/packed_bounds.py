"""The host-side check that packed `cu_seqlens` rise from 0 to T, and a scope that trusts them.

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


def read_bounds(cu_seqlens: torch.Tensor) -> list[int]:
    """`cu_seqlens` on the host (one device sync)."""
    return cu_seqlens.tolist()


def check_bounds(op: str, cu_seqlens: torch.Tensor, total: int) -> None:
    """Raise ValueError naming `op` unless cu_seqlens = [0, ..., total] without decreasing.

    Skipped while compiling and inside `trusted_cu_seqlens()`.
    """
    if torch.compiler.is_compiling() or _TRUSTED.get():  # compiling first: Dynamo cannot trace a ContextVar
        return
    bounds = read_bounds(cu_seqlens)
    if bounds[0] != 0 or bounds[-1] != total or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"{op}: cu_seqlens must rise from 0 to T = {total} without decreasing, got {bounds}")
