"""Triton kernel that writes a[i] + b[i] into row rows[i] of a target (dim 0), and its launcher.

One program handles one block of columns of one row: a and b are read as contiguous rows of `width` elements, the
target as rows of `width` contiguous elements `stride` apart; the sum is taken in float32 and rounded once to the
target's dtype, to nearest, ties to even (as PyTorch's add of two tensors of that dtype rounds). The launcher runs
on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before this module was imported.
"""

import torch
import triton
import triton.language as tl

from rewrite.kernels.launch_math import cdiv, next_power_of_2, row_warps

from ..rounding import round_to


@triton.jit
def _add_rows_into_kernel(rows_ptr, target_ptr, a_ptr, b_ptr, stride, width, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    row = tl.load(rows_ptr + r).to(tl.int64)
    a = tl.load(a_ptr + r * width + cols, mask=mask).to(tl.float32)
    b = tl.load(b_ptr + r * width + cols, mask=mask).to(tl.float32)
    tl.store(target_ptr + row * stride + cols, round_to(a + b, target_ptr.dtype.element_ty), mask=mask)


def add_rows_into_forward(target: torch.Tensor, rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """target[rows[i]] = a[i] + b[i] for a target whose rows are contiguous runs and contiguous a, b of its dtype."""
    count = rows.shape[0]
    width = target[0].numel() if target.shape[0] else 0
    if count == 0 or width == 0:
        return
    block = min(next_power_of_2(width), 2048)
    _add_rows_into_kernel[(count, cdiv(width, block))](
        rows.contiguous(), target, a, b, target.stride(0), width, BLOCK=block, num_warps=row_warps(block, 256, 8))
