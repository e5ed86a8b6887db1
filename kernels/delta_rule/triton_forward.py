"""Chunked delta rule forward in Triton; see `chunked_reference.py` for the math (WY / UT form).

Three kernels over flat tokens (row b * T + t; `ChunkLayout` maps programs to (sequence, chunk)):
1. per (chunk, kv head): the chunk-local log-decay cumsum b, A = beta_i exp(b_i - b_j) k_i.k_j
   (j < i), T = (I + A)^{-1} by forward substitution in float32, W = T (beta gamma K) and
   U~ = T (beta V);
2. per (V tile, sequence x kv head), sequential over the sequence's chunks: states before every
   chunk, U = U~ - W h, h' = gamma_C h + (K exp(b_C - b))^T U, and the final state;
3. per (chunk, V tile, q head): o = scale (gamma (Q h) + ((Q K^T) * exp(b_i - b_j), j <= i) U).
The whole key dim is one tile (K <= 256); intermediates are float32.
"""

import torch
import triton
import triton.language as tl

from ..alloc import new_empty
from ..linear_attention.triton_common import ChunkLayout

CHUNK = 64


@triton.jit
def _tile(ptr, rows, row_mask, row_stride, cols, n_cols):
    offs = rows.to(tl.int64)[:, None] * row_stride + cols[None, :]
    return tl.load(ptr + offs, mask=row_mask[:, None] & (cols < n_cols)[None, :], other=0.0)


@triton.jit
def _prepare_kernel(
    k_ptr, v_ptr, beta_ptr, g_ptr, w_ptr, u_ptr, b_ptr, bounds_ptr, table_ptr,
    n_seqs, kv_heads, dk, dv,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr, PRECISION: tl.constexpr,
):
    i_c, hk = tl.program_id(0), tl.program_id(1)
    seq = tl.load(table_ptr + 2 * i_c)
    if seq >= n_seqs:
        return
    local = tl.load(table_ptr + 2 * i_c + 1)
    bos, eos = tl.load(bounds_ptr + seq), tl.load(bounds_ptr + seq + 1)
    rows = bos + local * C + tl.arange(0, C)
    row_mask = rows < eos
    kcols, vcols = tl.arange(0, BK), tl.arange(0, BV)
    gate = rows.to(tl.int64) * kv_heads + hk
    k = _tile(k_ptr + hk * dk, rows, row_mask, kv_heads * dk, kcols, dk).to(tl.float32)
    beta = tl.load(beta_ptr + gate, mask=row_mask, other=0.0).to(tl.float32)
    if HAS_G:
        b = tl.cumsum(tl.load(g_ptr + gate, mask=row_mask, other=0.0).to(tl.float32), axis=0)
        tl.store(b_ptr + gate, b, mask=row_mask)
    else:
        b = tl.zeros([C], dtype=tl.float32)
    i = tl.arange(0, C)
    below = i[:, None] > i[None, :]
    decay = tl.exp(tl.where(below, b[:, None] - b[None, :], float("-inf")))
    a = beta[:, None] * decay * tl.dot(k, tl.trans(k), input_precision=PRECISION)
    # T = (I + A)^{-1}: row r of T is e_r - sum_{j < r} A_rj T_j, rows filled top to bottom.
    t = tl.where(i[:, None] == i[None, :], 1.0, 0.0)
    for r in range(1, C):
        a_row = tl.sum(tl.where(i[:, None] == r, a, 0.0), axis=0)  # A[r, :], zero from column r on
        t_row = tl.sum(a_row[:, None] * t, axis=0)
        t = tl.where(i[:, None] == r, t - t_row[None, :], t)
    w = tl.dot(t, (beta * tl.exp(b))[:, None] * k, input_precision=PRECISION)
    v = _tile(v_ptr + hk * dv, rows, row_mask, kv_heads * dv, vcols, dv).to(tl.float32)
    u = tl.dot(t, beta[:, None] * v, input_precision=PRECISION)
    tl.store(w_ptr + gate[:, None] * dk + kcols[None, :], w, mask=row_mask[:, None] & (kcols < dk)[None, :])
    tl.store(u_ptr + gate[:, None] * dv + vcols[None, :], u, mask=row_mask[:, None] & (vcols < dv)[None, :])


@triton.jit
def _states_kernel(
    k_ptr, w_ptr, u_ptr, b_ptr, h0_ptr, h_ptr, ht_ptr, bounds_ptr, chunk_start_ptr,
    kv_heads, dk, dv,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr, HAS_H0: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    seq, hk = i_nh // kv_heads, i_nh % kv_heads
    bos, eos = tl.load(bounds_ptr + seq), tl.load(bounds_ptr + seq + 1)
    first = tl.load(chunk_start_ptr + seq)
    kcols = tl.arange(0, BK)
    vcols = i_v * BV + tl.arange(0, BV)
    state_offs = kcols[:, None] * dv + vcols[None, :]
    state_mask = (kcols < dk)[:, None] & (vcols < dv)[None, :]
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        state += tl.load(h0_ptr + i_nh.to(tl.int64) * dk * dv + state_offs, mask=state_mask, other=0.0)
    for c in range(0, tl.cdiv(eos - bos, C)):
        tl.store(h_ptr + ((first + c).to(tl.int64) * kv_heads + hk) * dk * dv + state_offs, state, mask=state_mask)
        start = bos + c * C
        rows = start + tl.arange(0, C)
        row_mask = rows < eos
        w = _tile(w_ptr + hk * dk, rows, row_mask, kv_heads * dk, kcols, dk)
        u = _tile(u_ptr + hk * dv, rows, row_mask, kv_heads * dv, vcols, dv)
        u -= tl.dot(w, state, input_precision=PRECISION)
        offs = (rows.to(tl.int64) * kv_heads + hk)[:, None] * dv + vcols[None, :]
        tl.store(u_ptr + offs, u, mask=row_mask[:, None] & (vcols < dv)[None, :])
        k = _tile(k_ptr + hk * dk, rows, row_mask, kv_heads * dk, kcols, dk).to(tl.float32)
        if HAS_G:
            last = tl.minimum(start + C, eos) - 1
            b = tl.load(b_ptr + rows.to(tl.int64) * kv_heads + hk, mask=row_mask, other=0.0)
            b_last = tl.load(b_ptr + last.to(tl.int64) * kv_heads + hk)
            k = k * tl.exp(b_last - b)[:, None]
            state = state * tl.exp(b_last)
        state += tl.dot(tl.trans(k), u, input_precision=PRECISION)
    tl.store(ht_ptr + i_nh.to(tl.int64) * dk * dv + state_offs, state, mask=state_mask)


@triton.jit
def _output_kernel(
    q_ptr, k_ptr, u_ptr, b_ptr, h_ptr, o_ptr, bounds_ptr, table_ptr,
    n_seqs, heads, kv_heads, dk, dv, scale,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr, PRECISION: tl.constexpr,
):
    i_c, i_v, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq = tl.load(table_ptr + 2 * i_c)
    if seq >= n_seqs:
        return
    local = tl.load(table_ptr + 2 * i_c + 1)
    hk = i_h // (heads // kv_heads)
    bos, eos = tl.load(bounds_ptr + seq), tl.load(bounds_ptr + seq + 1)
    rows = bos + local * C + tl.arange(0, C)
    row_mask = rows < eos
    kcols = tl.arange(0, BK)
    vcols = i_v * BV + tl.arange(0, BV)
    q = _tile(q_ptr + i_h * dk, rows, row_mask, heads * dk, kcols, dk).to(tl.float32)
    k = _tile(k_ptr + hk * dk, rows, row_mask, kv_heads * dk, kcols, dk).to(tl.float32)
    u = _tile(u_ptr + hk * dv, rows, row_mask, kv_heads * dv, vcols, dv)
    state_offs = ((i_c.to(tl.int64) * kv_heads + hk) * dk + kcols[:, None]) * dv + vcols[None, :]
    state = tl.load(h_ptr + state_offs, mask=(kcols < dk)[:, None] & (vcols < dv)[None, :], other=0.0)
    i = tl.arange(0, C)
    causal = i[:, None] >= i[None, :]
    inter = tl.dot(q, state, input_precision=PRECISION)
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if HAS_G:
        b = tl.load(b_ptr + rows.to(tl.int64) * kv_heads + hk, mask=row_mask, other=0.0)
        inter = inter * tl.exp(b)[:, None]
        scores = scores * tl.exp(tl.where(causal, b[:, None] - b[None, :], float("-inf")))
    else:
        scores = tl.where(causal, scores, 0.0)
    o = inter + tl.dot(scores, u, input_precision=PRECISION)
    offs = rows.to(tl.int64)[:, None] * (heads * dv) + i_h * dv + vcols[None, :]
    tl.store(o_ptr + offs, (o * scale).to(o_ptr.dtype.element_ty), mask=row_mask[:, None] & (vcols < dv)[None, :])


def precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for float32 operands: exact for float32 inputs, TF32 for 16-bit inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _dims(dk: int, dv: int) -> tuple[int, int, int]:
    """(BK, BV of the state kernel, BV of the output kernel)."""
    if dk > 256 or dv > 256:
        raise ValueError(f"delta_rule: the Triton kernels support head dims up to 256, got K={dk}, V={dv}")
    bk = max(16, triton.next_power_of_2(dk))
    bv = max(16, min(64 if bk <= 128 else 32, triton.next_power_of_2(dv)))
    return bk, bv, bv


def chunk_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    chunk: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked delta rule: (o [B, T, H, V] in q's dtype, final state [N, Hkv, K, V] float32)."""
    if q.dtype == torch.float64:
        raise ValueError("delta_rule: the Triton kernels take float32/float16/bfloat16, got float64")
    q, k, v, beta = q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous()
    g = None if g is None else g.contiguous()
    batch, length, heads, dk = q.shape
    kv_heads, dv = k.shape[2], v.shape[-1]
    bk, bv, bv_out = _dims(dk, dv)
    prec = precision(q.dtype)
    layout = ChunkLayout(batch, length, cu_seqlens, chunk, q.device)
    rows = batch * length
    w = new_empty((rows, kv_heads, dk), dtype=torch.float32, device=q.device)
    u = new_empty((rows, kv_heads, dv), dtype=torch.float32, device=q.device)
    b = new_empty((rows, kv_heads), dtype=torch.float32, device=q.device) if g is not None else w
    h = new_empty((layout.max_chunks, kv_heads, dk, dv), dtype=torch.float32, device=q.device)
    ht = new_empty((layout.n, kv_heads, dk, dv), dtype=torch.float32, device=q.device)
    o = new_empty((batch, length, heads, dv), dtype=q.dtype, device=q.device)
    has_g, has_h0 = g is not None, initial_state is not None
    if layout.max_chunks > 0:
        _prepare_kernel[(layout.max_chunks, kv_heads)](
            k, v, beta, g if has_g else beta, w, u, b, layout.bounds, layout.table, layout.n, kv_heads, dk, dv,
            C=chunk, BK=bk, BV=max(16, triton.next_power_of_2(dv)), HAS_G=has_g, PRECISION=prec,
            num_warps=8 if bk >= 128 else 4,
        )
    _states_kernel[(triton.cdiv(dv, bv), layout.n * kv_heads)](
        k, w, u, b, initial_state.contiguous() if has_h0 else ht, h, ht, layout.bounds, layout.chunk_start,
        kv_heads, dk, dv, C=chunk, BK=bk, BV=bv, HAS_G=has_g, HAS_H0=has_h0, PRECISION=prec,
        num_warps=8 if bk >= 128 else 4,
    )
    if layout.max_chunks > 0:
        _output_kernel[(layout.max_chunks, triton.cdiv(dv, bv_out), heads)](
            q, k, u, b, h, o, layout.bounds, layout.table, layout.n, heads, kv_heads, dk, dv, scale,
            C=chunk, BK=bk, BV=bv_out, HAS_G=has_g, PRECISION=prec,
        )
    return o, ht
