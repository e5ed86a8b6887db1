"""Triton kernel for the gated MLP activation `act(gate) * up` and its launcher.

The activation is computed in float32 (float64 never: the op takes float32, float16 and bfloat16), rounded to the
input dtype, and the product of the rounded activation and `up` is computed in float32 and rounded again, as
PyTorch's separate activation and `mul` kernels do (no fused multiply-add: the launch turns floating-point fusion
off). On CUDA the activation uses libdevice's `exp` / `tanh` and a correctly rounded division, the functions
PyTorch's CUDA kernels call (`tl.exp` is `ex2.approx` there, a few float32 ulps off); Triton's CPU interpreter has
no libdevice, so there it uses `tl.exp` (NumPy's) and tanh from exp.
The launcher runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before this module was
imported.
"""

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from rewrite.kernels.launch_math import cdiv, next_power_of_2

from ..alloc import new_empty
from ..rounding import round_to

MOST_BLOCK = 1024
"""Elements of one row a program computes at most (a wide MLP row is split over several programs)."""


@triton.jit
def _exp(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _tanh(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        return libdevice.tanh(x)
    else:
        e = tl.exp(-2.0 * tl.abs(x))
        t = tl.math.div_rn(1.0 - e, 1.0 + e)
        return tl.where(x < 0, -t, t)


@triton.jit
def _activation(x, KIND: tl.constexpr, LIBDEVICE: tl.constexpr):
    """SiLU (KIND 0) or tanh-approximated GELU (KIND 1) of float32 `x`, in PyTorch's operation order (GELU's
    constants are PyTorch's kBeta = sqrt(2 / pi) and kKappa)."""
    if KIND == 0:
        return tl.math.div_rn(x, 1.0 + _exp(-x, LIBDEVICE))
    else:
        cube = x * x * x
        if LIBDEVICE:  # PyTorch's CUDA kernel, compiled with contraction on: x + kappa * cube is one fma
            inner = 0.7978845608028654 * tl.fma(0.044715, cube, x)
        else:  # its CPU kernel: separate vector multiply and add
            inner = 0.7978845608028654 * (x + 0.044715 * cube)
        return 0.5 * x * (1.0 + _tanh(inner, LIBDEVICE))


@triton.jit
def _gated_activation_kernel(
    gate_ptr,
    up_ptr,
    out_ptr,
    n_cols,
    gate_row_stride,
    gate_col_stride,
    up_row_stride,
    up_col_stride,
    KIND: tl.constexpr,
    LIBDEVICE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(gate_ptr + row * gate_row_stride + cols * gate_col_stride, mask=mask, other=0.0)
    up = tl.load(up_ptr + row * up_row_stride + cols * up_col_stride, mask=mask, other=0.0)
    dtype = out_ptr.dtype.element_ty
    act = round_to(_activation(gate.to(tl.float32), KIND, LIBDEVICE), dtype)
    out = round_to(act.to(tl.float32) * up.to(tl.float32), dtype)
    tl.store(out_ptr + row * n_cols + cols, out, mask=mask)


KIND_CODES = {"silu": 0, "gelu_tanh": 1}


def _rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """`t` [..., n_cols] as [rows, n_cols]: a view where its leading dims merge (a slice of the last dim does),
    else a copy."""
    return t.reshape(-1, n_cols)


def gated_activation_forward(gate: torch.Tensor, up: torch.Tensor, kind: str) -> torch.Tensor:
    """act(gate) * up (gate and up of one shape and dtype, possibly strided), contiguous, in their dtype."""
    n_cols = gate.shape[-1] if gate.dim() else 1
    out = new_empty(gate.shape, dtype=gate.dtype, device=gate.device)
    rows = out.numel() // n_cols if n_cols else 0
    if rows == 0 or n_cols == 0:
        return out
    gate2, up2 = _rows(gate, n_cols), _rows(up, n_cols)
    block = min(MOST_BLOCK, next_power_of_2(n_cols))
    _gated_activation_kernel[(rows, cdiv(n_cols, block))](
        gate2,
        up2,
        out,
        n_cols,
        *gate2.stride(),
        *up2.stride(),
        KIND=KIND_CODES[kind],
        LIBDEVICE=gate.is_cuda,
        BLOCK=block,
        num_warps=4 if block >= 512 else 1,
        enable_fp_fusion=False,
    )
    return out
