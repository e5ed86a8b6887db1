"""Sliding-window attention forward in Triton (flash-attention style); see `reference.py` for the math.

One program per (query block of BM rows, q head). It walks the key blocks that hold the sink
tokens and then only the key blocks inside the window of its rows (from the first row's window
start to the last row's lookahead, clipped at the sequence end), so work per query is
O(window + lookahead + sinks) and total time is linear in T. Only the blocks on the window's two
edges (and the sink blocks) build the visibility mask; the blocks between them are wholly visible
to every row of the query block and skip it. Softmax runs online in base 2; the row log-sum-exp
is saved for the backward pass. Tokens are addressed flat (row b * T + t); dense batches need no
index tables (`Layout`), packed inputs map programs to (sequence, block) through tables.
"""

import torch
import triton
import triton.language as tl

from rewrite.kernels.launch_math import dot_precision, head_tile

from ..alloc import new_empty
from ..delta_rule.triton_forward import Layout, chunk_of_program, sequence_rows
from ..fitting_blocks import launch_fitting
from ..online_softmax import LOG2E, online_softmax_finish, online_softmax_start, online_softmax_update

# defaults from the H200 sweep in benchmarks/delta_conv_swa.py --sweep (bf16, D=128, w=512 and 4096)
BLOCK_M = 64
BLOCK_N = 64
WARPS = 4
STAGES = 3


@triton.jit
def load_rows(ptr, rows, row_mask, row_stride, cols, n_cols):
    """A [rows, cols] tile; rows are flat tokens of stride `row_stride`, zero outside the masks."""
    offs = rows.to(tl.int64)[:, None] * row_stride + cols[None, :]
    return tl.load(ptr + offs, mask=row_mask[:, None] & (cols < n_cols)[None, :], other=0.0)


@triton.jit
def visible(q_pos, k_pos, window, sinks, lookahead):
    """[M, N] mask: query position q_pos sees key position k_pos (positions local to the sequence)."""
    qp, kp = q_pos[:, None], k_pos[None, :]
    return (kp <= qp + lookahead) & ((qp - kp < window) | (kp < sinks))


@triton.jit
def key_ranges(q_first, q_last, bos, eos, window, sinks, lookahead, BLOCK_N: tl.constexpr):
    """(sink_end, lo, hi): sink key blocks start at bos and stop before sink_end; window blocks run lo..hi.

    lo is q_first's window start rounded down to a block boundary (counted from bos); hi is one past
    q_last's last visible key (q_last + lookahead, clipped at the sequence end eos). Sink blocks
    cover [bos, min(bos + sinks, lo)) in whole blocks, which all end at or before lo.
    """
    lo = bos + (tl.maximum(q_first - window + 1 - bos, 0) // BLOCK_N) * BLOCK_N
    sink_end = tl.minimum(bos + sinks, lo)
    return sink_end, lo, tl.minimum(q_last + lookahead + 1, eos)


@triton.jit
def full_blocks(q_first, q_last, lo, eos, window, lookahead, BLOCK_N: tl.constexpr):
    """(mid_lo, mid_hi): window blocks starting in [mid_lo, mid_hi) are seen whole by rows q_first..q_last.

    A block [s, s + BLOCK_N) is: inside every row's window when s >= q_last - window + 1, and
    within every row's lookahead and the sequence when s + BLOCK_N <= min(q_first + lookahead + 1,
    eos). Blocks from lo up to mid_lo and from mid_hi on need the mask; lo <= mid_lo <= mid_hi <= hi
    always, so the three ranges cover lo..hi.
    """
    full_lo = lo + tl.cdiv(tl.maximum(q_last - window + 1 - lo, 0), BLOCK_N) * BLOCK_N
    ahead_end = lo + ((tl.minimum(q_first + lookahead + 1, eos) - lo) // BLOCK_N) * BLOCK_N
    mid_lo = tl.minimum(full_lo, ahead_end)
    return mid_lo, ahead_end


@triton.jit
def _attend_block(acc, m_i, l_i, q, k_ptr, v_ptr, start, q_pos, bos, eos, kv_stride, dk, dv, kcols, vcols,
                  window, sinks, lookahead, qk_scale, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                  MASKED: tl.constexpr):
    keys = start + tl.arange(0, BLOCK_N)
    key_mask = keys < eos
    k = load_rows(k_ptr, keys, key_mask, kv_stride * dk, kcols, dk)
    v = load_rows(v_ptr, keys, key_mask, kv_stride * dv, vcols, dv)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        mask = visible(q_pos, keys - bos, window, sinks, lookahead) & key_mask[None, :]
        s = tl.where(mask, s, float("-inf"))
    return online_softmax_update(acc, m_i, l_i, s, v, PRECISION)


@triton.jit
def _forward_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, bounds_ptr, chunk_start_ptr, table_ptr,
    n_seqs, T, heads, kv_heads, dk, dv, window, sinks, lookahead, qk_scale,
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
    k_ptr += hk * dk
    v_ptr += hk * dv
    acc, m_i, l_i = online_softmax_start(BLOCK_M, BV)
    q_last = tl.minimum(q_first + BLOCK_M, eos) - 1
    sink_end, lo, hi = key_ranges(q_first, q_last, bos, eos, window, sinks, lookahead, BLOCK_N)
    mid_lo, mid_hi = full_blocks(q_first, q_last, lo, eos, window, lookahead, BLOCK_N)
    for start in range(bos, sink_end, BLOCK_N):
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_ptr, v_ptr, start, q_pos, bos, eos, kv_heads, dk, dv,
                                      kcols, vcols, window, sinks, lookahead, qk_scale, BLOCK_N, PRECISION,
                                      True)
    for start in range(lo, mid_lo, BLOCK_N):
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_ptr, v_ptr, start, q_pos, bos, eos, kv_heads, dk, dv,
                                      kcols, vcols, window, sinks, lookahead, qk_scale, BLOCK_N, PRECISION,
                                      True)
    for start in range(mid_lo, mid_hi, BLOCK_N):
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_ptr, v_ptr, start, q_pos, bos, eos, kv_heads, dk, dv,
                                      kcols, vcols, window, sinks, lookahead, qk_scale, BLOCK_N, PRECISION,
                                      False)
    for start in range(mid_hi, hi, BLOCK_N):
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_ptr, v_ptr, start, q_pos, bos, eos, kv_heads, dk, dv,
                                      kcols, vcols, window, sinks, lookahead, qk_scale, BLOCK_N, PRECISION,
                                      True)
    o, lse2 = online_softmax_finish(acc, m_i, l_i)
    o_offs = rows.to(tl.int64)[:, None] * (heads * dv) + i_h * dv + vcols[None, :]
    tl.store(o_ptr + o_offs, o.to(o_ptr.dtype.element_ty), mask=row_mask[:, None] & (vcols < dv)[None, :])
    lse = lse2 / 1.4426950408889634
    tl.store(lse_ptr + rows.to(tl.int64) * heads + i_h, lse, mask=row_mask)


def precision(dtype: torch.dtype) -> str:
    """tl.dot input precision of sliding_window_attention's kernels."""
    return dot_precision(dtype)


def head_block(dim: int) -> int:
    """Tile width for a head dim of sliding_window_attention's kernels."""
    return head_tile(dim, "sliding_window_attention")


def check_dtype(q: torch.Tensor) -> None:
    if q.dtype == torch.float64:
        raise ValueError("sliding_window_attention: the Triton kernels take float32/float16/bfloat16, got float64")


def sliding_window_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    sinks: int,
    scale: float,
    cu_seqlens: torch.Tensor | None,
    block_m: int = BLOCK_M,
    block_n: int = BLOCK_N,
    warps: int = WARPS,
    stages: int = STAGES,
    *,
    lookahead: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, T, H, V] in q's dtype, lse [B, T, H] float32); lookahead 0 is causal."""
    check_dtype(q)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    batch, length, heads, dk = q.shape
    kv_heads, dv = k.shape[2], v.shape[-1]
    lookahead = min(lookahead, length)  # no key lies further ahead; keeps index sums in int32
    o = new_empty((batch, length, heads, dv), dtype=q.dtype, device=q.device)
    lse = new_empty((batch, length, heads), dtype=torch.float32, device=q.device)
    bk, bv = head_block(dk), head_block(dv)

    def launch(blocks):
        bm, bn, num_warps, num_stages = blocks
        layout = Layout(batch, length, cu_seqlens, bm, q.device)
        if layout.max_chunks > 0:
            _forward_kernel[(layout.max_chunks, heads)](
                q, k, v, o, lse, *layout.args(lse),
                heads, kv_heads, dk, dv, window, sinks, lookahead, scale * LOG2E,
                BLOCK_M=bm, BLOCK_N=bn, BK=bk, BV=bv, VARLEN=layout.varlen,
                PRECISION=precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
            )

    blocks = (block_m, block_n, warps, stages)
    launch_fitting(("sliding_window_forward", blocks, bk, bv, q.dtype, q.device), blocks, launch)
    return o, lse
