"""The `rewrite::add_rows_into_` op: schema, fake, CPU reference and CUDA Triton implementation (forward only)."""

import torch

from .._triton import load_triton_module
from ..launch_math import rows_are_contiguous

_TRITON = "rewrite.kernels.row_scatter.triton_kernels"
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@torch.library.custom_op("rewrite::add_rows_into_", mutates_args=("target",))
def add_rows_into_op(target: torch.Tensor, rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """target.index_copy_(0, rows, (a + b).to(target.dtype))."""
    target.index_copy_(0, rows, (a + b).to(target.dtype))


@add_rows_into_op.register_kernel("cuda")
def _add_rows_into_cuda(target: torch.Tensor, rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    launchers = load_triton_module(_TRITON)
    one_rounding = a.dtype == b.dtype == target.dtype in _TRITON_DTYPES  # else a + b rounds before the cast
    if one_rounding and a.is_contiguous() and b.is_contiguous() and rows_are_contiguous(target):
        launchers.add_rows_into_forward(target, rows, a, b)
    else:
        target.index_copy_(0, rows, (a + b).to(target.dtype))


@add_rows_into_op.register_fake
def _add_rows_into_fake(target: torch.Tensor, rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    return None


def add_rows_into_(target: torch.Tensor, rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`target.index_copy_(0, rows, (a + b).to(target.dtype))`, returning `target`: by one kernel launch on CUDA when a,
    b and target share a float dtype (the add then rounds once, as PyTorch's does). `rows` [R]: int64 indices into
    target's dim 0; a and b [R, *target.shape[1:]]. Forward only (no autograd)."""
    if rows.dim() != 1 or rows.dtype != torch.long:
        raise ValueError(f"add_rows_into_: rows must be a 1-D int64 tensor, got {rows.dtype} of shape "
                         f"{tuple(rows.shape)}")
    expected = (rows.shape[0], *target.shape[1:])
    for name, t in (("a", a), ("b", b)):
        if tuple(t.shape) != expected:
            raise ValueError(f"add_rows_into_: {name} must have shape {expected} (rows x target's row shape), got "
                             f"{tuple(t.shape)}")
        if t.device != target.device or rows.device != target.device:
            raise ValueError(f"add_rows_into_: target, rows, a and b must share a device, got {target.device}, "
                             f"{rows.device}, {a.device}, {b.device}")
    add_rows_into_op(target, rows, a, b)
    return target
