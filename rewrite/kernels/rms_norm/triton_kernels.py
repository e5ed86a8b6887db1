"""Triton kernels for RMSNorm and their launchers (plain functions taking tensors).

The launchers run on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before
this module was imported.
"""

import torch
import triton
import triton.language as tl

from rewrite.kernels.launch_math import cdiv, next_power_of_2, row_warps

from ..alloc import new_empty
from ..rounding import round_to


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    y = x * rstd * w
    tl.store(y_ptr + row * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_cast_row(x, w_ptr, cols, mask, n_cols, eps, weight_offset, x_dtype: tl.constexpr,
                       out_dtype: tl.constexpr, ROUND_NORMED: tl.constexpr):
    """One row's `rms_norm_cast` (see `rms_norm_cast_reference`) from its values `x` in float32 (masked lanes 0),
    rounded to `out_dtype`; `x_dtype` is the dtype the normalized row is rounded to when ROUND_NORMED."""
    normed = x * tl.math.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    if ROUND_NORMED:
        normed = round_to(normed, x_dtype).to(tl.float32)
    scale = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + weight_offset
    return round_to(normed * scale, out_dtype)


@triton.jit
def _rms_norm_cast_fwd_kernel(
    x_ptr, w_ptr, out_ptr, n_cols, eps, weight_offset, ROUND_NORMED: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    out = _rms_norm_cast_row(x, w_ptr, cols, mask, n_cols, eps, weight_offset, x_ptr.dtype.element_ty,
                             out_ptr.dtype.element_ty, ROUND_NORMED)
    tl.store(out_ptr + row * n_cols + cols, out, mask=mask)


@triton.jit
def _add_rms_norm_cast_fwd_kernel(
    x_ptr, residual_ptr, w_ptr, sum_ptr, out_ptr, n_cols, eps, weight_offset, ROUND_NORMED: tl.constexpr,
    BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    residual = tl.load(residual_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    total = round_to(x + residual, x_ptr.dtype.element_ty)
    tl.store(sum_ptr + row * n_cols + cols, total, mask=mask)
    out = _rms_norm_cast_row(total.to(tl.float32), w_ptr, cols, mask, n_cols, eps, weight_offset,
                             x_ptr.dtype.element_ty, out_ptr.dtype.element_ty, ROUND_NORMED)
    tl.store(out_ptr + row * n_cols + cols, out, mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    dx_ptr,
    dw_partial_ptr,
    n_rows,
    n_cols,
    rows_per_program,
    eps,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    first = pid * rows_per_program
    for i in range(0, rows_per_program):
        row = (first + i).to(tl.int64)
        if row < n_rows:
            x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
            xhat = x * rstd
            dxhat = dy * w
            dx = rstd * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=0) / n_cols))
            tl.store(dx_ptr + row * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dw += dy * xhat
    tl.store(dw_partial_ptr + pid * n_cols + cols, dw, mask=mask)


def _block(n_cols: int) -> int:
    block = next_power_of_2(n_cols)
    if block > 65536:
        raise ValueError(f"rms_norm supports a last dimension of at most 65536, got {n_cols}")
    return block


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = RMSNorm(x) * weight over the last dimension."""
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols).contiguous()
    y = new_empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0] > 0:
        _rms_norm_fwd_kernel[(x2.shape[0],)](x2, weight.contiguous(), y, n_cols, eps, BLOCK=_block(n_cols))
    return y.view(x.shape)


def rms_norm_cast_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float, round_normed: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """RMSNorm with a Hugging Face model's cast order (see `rms_norm_cast_reference`), one program per row."""
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols).contiguous()
    out = new_empty(x2.shape, dtype=out_dtype, device=x.device)
    if x2.shape[0] > 0:
        _rms_norm_cast_fwd_kernel[(x2.shape[0],)](
            x2, weight.contiguous(), out, n_cols, eps, weight_offset, ROUND_NORMED=round_normed,
            BLOCK=_block(n_cols), num_warps=row_warps(n_cols, per_warp=512, most=16),
        )
    return out.view(x.shape)


def add_rms_norm_cast_forward(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float,
    round_normed: bool, out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual in x's dtype, `rms_norm_cast` of that sum), one program per row."""
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols).contiguous()
    residual2 = residual.reshape(-1, n_cols).contiguous()
    total = new_empty(x2.shape, dtype=x.dtype, device=x.device)
    out = new_empty(x2.shape, dtype=out_dtype, device=x.device)
    if x2.shape[0] > 0:
        _add_rms_norm_cast_fwd_kernel[(x2.shape[0],)](
            x2, residual2, weight.contiguous(), total, out, n_cols, eps, weight_offset, ROUND_NORMED=round_normed,
            BLOCK=_block(n_cols), num_warps=row_warps(n_cols, per_warp=512, most=16),
        )
    return total.view(x.shape), out.view(x.shape)


def rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (dx, dweight) of `rms_norm_forward` given the output gradient dy."""
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols).contiguous()
    dy2 = dy.reshape(-1, n_cols).contiguous()
    n_rows = x2.shape[0]
    if x.is_cuda:
        programs = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
    else:
        programs = 4
    programs = max(1, min(programs, n_rows))
    rows_per_program = cdiv(n_rows, programs)
    dx = new_empty(x2.shape, dtype=x.dtype, device=x.device)
    dw_partial = new_empty((programs, n_cols), dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return dx.view(x.shape), torch.zeros_like(weight)
    _rms_norm_bwd_kernel[(programs,)](
        dy2,
        x2,
        weight.contiguous(),
        dx,
        dw_partial,
        n_rows,
        n_cols,
        rows_per_program,
        eps,
        BLOCK=_block(n_cols),
    )
    return dx.view(x.shape), dw_partial.sum(0).to(weight.dtype)
