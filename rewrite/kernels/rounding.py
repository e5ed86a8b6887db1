"""Rounding float32 values to a narrower float dtype inside Triton kernels, identically on GPUs and in Triton's CPU
interpreter (so interpreted tests see the bits a GPU writes)."""

import triton
import triton.language as tl


@triton.jit
def round_to(value, dtype: tl.constexpr):
    """float32 `value` rounded to `dtype` to nearest, ties to even. bfloat16 is rounded on the bits, NaN as 0x7FC0
    (PyTorch's bits): Triton's CPU interpreter truncates float32 -> bfloat16 where GPUs round, and a GPU's cast
    gives NaN other bits."""
    if dtype == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = tl.where(value != value, 0x7FC0, (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16)
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return value.to(dtype)
