"""Triton kernel that gathers the same rows (dim 0) of up to six tensors at once, and its launcher.

One program copies one block of columns of one gathered row of every tensor: each tensor is read as rows of
`width` contiguous elements `stride` apart (stride 0 for a batch dim made by `expand`), whatever its dtype.
The launcher runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before this module was
imported.
"""

import torch
import triton
import triton.language as tl

from rewrite.kernels.launch_math import cdiv, next_power_of_2, row_warps

from ..alloc import new_empty

SLOTS = 6
"""Tensors one launch gathers (a routed Llama block's hidden state, cos, sin, mask and its decode view's visible
mask: five); more take more launches."""


@triton.jit
def _copy_row(src_ptr, dst_ptr, stride, width, row, r, cols):
    mask = cols < width
    tl.store(dst_ptr + r * width + cols, tl.load(src_ptr + row * stride + cols, mask=mask), mask=mask)


@triton.jit
def _gather_rows_kernel(
    rows_ptr,
    src0_ptr, dst0_ptr, stride0, width0, src1_ptr, dst1_ptr, stride1, width1,
    src2_ptr, dst2_ptr, stride2, width2, src3_ptr, dst3_ptr, stride3, width3,
    src4_ptr, dst4_ptr, stride4, width4, src5_ptr, dst5_ptr, stride5, width5,
    COUNT: tl.constexpr, BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row = tl.load(rows_ptr + r).to(tl.int64)
    _copy_row(src0_ptr, dst0_ptr, stride0, width0, row, r, cols)
    if COUNT > 1:
        _copy_row(src1_ptr, dst1_ptr, stride1, width1, row, r, cols)
    if COUNT > 2:
        _copy_row(src2_ptr, dst2_ptr, stride2, width2, row, r, cols)
    if COUNT > 3:
        _copy_row(src3_ptr, dst3_ptr, stride3, width3, row, r, cols)
    if COUNT > 4:
        _copy_row(src4_ptr, dst4_ptr, stride4, width4, row, r, cols)
    if COUNT > 5:
        _copy_row(src5_ptr, dst5_ptr, stride5, width5, row, r, cols)


def _as_bytes_if_bool(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def gather_rows_forward(values: list[torch.Tensor], rows: torch.Tensor) -> list[torch.Tensor]:
    """[v.index_select(0, rows) for v in values], contiguous, for tensors whose rows are contiguous runs (see
    `launch_math.rows_are_contiguous`), on one device with `rows`; SLOTS tensors a launch."""
    count = rows.shape[0]
    outs = [new_empty((count, *v.shape[1:]), dtype=v.dtype, device=v.device) for v in values]
    if count == 0:
        return outs
    rows = rows.contiguous()
    for start in range(0, len(values), SLOTS):
        group = [(v, o) for v, o in zip(values[start:start + SLOTS], outs[start:start + SLOTS], strict=True)
                 if v.numel() > 0]
        if not group:
            continue
        widest = max(v[0].numel() for v, _ in group)
        block = min(next_power_of_2(widest), 2048)
        args = []
        for v, o in group + [group[0]] * (SLOTS - len(group)):  # unused slots repeat the first (not read)
            args += [_as_bytes_if_bool(v), _as_bytes_if_bool(o), v.stride(0), v[0].numel()]
        _gather_rows_kernel[(count, cdiv(widest, block))](
            rows, *args, COUNT=len(group), BLOCK=block, num_warps=row_warps(block, 256, 8))
    return outs
