"""Sliding-window attention backward in Triton; see `reference.py` for the gradients.

Two kernels that recompute the probabilities from the saved log-sum-exp: dq per (query block,
q head) over the same key blocks as the forward pass, which also computes delta_t =
rowsum(do_t * o_t) for its rows and stores it; then dk and dv per (key block, kv head) over the
queries that see the block (from lookahead rows before it to window - 1 rows after it, or to the
sequence end for blocks that hold sink tokens), summing the G q heads of the group in the
program, so no atomics are needed. As in the forward, only blocks on the window's edges build the
visibility mask.
"""

import torch
import triton
import triton.language as tl

from ..alloc import new_empty
from ..delta_rule.triton_forward import Layout, chunk_of_program, sequence_rows
from ..fitting_blocks import launch_fitting
from .triton_forward import (
    LOG2E,
    check_dtype,
    full_blocks,
    head_block,
    key_ranges,
    load_rows,
    precision,
    visible,
)

# defaults from the H200 sweep in benchmarks/delta_conv_swa.py --sweep (bf16, D=128, w=512 and 4096)
DQ_BLOCKS = (64, 64, 4, 2)  # (BLOCK_M, BLOCK_N, num_warps, num_stages) of the dq kernel
DKDV_BLOCKS = (64, 128, 8, 2)  # of the dk / dv kernel


@triton.jit
def visible_t(k_pos, q_pos, window, sinks, lookahead):
    """[N, M] mask, the transpose of `visible`: key position k_pos is seen by query position q_pos."""
    kp, qp = k_pos[:, None], q_pos[None, :]
    return (kp <= qp + lookahead) & ((qp - kp < window) | (kp < sinks))


@triton.jit
def _dq_block(dq, q, do, lse2, delta, k_ptr, v_ptr, start, q_pos, bos, eos, kv_stride, dk, dv, kcols, vcols,
              window, sinks, lookahead, qk_scale, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
              MASKED: tl.constexpr):
    keys = start + tl.arange(0, BLOCK_N)
    key_mask = keys < eos
    k = load_rows(k_ptr, keys, key_mask, kv_stride * dk, kcols, dk)
    v = load_rows(v_ptr, keys, key_mask, kv_stride * dv, vcols, dv)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.exp2(s - lse2[:, None])
    if MASKED:
        p = tl.where(visible(q_pos, keys - bos, window, sinks, lookahead) & key_mask[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def _dq_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, bounds_ptr, chunk_start_ptr, table_ptr,
    n_seqs, T, heads, kv_heads, dk, dv, window, sinks, lookahead, scale, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, VARLEN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_m, i_h = tl.program_id(0), tl.program_id(1)
    seq, local = chunk_of_program(i_m, table_ptr, T, BLOCK_M, VARLEN)
    if seq >= n_seqs:
        return
    hk = i_h // (heads // kv_heads)
    bos, eos, _ = sequence_rows(seq, bounds_ptr, chunk_start_ptr, T, BLOCK_M, VARLEN)
    q_first = bos + local * BLOCK_M
    rows = q_first + tl.arange(0, BLOCK_M)
    row_mask = rows < eos
    q_pos = rows - bos
    kcols, vcols = tl.arange(0, BK), tl.arange(0, BV)
    q = load_rows(q_ptr + i_h * dk, rows, row_mask, heads * dk, kcols, dk)
    do = load_rows(do_ptr + i_h * dv, rows, row_mask, heads * dv, vcols, dv)
    o = load_rows(o_ptr + i_h * dv, rows, row_mask, heads * dv, vcols, dv)
    head_rows = rows.to(tl.int64) * heads + i_h
    lse2 = tl.load(lse_ptr + head_rows, mask=row_mask, other=0.0) * 1.4426950408889634
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    tl.store(delta_ptr + head_rows, delta, mask=row_mask)
    k_ptr += hk * dk
    v_ptr += hk * dv
    dq = tl.zeros([BLOCK_M, BK], dtype=tl.float32)
    q_last = tl.minimum(q_first + BLOCK_M, eos) - 1
    sink_end, lo, hi = key_ranges(q_first, q_last, bos, eos, window, sinks, lookahead, BLOCK_N)
    mid_lo, mid_hi = full_blocks(q_first, q_last, lo, eos, window, lookahead, BLOCK_N)
    for start in range(bos, sink_end, BLOCK_N):
        dq = _dq_block(dq, q, do, lse2, delta, k_ptr, v_ptr, start, q_pos, bos, eos, kv_heads, dk, dv,
                       kcols, vcols, window, sinks, lookahead, qk_scale, BLOCK_N, PRECISION, True)
    for start in range(lo, mid_lo, BLOCK_N):
        dq = _dq_block(dq, q, do, lse2, delta, k_ptr, v_ptr, start, q_pos, bos, eos, kv_heads, dk, dv,
                       kcols, vcols, window, sinks, lookahead, qk_scale, BLOCK_N, PRECISION, True)
    for start in range(mid_lo, mid_hi, BLOCK_N):
        dq = _dq_block(dq, q, do, lse2, delta, k_ptr, v_ptr, start, q_pos, bos, eos, kv_heads, dk, dv,
                       kcols, vcols, window, sinks, lookahead, qk_scale, BLOCK_N, PRECISION, False)
    for start in range(mid_hi, hi, BLOCK_N):
        dq = _dq_block(dq, q, do, lse2, delta, k_ptr, v_ptr, start, q_pos, bos, eos, kv_heads, dk, dv,
                       kcols, vcols, window, sinks, lookahead, qk_scale, BLOCK_N, PRECISION, True)
    offs = rows.to(tl.int64)[:, None] * (heads * dk) + i_h * dk + kcols[None, :]
    tl.store(dq_ptr + offs, (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_mask[:, None] & (kcols < dk)[None, :])


@triton.jit
def _dkdv_block(d_k, d_v, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, q_start, i_h, k_pos, key_mask, bos, eos,
                heads, dk, dv, kcols, vcols, window, sinks, lookahead, qk_scale,
                BLOCK_M: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr):
    rows = q_start + tl.arange(0, BLOCK_M)
    row_mask = rows < eos
    q = load_rows(q_ptr + i_h * dk, rows, row_mask, heads * dk, kcols, dk)
    do = load_rows(do_ptr + i_h * dv, rows, row_mask, heads * dv, vcols, dv)
    head_rows = rows.to(tl.int64) * heads + i_h
    lse2 = tl.load(lse_ptr + head_rows, mask=row_mask, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + head_rows, mask=row_mask, other=0.0)
    st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [keys, queries]
    if MASKED:
        mask = visible_t(k_pos, rows - bos, window, sinks, lookahead) & row_mask[None, :] & key_mask[:, None]
    else:
        mask = row_mask[None, :]
    pt = tl.where(mask, tl.exp2(st - lse2[None, :]), 0.0)
    d_v += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
    dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    dst = pt * (dpt - delta[None, :])
    d_k += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    return d_k, d_v


@triton.jit
def _dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, bounds_ptr, chunk_start_ptr, table_ptr,
    n_seqs, T, heads, kv_heads, dk, dv, window, sinks, lookahead, scale, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, VARLEN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_n, hk = tl.program_id(0), tl.program_id(1)
    seq, local = chunk_of_program(i_n, table_ptr, T, BLOCK_N, VARLEN)
    if seq >= n_seqs:
        return
    group = heads // kv_heads
    bos, eos, _ = sequence_rows(seq, bounds_ptr, chunk_start_ptr, T, BLOCK_N, VARLEN)
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
    q_lo = tl.maximum(k_first - lookahead, bos)
    q_hi = tl.minimum(k_last + window, eos)
    # query blocks q_start = q_lo + j * BLOCK_M see the whole key block when q_start + lookahead >= k_first +
    # BLOCK_N - 1 (lookahead) and q_start + BLOCK_M - 1 < k_first + window (window); blocks with sink keys are
    # all masked
    ahead = tl.maximum(k_first + BLOCK_N - 1 - lookahead - q_lo, 0)
    mid_lo = tl.minimum(q_lo + ((ahead + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, q_hi)
    mid_hi = tl.minimum(tl.maximum(q_lo + ((k_first + window - q_lo) // BLOCK_M) * BLOCK_M, mid_lo), q_hi)
    if k_first - bos < sinks:
        q_hi = eos
        mid_lo = eos
        mid_hi = eos
    for g in range(0, group):
        i_h = hk * group + g
        for q_start in range(q_lo, mid_lo, BLOCK_M):
            d_k, d_v = _dkdv_block(d_k, d_v, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, q_start, i_h, k_pos, key_mask,
                                   bos, eos, heads, dk, dv, kcols, vcols, window, sinks, lookahead, qk_scale,
                                   BLOCK_M, PRECISION, True)
        for q_start in range(mid_lo, mid_hi, BLOCK_M):
            d_k, d_v = _dkdv_block(d_k, d_v, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, q_start, i_h, k_pos, key_mask,
                                   bos, eos, heads, dk, dv, kcols, vcols, window, sinks, lookahead, qk_scale,
                                   BLOCK_M, PRECISION, False)
        for q_start in range(mid_hi, q_hi, BLOCK_M):
            d_k, d_v = _dkdv_block(d_k, d_v, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, q_start, i_h, k_pos, key_mask,
                                   bos, eos, heads, dk, dv, kcols, vcols, window, sinks, lookahead, qk_scale,
                                   BLOCK_M, PRECISION, True)
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
    dq_blocks: tuple[int, int, int, int] = DQ_BLOCKS,
    dkdv_blocks: tuple[int, int, int, int] = DKDV_BLOCKS,
    *,
    lookahead: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) in the inputs' dtypes, from the forward's o and lse [B, T, H] (float32).

    dq_blocks / dkdv_blocks: (BLOCK_M, BLOCK_N, num_warps, num_stages) of the two kernels; lookahead 0 is causal.
    """
    check_dtype(q)
    q, k, v, do, o = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous(), o.contiguous()
    lse = lse.float().contiguous()
    batch, length, heads, dk = q.shape
    kv_heads, dv = k.shape[2], v.shape[-1]
    delta = new_empty((batch, length, heads), dtype=torch.float32, device=q.device)
    dq = new_empty(q.shape, dtype=q.dtype, device=q.device)
    dk_ = new_empty(k.shape, dtype=k.dtype, device=k.device)
    dv_ = new_empty(v.shape, dtype=v.dtype, device=v.device)
    common = dict(BK=head_block(dk), BV=head_block(dv), PRECISION=precision(q.dtype), VARLEN=cu_seqlens is not None)
    lookahead = min(lookahead, length)  # no key lies further ahead; keeps index sums in int32
    sizes = (heads, kv_heads, dk, dv, window, sinks, lookahead, scale, scale * LOG2E)

    def launcher(kernel, tensors, grid_heads, by_keys):
        """launch(blocks): `kernel` over query blocks (BLOCK_M rows, dq) or key blocks (BLOCK_N keys, dk / dv)."""
        def launch(blocks):
            bm, bn, warps, stages = blocks
            layout = Layout(batch, length, cu_seqlens, bn if by_keys else bm, q.device)
            if layout.max_chunks > 0:
                kernel[(layout.max_chunks, grid_heads)](
                    *tensors, *layout.args(lse), *sizes,
                    BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **common,
                )

        return launch

    case = (common["BK"], common["BV"], q.dtype, q.device)
    launch_fitting(("sliding_window_dq", dq_blocks, *case), dq_blocks,
                   launcher(_dq_kernel, (q, k, v, o, do, lse, delta, dq), heads, by_keys=False))
    launch_fitting(("sliding_window_dkdv", dkdv_blocks, *case), dkdv_blocks,
                   launcher(_dkdv_kernel, (q, k, v, do, lse, delta, dk_, dv_), kv_heads, by_keys=True))
    return dq, dk_, dv_
