"""Triton kernel that writes a decode step's keys and values into a KV cache, and its launcher.

One program copies one block of columns of one (row, kv head, token) of k into keys and of v into values at the
token's slot `index[t]`, casting each element to its cache's dtype (to nearest, ties to even, as `.to` does); k / v
may have any strides, the caches need a unit stride along the head dim. A slot outside the cache writes nothing.
The launcher runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before this module was
imported.
"""

import torch
import triton
import triton.language as tl

from rewrite.kernels.launch_math import cdiv, next_power_of_2, row_warps
from rewrite.kernels.rounding import round_to

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Dtypes of k / v and of the caches the kernel takes (others take the reference path)."""
MOST_BLOCK = 1024
"""Widest block of columns a program copies; wider heads take more programs along the grid's second dim."""


@triton.jit
def _write_row(src_ptr, dst_ptr, r, h, t, slot, ok, cols, width, s0, s1, s2, s3, c0, c1, c2,
               BF16_BITS: tl.constexpr):
    mask = cols < tl.where(ok, width, 0)  # a slot outside the cache: no column
    x = tl.load(src_ptr + r * s0 + h * s1 + t * s2 + cols * s3, mask=mask)
    if BF16_BITS:
        x = round_to(x.to(tl.float32), tl.bfloat16)
    tl.store(dst_ptr + r * c0 + h * c1 + slot * c2 + cols, x.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _kv_cache_write_kernel(
    index_ptr, k_ptr, keys_ptr, v_ptr, values_ptr, heads, count, slots, index_stride,
    ks0, ks1, ks2, ks3, kc0, kc1, kc2, dk, vs0, vs1, vs2, vs3, vc0, vc1, vc2, dv,
    BLOCK: tl.constexpr, K_BF16_BITS: tl.constexpr, V_BF16_BITS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    t = row % count
    h = (row // count) % heads
    r = row // (count * heads)
    slot = tl.load(index_ptr + t * index_stride).to(tl.int64)
    ok = (slot >= 0) & (slot < slots)
    _write_row(k_ptr, keys_ptr, r, h, t, slot, ok, cols, dk, ks0, ks1, ks2, ks3, kc0, kc1, kc2, K_BF16_BITS)
    _write_row(v_ptr, values_ptr, r, h, t, slot, ok, cols, dv, vs0, vs1, vs2, vs3, vc0, vc1, vc2, V_BF16_BITS)


def launchable(keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel takes these tensors: dtypes among DTYPES, caches with a unit stride along the head dim."""
    if any(t.dtype not in DTYPES for t in (keys, values, k, v)):
        return False
    return all(cache.shape[-1] <= 1 or cache.stride(-1) == 1 for cache in (keys, values))


def _rounds_to_bf16(new: torch.Tensor, cache: torch.Tensor) -> bool:
    return cache.dtype == torch.bfloat16 and new.dtype != torch.bfloat16


def kv_cache_write_forward(
    keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """keys[:, :, index] = k and values[:, :, index] = v in place, each cast to its cache's dtype, by one launch
    (nothing allocated): keys / values [B, Hkv, S, Dk / Dv] with `launchable`, k / v [B, Hkv, T, Dk / Dv]."""
    batch, heads, slots, dk = keys.shape
    count, dv = index.shape[0], values.shape[-1]
    widest = max(dk, dv)
    if batch * heads * count == 0 or widest == 0:
        return
    block = min(next_power_of_2(widest), MOST_BLOCK)
    _kv_cache_write_kernel[(batch * heads * count, cdiv(widest, block))](
        index, k, keys, v, values, heads, count, slots, index.stride(0),
        *k.stride(), *keys.stride()[:3], dk, *v.stride(), *values.stride()[:3], dv,
        BLOCK=block, K_BF16_BITS=_rounds_to_bf16(k, keys), V_BF16_BITS=_rounds_to_bf16(v, values),
        num_warps=row_warps(block, per_warp=64, most=4),
    )
