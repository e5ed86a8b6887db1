"""Varlen attention backward in Triton: one kernel for dk / dv, one for dq, no atomics.

With P = softmax(scale * q k^T) recomputed from the saved lse, dv = P^T do, dP = do v^T,
dS = P * (dP - delta) with delta = rowsum(do * o), dq = scale * dS k and dk = scale * dS^T q.
The dk / dv program owns one key block of one kv head and visits every query block of its
sequence for each q head of its group (only blocks at or after the key block when causal); the
dq program owns one query block of one q head and visits its key blocks as the forward does.
"""

import torch
import triton
import triton.language as tl

from rewrite.kernels.launch_math import cdiv

from ..alloc import new_empty
from .triton_forward import LOG2E, check_layout, head_block, load_tile, precision, rows_contiguous

BLOCK_M = 64
BLOCK_N = 64
WARPS = 4
STAGES = 2


@triton.jit
def _probabilities(q, k, lse, pos_m, pos_n, row_ok, col_ok, qk_scale, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """P [M, N] = exp(scale * q k^T - lse), zero where a key is hidden or a row / column is outside the sequence."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    keep = row_ok[:, None] & col_ok[None, :]
    if CAUSAL:
        keep = keep & (pos_n[None, :] <= pos_m[:, None])
    return tl.where(keep, tl.exp2(s - lse[:, None] * 1.4426950408889634), 0.0)


@triton.jit
def _dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_ptr,
    q_row, q_head, k_row, k_head, v_row, v_head, do_row, do_head, total, scale, qk_scale,
    GROUP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    i_blk, i_n, kv_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kv_heads = tl.num_programs(2)
    bos = tl.load(cu_ptr + i_n).to(tl.int32)
    length = tl.load(cu_ptr + i_n + 1).to(tl.int32) - bos
    first = i_blk * BLOCK_N
    if first >= length:
        return
    pos_n = first + tl.arange(0, BLOCK_N)
    col_ok = pos_n < length
    kcols = tl.arange(0, BK)
    vcols = tl.arange(0, BV)
    k = load_tile(k_ptr + kv_h * k_head, bos + pos_n, col_ok, k_row, kcols, DK)
    v = load_tile(v_ptr + kv_h * v_head, bos + pos_n, col_ok, v_row, vcols, DV)
    dk = tl.zeros([BLOCK_N, BK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BV], dtype=tl.float32)
    lo = 0
    if CAUSAL:
        lo = (first // BLOCK_M) * BLOCK_M
    for g in range(GROUP):
        h = kv_h * GROUP + g
        for start in range(lo, length, BLOCK_M):
            pos_m = start + tl.arange(0, BLOCK_M)
            row_ok = pos_m < length
            rows = (bos + pos_m).to(tl.int64)
            q = load_tile(q_ptr + h * q_head, bos + pos_m, row_ok, q_row, kcols, DK)
            do = load_tile(do_ptr + h * do_head, bos + pos_m, row_ok, do_row, vcols, DV)
            lse = tl.load(lse_ptr + h.to(tl.int64) * total + rows, mask=row_ok, other=0.0)
            delta = tl.load(delta_ptr + h.to(tl.int64) * total + rows, mask=row_ok, other=0.0)
            p = _probabilities(q, k, lse, pos_m, pos_n, row_ok, col_ok, qk_scale, CAUSAL, PRECISION)
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
    rows = (bos + pos_n).to(tl.int64)
    dk_offs = rows[:, None] * (kv_heads * DK) + kv_h * DK + kcols[None, :]
    dv_offs = rows[:, None] * (kv_heads * DV) + kv_h * DV + vcols[None, :]
    tl.store(dk_ptr + dk_offs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=col_ok[:, None] & (kcols < DK)[None, :])
    tl.store(dv_ptr + dv_offs, dv.to(dv_ptr.dtype.element_ty), mask=col_ok[:, None] & (vcols < DV)[None, :])


@triton.jit
def _dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cu_ptr,
    q_row, q_head, k_row, k_head, v_row, v_head, do_row, do_head, total, scale, qk_scale,
    GROUP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    i_m, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    heads = tl.num_programs(2)
    bos = tl.load(cu_ptr + i_n).to(tl.int32)
    length = tl.load(cu_ptr + i_n + 1).to(tl.int32) - bos
    first = i_m * BLOCK_M
    if first >= length:
        return
    kv_h = i_h // GROUP
    pos_m = first + tl.arange(0, BLOCK_M)
    row_ok = pos_m < length
    rows = (bos + pos_m).to(tl.int64)
    kcols = tl.arange(0, BK)
    vcols = tl.arange(0, BV)
    q = load_tile(q_ptr + i_h * q_head, bos + pos_m, row_ok, q_row, kcols, DK)
    do = load_tile(do_ptr + i_h * do_head, bos + pos_m, row_ok, do_row, vcols, DV)
    lse = tl.load(lse_ptr + i_h.to(tl.int64) * total + rows, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + i_h.to(tl.int64) * total + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BK], dtype=tl.float32)
    hi = length
    if CAUSAL:
        hi = tl.minimum(length, first + BLOCK_M)
    for start in range(0, hi, BLOCK_N):
        pos_n = start + tl.arange(0, BLOCK_N)
        col_ok = pos_n < length
        k = load_tile(k_ptr + kv_h * k_head, bos + pos_n, col_ok, k_row, kcols, DK)
        v = load_tile(v_ptr + kv_h * v_head, bos + pos_n, col_ok, v_row, vcols, DV)
        p = _probabilities(q, k, lse, pos_m, pos_n, row_ok, col_ok, qk_scale, CAUSAL, PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dq_offs = rows[:, None] * (heads * DK) + i_h * DK + kcols[None, :]
    tl.store(dq_ptr + dq_offs, (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None] & (kcols < DK)[None, :])


def varlen_attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool,
    scale: float,
    block_m: int = BLOCK_M,
    block_n: int = BLOCK_N,
    warps: int = WARPS,
    stages: int = STAGES,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the inputs' dtypes."""
    check_layout(q)
    q, k, v, do = (rows_contiguous(x) for x in (q, k, v, do))
    total, heads, dk_dim = q.shape
    kv_heads, dv_dim = k.shape[1], v.shape[-1]
    delta = (do.float() * o.float()).sum(-1).transpose(0, 1).contiguous()  # [H, T]
    lse = lse.float().contiguous()
    dq = new_empty(tuple(q.shape), dtype=q.dtype, device=q.device)
    dk = new_empty(tuple(k.shape), dtype=k.dtype, device=q.device)
    dv = new_empty(tuple(v.shape), dtype=v.dtype, device=q.device)
    sequences = cu_seqlens.numel() - 1
    if max_seqlen == 0 or total == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    common = (
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        total, scale, scale * LOG2E,
    )
    meta = dict(
        GROUP=heads // kv_heads, DK=dk_dim, DV=dv_dim, BK=head_block(dk_dim), BV=head_block(dv_dim), CAUSAL=causal,
        BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=precision(q.dtype), num_warps=warps, num_stages=stages,
    )
    _dkdv_kernel[(cdiv(max_seqlen, block_n), sequences, kv_heads)](
        q, k, v, do, lse, delta, dk, dv, cu_seqlens, *common, **meta
    )
    _dq_kernel[(cdiv(max_seqlen, block_m), sequences, heads)](
        q, k, v, do, lse, delta, dq, cu_seqlens, *common, **meta
    )
    return dq, dk, dv
