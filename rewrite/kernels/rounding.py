"""Rounding float32 values to a narrower float dtype inside Triton kernels, identically on GPUs and in Triton's CPU
interpreter (so interpreted tests see the bits a GPU writes)."""

import triton
import triton.language as tl


@triton.jit
def round_to(value, dtype: tl.constexpr):
    """float32 `value` rounded to `dtype` to nearest, ties to even. bfloat16 is rounded on the bits: Triton's
    CPU interpreter truncates float32 -> bfloat16 where GPUs round (both give these bits)."""
    if dtype == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(value != value, value.to(tl.bfloat16), rounded)
    else:
        return value.to(dtype)
