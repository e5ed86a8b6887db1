"""Varlen attention forward in Triton (flash-attention style); see `reference.py` for the math.

One program per (query block, sequence, q head). The grid's first axis covers the longest
sequence; blocks past the end of a shorter sequence return at once. A program walks the key blocks
of its own sequence (only those up to its last row when causal), keeping a running max and sum
(online softmax in base 2), and stores o and the row log-sum-exp (natural log) for the backward.
Rows are addressed through strides, so q / k / v may be views (e.g. heads-major transposes).
"""

import torch
import triton
import triton.language as tl

from rewrite.kernels.launch_math import cdiv, dot_precision, head_tile

from ..alloc import new_empty
from ..online_softmax import LOG2E

LN2 = 0.6931471805599453
BLOCK_M = 64
BLOCK_N = 64
WARPS = 4
STAGES = 2


@triton.jit
def load_tile(ptr, rows, row_mask, row_stride, cols, n_cols):
    """A [rows, cols] tile of one head; rows are tokens `row_stride` apart, zero outside the masks."""
    offs = rows.to(tl.int64)[:, None] * row_stride + cols[None, :]
    return tl.load(ptr + offs, mask=row_mask[:, None] & (cols < n_cols)[None, :], other=0.0)


@triton.jit
def _forward_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_ptr,
    q_row, q_head, k_row, k_head, v_row, v_head, total, qk_scale,
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
    kcols = tl.arange(0, BK)
    vcols = tl.arange(0, BV)
    q = load_tile(q_ptr + i_h * q_head, bos + pos_m, row_ok, q_row, kcols, DK)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BV], dtype=tl.float32)
    hi = length
    if CAUSAL:
        hi = tl.minimum(length, first + BLOCK_M)
    for start in range(0, hi, BLOCK_N):
        pos_n = start + tl.arange(0, BLOCK_N)
        col_ok = pos_n < length
        k = load_tile(k_ptr + kv_h * k_head, bos + pos_n, col_ok, k_row, kcols, DK)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        keep = col_ok[None, :]
        if CAUSAL:
            keep = keep & (pos_n[None, :] <= pos_m[:, None])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_tile(v_ptr + kv_h * v_head, bos + pos_n, col_ok, v_row, vcols, DV)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    rows = (bos + pos_m).to(tl.int64)
    o_offs = rows[:, None] * (heads * DV) + i_h * DV + vcols[None, :]
    tl.store(o_ptr + o_offs, o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & (vcols < DV)[None, :])
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
    tl.store(lse_ptr + i_h.to(tl.int64) * total + rows, lse, mask=row_ok)


def precision(dtype: torch.dtype) -> str:
    """tl.dot input precision of varlen_attention's kernels."""
    return dot_precision(dtype)


def head_block(dim: int) -> int:
    """Tile width for a head dim of varlen_attention's kernels."""
    return head_tile(dim, "varlen_attention")


def check_layout(*tensors: torch.Tensor) -> None:
    """The kernels read rows by stride but need each head's features contiguous, in float32/16 or bfloat16."""
    for x in tensors:
        if x.dtype == torch.float64:
            raise ValueError("varlen_attention: the Triton kernels take float32/float16/bfloat16, got float64")


def rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x, copied only if its last dim is not contiguous (the kernels read rows by stride)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def varlen_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool,
    scale: float,
    block_m: int = BLOCK_M,
    block_n: int = BLOCK_N,
    warps: int = WARPS,
    stages: int = STAGES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [T, H, Dv] in q's dtype, lse [H, T] float32)."""
    check_layout(q)
    q, k, v = rows_contiguous(q), rows_contiguous(k), rows_contiguous(v)
    total, heads, dk = q.shape
    kv_heads, dv = k.shape[1], v.shape[-1]
    o = new_empty((total, heads, dv), dtype=q.dtype, device=q.device)
    lse = new_empty((heads, total), dtype=torch.float32, device=q.device)
    sequences = cu_seqlens.numel() - 1
    if max_seqlen > 0 and total > 0:
        grid = (cdiv(max_seqlen, block_m), sequences, heads)
        _forward_kernel[grid](
            q, k, v, o, lse, cu_seqlens,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), total, scale * LOG2E,
            GROUP=heads // kv_heads, DK=dk, DV=dv, BK=head_block(dk), BV=head_block(dv), CAUSAL=causal,
            BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=precision(q.dtype), num_warps=warps, num_stages=stages,
        )
    return o, lse
