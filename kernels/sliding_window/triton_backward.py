"""Sliding-window attention backward in Triton; see `reference.py` for the gradients.

delta_t = rowsum(do_t * o_t) first (PyTorch). Then two kernels that recompute the probabilities
from the saved log-sum-exp: dq per (query block, q head) over the same key blocks as the
forward pass; dk and dv per (key block, kv head) over the queries that see the block (the next
window - 1 + block rows, or to the sequence end for blocks that hold sink tokens), summing the
G q heads of the group in the program, so no atomics are needed.
"""

import torch
import triton
import triton.language as tl

from ..alloc import new_empty
from ..linear_attention.triton_common import ChunkLayout
from .triton_forward import (
    BLOCK_M,
    BLOCK_N,
    LOG2E,
    check_dtype,
    head_block,
    key_ranges,
    load_rows,
    num_warps,
    precision,
    visible,
)


@triton.jit
def visible_t(k_pos, q_pos, window, sinks):
    """[N, M] mask, the transpose of `visible`: key position k_pos is seen by query position q_pos."""
    kp, qp = k_pos[:, None], q_pos[None, :]
    return (kp <= qp) & ((qp - kp < window) | (kp < sinks))


@triton.jit
def _dq_block(dq, q, do, lse2, delta, k_ptr, v_ptr, start, q_pos, bos, eos, kv_stride, dk, dv, kcols, vcols,
              window, sinks, qk_scale, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    keys = start + tl.arange(0, BLOCK_N)
    key_mask = keys < eos
    k = load_rows(k_ptr, keys, key_mask, kv_stride * dk, kcols, dk)
    v = load_rows(v_ptr, keys, key_mask, kv_stride * dv, vcols, dv)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    mask = visible(q_pos, keys - bos, window, sinks) & key_mask[None, :]
    p = tl.where(mask, tl.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def _dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, bounds_ptr, table_ptr,
    n_seqs, heads, kv_heads, dk, dv, window, sinks, scale, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):
    i_m, i_h = tl.program_id(0), tl.program_id(1)
    seq = tl.load(table_ptr + 2 * i_m)
    if seq >= n_seqs:
        return
    local = tl.load(table_ptr + 2 * i_m + 1)
    hk = i_h // (heads // kv_heads)
    bos, eos = tl.load(bounds_ptr + seq), tl.load(bounds_ptr + seq + 1)
    q_first = bos + local * BLOCK_M
    rows = q_first + tl.arange(0, BLOCK_M)
    row_mask = rows < eos
    q_pos = rows - bos
    kcols, vcols = tl.arange(0, BK), tl.arange(0, BV)
    q = load_rows(q_ptr + i_h * dk, rows, row_mask, heads * dk, kcols, dk)
    do = load_rows(do_ptr + i_h * dv, rows, row_mask, heads * dv, vcols, dv)
    head_rows = rows.to(tl.int64) * heads + i_h
    lse2 = tl.load(lse_ptr + head_rows, mask=row_mask, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + head_rows, mask=row_mask, other=0.0)
    k_ptr += hk * dk
    v_ptr += hk * dv
    dq = tl.zeros([BLOCK_M, BK], dtype=tl.float32)
    sink_end, lo, hi = key_ranges(q_first, tl.minimum(q_first + BLOCK_M, eos) - 1, bos, window, sinks, BLOCK_N)
    for start in range(bos, sink_end, BLOCK_N):
        dq = _dq_block(dq, q, do, lse2, delta, k_ptr, v_ptr, start, q_pos, bos, eos, kv_heads, dk, dv,
                       kcols, vcols, window, sinks, qk_scale, BLOCK_N, PRECISION)
    for start in range(lo, hi, BLOCK_N):
        dq = _dq_block(dq, q, do, lse2, delta, k_ptr, v_ptr, start, q_pos, bos, eos, kv_heads, dk, dv,
                       kcols, vcols, window, sinks, qk_scale, BLOCK_N, PRECISION)
    offs = rows.to(tl.int64)[:, None] * (heads * dk) + i_h * dk + kcols[None, :]
    tl.store(dq_ptr + offs, (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_mask[:, None] & (kcols < dk)[None, :])


@triton.jit
def _dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, bounds_ptr, table_ptr,
    n_seqs, heads, kv_heads, dk, dv, window, sinks, scale, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):
    i_n, hk = tl.program_id(0), tl.program_id(1)
    seq = tl.load(table_ptr + 2 * i_n)
    if seq >= n_seqs:
        return
    local = tl.load(table_ptr + 2 * i_n + 1)
    group = heads // kv_heads
    bos, eos = tl.load(bounds_ptr + seq), tl.load(bounds_ptr + seq + 1)
    k_first = bos + local * BLOCK_N
    keys = k_first + tl.arange(0, BLOCK_N)
    key_mask = keys < eos
    k_pos = keys - bos
    kcols, vcols = tl.arange(0, BK), tl.arange(0, BV)
    k = load_rows(k_ptr + hk * dk, keys, key_mask, kv_heads * dk, kcols, dk)
    v = load_rows(v_ptr + hk * dv, keys, key_mask, kv_heads * dv, vcols, dv)
    d_k = tl.zeros([BLOCK_N, BK], dtype=tl.float32)
    d_v = tl.zeros([BLOCK_N, BV], dtype=tl.float32)
    k_last = tl.minimum(k_first + BLOCK_N, eos) - 1
    q_hi = tl.minimum(k_last + window, eos)
    if k_first - bos < sinks:
        q_hi = eos
    for g in range(0, group):
        i_h = hk * group + g
        for q_start in range(k_first, q_hi, BLOCK_M):
            rows = q_start + tl.arange(0, BLOCK_M)
            row_mask = rows < eos
            q = load_rows(q_ptr + i_h * dk, rows, row_mask, heads * dk, kcols, dk)
            do = load_rows(do_ptr + i_h * dv, rows, row_mask, heads * dv, vcols, dv)
            head_rows = rows.to(tl.int64) * heads + i_h
            lse2 = tl.load(lse_ptr + head_rows, mask=row_mask, other=0.0) * 1.4426950408889634
            delta = tl.load(delta_ptr + head_rows, mask=row_mask, other=0.0)
            st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [keys, queries]
            mask = visible_t(k_pos, rows - bos, window, sinks) & row_mask[None, :] & key_mask[:, None]
            pt = tl.where(mask, tl.exp2(st - lse2[None, :]), 0.0)
            d_v += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dst = pt * (dpt - delta[None, :])
            d_k += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    tile = key_mask[:, None]
    k_offs = keys.to(tl.int64)[:, None] * (kv_heads * dk) + hk * dk + kcols[None, :]
    v_offs = keys.to(tl.int64)[:, None] * (kv_heads * dv) + hk * dv + vcols[None, :]
    tl.store(dk_ptr + k_offs, (d_k * scale).to(dk_ptr.dtype.element_ty), mask=tile & (kcols < dk)[None, :])
    tl.store(dv_ptr + v_offs, d_v.to(dv_ptr.dtype.element_ty), mask=tile & (vcols < dv)[None, :])


def sliding_window_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    window: int,
    sinks: int,
    scale: float,
    cu_seqlens: torch.Tensor | None,
    block_m: int = BLOCK_M,
    block_n: int = BLOCK_N,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) in the inputs' dtypes, from the forward's o and lse [B, T, H] (float32)."""
    check_dtype(q)
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    lse = lse.float().contiguous()
    batch, length, heads, dk = q.shape
    kv_heads, dv = k.shape[2], v.shape[-1]
    delta = (do.float() * o.float()).sum(-1).contiguous()  # [B, T, H]
    dq = new_empty(q.shape, dtype=q.dtype, device=q.device)
    dk_ = new_empty(k.shape, dtype=k.dtype, device=k.device)
    dv_ = new_empty(v.shape, dtype=v.dtype, device=v.device)
    common = dict(BK=head_block(dk), BV=head_block(dv), PRECISION=precision(q.dtype), BLOCK_M=block_m,
                  BLOCK_N=block_n, num_warps=num_warps(max(block_m, block_n), dk))
    sizes = (heads, kv_heads, dk, dv, window, sinks, scale, scale * LOG2E)
    rows = ChunkLayout(batch, length, cu_seqlens, block_m, q.device)
    if rows.max_chunks > 0:
        _dq_kernel[(rows.max_chunks, heads)](
            q, k, v, do, lse, delta, dq, rows.bounds, rows.table, rows.n, *sizes, **common
        )
    keys = ChunkLayout(batch, length, cu_seqlens, block_n, q.device)
    if keys.max_chunks > 0:
        _dkdv_kernel[(keys.max_chunks, kv_heads)](
            q, k, v, do, lse, delta, dk_, dv_, keys.bounds, keys.table, keys.n, *sizes, **common
        )
    return dq, dk_, dv_
