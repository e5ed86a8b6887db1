"""Triton kernels for the rotary position embedding (rotate-half form) and their launchers.

One program rotates one row (the last dim) of one tensor. Products are rounded to the output dtype
before they are added, and the sum rounded again, as PyTorch's separate `mul` and `add` kernels do (no
fused multiply-add: the launches turn floating-point fusion off).
The launchers run on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before this
module was imported.
"""

import torch
import triton
import triton.language as tl

from rewrite.kernels.launch_math import next_power_of_2, row_warps

from ..alloc import new_empty
from ..layout import layout_order, unpermuted


@triton.jit
def _round(v, out_ty: tl.constexpr, BF16_BITS: tl.constexpr):
    """`v` rounded to `out_ty` (to nearest, ties to even), kept in v's dtype."""
    if BF16_BITS:  # by integer ops: Triton's interpreter truncates a cast to bfloat16
        bits = v.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))
    else:
        return v.to(out_ty).to(v.dtype)


@triton.jit
def _rotate_row(
    x_ptr, cos_ptr, sin_ptr, out_ptr, row, n1, n2,
    xs0, xs1, xs2, xs3, cs0, cs1, cs2, cs3, ss0, ss1, ss2, ss3,
    half, BLOCK: tl.constexpr, COMPUTE: tl.constexpr, BF16_BITS: tl.constexpr,
):
    i2 = row % n2
    i1 = (row // n2) % n1
    i0 = row // (n2 * n1)
    cols = tl.arange(0, BLOCK)
    mask = cols < half
    x_row = x_ptr + i0 * xs0 + i1 * xs1 + i2 * xs2
    cos_row = cos_ptr + i0 * cs0 + i1 * cs1 + i2 * cs2
    sin_row = sin_ptr + i0 * ss0 + i1 * ss1 + i2 * ss2
    x1 = tl.load(x_row + cols * xs3, mask=mask, other=0.0).to(COMPUTE)
    x2 = tl.load(x_row + (cols + half) * xs3, mask=mask, other=0.0).to(COMPUTE)
    c1 = tl.load(cos_row + cols * cs3, mask=mask, other=0.0).to(COMPUTE)
    c2 = tl.load(cos_row + (cols + half) * cs3, mask=mask, other=0.0).to(COMPUTE)
    s1 = tl.load(sin_row + cols * ss3, mask=mask, other=0.0).to(COMPUTE)
    s2 = tl.load(sin_row + (cols + half) * ss3, mask=mask, other=0.0).to(COMPUTE)
    out_ty = out_ptr.dtype.element_ty
    # rotate_half(x) = cat(-x2, x1): each product rounded to the output dtype, then the sum
    y1 = _round(x1 * c1, out_ty, BF16_BITS) + _round((-x2) * s1, out_ty, BF16_BITS)
    y2 = _round(x2 * c2, out_ty, BF16_BITS) + _round(x1 * s2, out_ty, BF16_BITS)
    out_row = out_ptr + row * (2 * half)
    tl.store(out_row + cols, _round(y1, out_ty, BF16_BITS).to(out_ty), mask=mask)
    tl.store(out_row + half + cols, _round(y2, out_ty, BF16_BITS).to(out_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr, n1, n2,
    xs0, xs1, xs2, xs3, cs0, cs1, cs2, cs3, ss0, ss1, ss2, ss3,
    half, BLOCK: tl.constexpr, COMPUTE: tl.constexpr, BF16_BITS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    _rotate_row(x_ptr, cos_ptr, sin_ptr, out_ptr, row, n1, n2, xs0, xs1, xs2, xs3, cs0, cs1, cs2, cs3,
                ss0, ss1, ss2, ss3, half, BLOCK, COMPUTE, BF16_BITS)


@triton.jit
def _rotary_pair_kernel(
    q_ptr, qcos_ptr, qsin_ptr, qout_ptr, q_rows, q_n1, q_n2,
    qs0, qs1, qs2, qs3, qcs0, qcs1, qcs2, qcs3, qss0, qss1, qss2, qss3,
    k_ptr, kcos_ptr, ksin_ptr, kout_ptr, k_n1, k_n2,
    ks0, ks1, ks2, ks3, kcs0, kcs1, kcs2, kcs3, kss0, kss1, kss2, kss3,
    half, BLOCK: tl.constexpr, COMPUTE: tl.constexpr, BF16_BITS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    if pid < q_rows:
        _rotate_row(q_ptr, qcos_ptr, qsin_ptr, qout_ptr, pid, q_n1, q_n2, qs0, qs1, qs2, qs3,
                    qcs0, qcs1, qcs2, qcs3, qss0, qss1, qss2, qss3, half, BLOCK, COMPUTE, BF16_BITS)
    else:
        _rotate_row(k_ptr, kcos_ptr, ksin_ptr, kout_ptr, pid - q_rows, k_n1, k_n2, ks0, ks1, ks2, ks3,
                    kcs0, kcs1, kcs2, kcs3, kss0, kss1, kss2, kss3, half, BLOCK, COMPUTE, BF16_BITS)


def _four_dims(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """`t` broadcast to `shape` as a 4-D view (leading dims added or merged; merging may copy)."""
    t = t.expand(shape)
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t.reshape(-1, *t.shape[-3:]) if t.dim() > 4 else t


class _Rows:
    """One tensor's launch arguments: input, cos and sin as 4-D views of its shape, and the row count; with its dims
    ordered as they lie in memory (`layout_order`), so that a contiguous output of that order is laid out as x."""

    def __init__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        self.order = layout_order(x)
        if self.order is not None:
            cos, sin = cos.expand(x.shape).permute(self.order), sin.expand(x.shape).permute(self.order)
            x = x.permute(self.order)
        self.shape = x.shape
        self.x = _four_dims(x, x.shape)
        self.cos = _four_dims(cos, x.shape)
        self.sin = _four_dims(sin, x.shape)
        n0, self.n1, self.n2, _ = self.x.shape
        self.rows = n0 * self.n1 * self.n2

    def args(self) -> list:
        return [*self.x.stride(), *self.cos.stride(), *self.sin.stride()]

    def result(self, out: torch.Tensor) -> torch.Tensor:
        """The kernel's contiguous `out` (in this object's dim order) in x's dim order: laid out as x
        (`layout.empty_in_layout_of`, contiguous where x has no `layout_order`)."""
        return out if self.order is None else unpermuted(out, self.order)


def _output(rows: _Rows, x: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """The kernel's contiguous output for `rows` (x's dims in memory order)."""
    return new_empty(rows.shape, dtype=torch.result_type(x, cos), device=x.device)


def _meta(x: torch.Tensor, out: torch.Tensor) -> tuple[int, int, object]:
    half = x.shape[-1] // 2
    compute = tl.float64 if out.dtype == torch.float64 else tl.float32
    return half, next_power_of_2(max(half, 1)), compute


def rotary_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, laid out as x (`layout.empty_in_layout_of`), in the dtype PyTorch promotes x and
    cos to."""
    rows = _Rows(x, cos, sin)
    out = _output(rows, x, cos)
    half, block, compute = _meta(x, out)
    if rows.rows > 0 and half > 0:
        _rotary_kernel[(rows.rows,)](rows.x, rows.cos, rows.sin, out, rows.n1, rows.n2, *rows.args(), half,
                                     BLOCK=block, COMPUTE=compute,
                                     BF16_BITS=out.dtype == torch.bfloat16, num_warps=row_warps(half, per_warp=64, most=4),
                                     enable_fp_fusion=False)
    return rows.result(out)


def rotary_pair_forward(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rotary_forward` of q and of k by the same cos / sin, in one launch."""
    qr, kr = _Rows(q, cos, sin), _Rows(k, cos, sin)
    q_out, k_out = _output(qr, q, cos), _output(kr, k, cos)
    half, block, compute = _meta(q, q_out)
    if compute != _meta(k, k_out)[2]:
        return rotary_forward(q, cos, sin), rotary_forward(k, cos, sin)
    if qr.rows + kr.rows > 0 and half > 0:
        _rotary_pair_kernel[(qr.rows + kr.rows,)](
            qr.x, qr.cos, qr.sin, q_out, qr.rows, qr.n1, qr.n2, *qr.args(),
            kr.x, kr.cos, kr.sin, k_out, kr.n1, kr.n2, *kr.args(),
            half, BLOCK=block, COMPUTE=compute, BF16_BITS=q_out.dtype == torch.bfloat16,
            num_warps=row_warps(half, per_warp=64, most=4), enable_fp_fusion=False,
        )
    return qr.result(q_out), kr.result(k_out)
