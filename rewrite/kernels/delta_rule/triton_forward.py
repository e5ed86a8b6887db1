"""Chunked delta rule forward in Triton; see `chunked_reference.py` for the math (WY / UT form).

Three kernels over flat tokens (row b * T + t; `Layout` maps programs to (sequence, chunk), with
no index tables for dense batches):
1. per (chunk, kv head): the chunk-local log-decay cumsum b, A = beta_i exp(b_i - b_j) k_i.k_j
   (j < i), T = (I + A)^{-1} (`unit_inverse`: blocked, on the tensor cores), W = T (beta gamma K)
   and U~ = T (beta V);
2. per (V tile, sequence x kv head), sequential over the sequence's chunks: states before every
   chunk, U = U~ - W h, h' = gamma_C h + (K exp(b_C - b))^T U, and the final state. V columns
   of the state are independent, so narrow V tiles give the sequential pass more programs;
3. per (chunk, V tile, q head): o = scale (gamma (Q h) + ((Q K^T) * exp(b_i - b_j), j <= i) U).
The whole key dim is one tile (K <= 256); intermediates are float32.

Never feed `tl.trans` of a `tl.dot` result to another `tl.dot` (triton 3.4-3.7.0 miscompiles it
on Hopper); transposed products are computed directly.
"""

import torch
import triton
import triton.language as tl

from rewrite.kernels.launch_math import cdiv, next_power_of_2

from ..alloc import new_empty
from .api import MAX_CHUNKED_KEY_DIM

CHUNK = 64
SUB = 16  # diagonal block of the blocked inverse
# Sequential state pass, read at every launch: "v2" (default) runs U = U~ - W h and h' = gamma_C h + Kd^T U in
# the loop (two dependent products per chunk); "light" first forms, for every chunk in parallel, N = -Kd^T W
# [K, K] and R = Kd^T U~ (`_transition_kernel`), so each sequential step is h' = N h + (gamma_C h + R): one
# product, its operands independent of h (R prefetched one step ahead from a tile-major buffer, N pipelined);
# U = U~ - W h then runs in parallel (`_fix_u_kernel`).
STATE_PASS = "v2"
# "light" scan launch shape: (warps, stages); the V tile is `state_block`'s
LIGHT_SCAN = (8, 2)  # sm_90 compile: 56 registers, 144 KiB shared (N double-buffered)


class Layout:
    """Sequences and chunks of a dense batch (no tables: chunk i is chunk i % NT of sequence i // NT)
    or of packed sequences (tables: bounds [N + 1], first chunk per sequence [N + 1], (seq, chunk) per program)."""

    def __init__(self, batch: int, length: int, cu_seqlens: torch.Tensor | None, chunk: int, device):
        self.chunk, self.length, self.varlen = chunk, length, cu_seqlens is not None
        if cu_seqlens is None:
            self.n, self.max_chunks = batch, batch * cdiv(length, chunk)
            self.tables = None
            return
        bounds = cu_seqlens.to(device=device, dtype=torch.int32)
        self.n = bounds.numel() - 1
        self.max_chunks = cdiv(length, chunk) + self.n  # an upper bound, no host sync
        counts = (bounds[1:] - bounds[:-1] + chunk - 1) // chunk
        chunk_start = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
        ids = torch.arange(self.max_chunks, dtype=torch.int32, device=device)
        seq = torch.searchsorted(chunk_start[1:], ids, right=True).to(torch.int32)
        local = ids - chunk_start[seq.clamp(max=self.n - 1).long()]
        self.tables = (bounds, chunk_start, torch.stack([seq, local], 1).contiguous())

    def args(self, dummy: torch.Tensor) -> tuple:
        """(bounds, chunk_start, table, n, T) kernel arguments; `dummy` stands in for absent tables."""
        bounds, chunk_start, table = self.tables or (dummy, dummy, dummy)
        return bounds, chunk_start, table, self.n, self.length


@triton.jit
def chunk_of_program(i_c, table_ptr, T, C: tl.constexpr, VARLEN: tl.constexpr):
    """(sequence, chunk within the sequence) of flat chunk i_c; sequence >= N: no chunk there."""
    if VARLEN:
        seq = tl.load(table_ptr + 2 * i_c)
        local = tl.load(table_ptr + 2 * i_c + 1)
    else:
        n_chunks = tl.cdiv(T, C)
        seq = i_c // n_chunks
        local = i_c % n_chunks
    return seq, local


@triton.jit
def sequence_rows(seq, bounds_ptr, chunk_start_ptr, T, C: tl.constexpr, VARLEN: tl.constexpr):
    """(first row, end row, first flat chunk) of sequence `seq`."""
    if VARLEN:
        bos = tl.load(bounds_ptr + seq)
        eos = tl.load(bounds_ptr + seq + 1)
        first = tl.load(chunk_start_ptr + seq)
    else:
        bos = seq * T
        eos = bos + T
        first = seq * tl.cdiv(T, C)
    return bos, eos, first


@triton.jit
def tile(ptr, rows, row_mask, row_stride, cols, n_cols):
    offs = rows.to(tl.int64)[:, None] * row_stride + cols[None, :]
    return tl.load(ptr + offs, mask=row_mask[:, None] & (cols < n_cols)[None, :], other=0.0)


@triton.jit
def chunk_gates(beta_ptr, g_ptr, rows, row_mask, hk, kv_heads, C: tl.constexpr, HAS_G: tl.constexpr):
    """(beta [C], in-chunk inclusive cumsum b [C] of the log-decay, float32; zero past the sequence)."""
    gate = rows.to(tl.int64) * kv_heads + hk
    beta = tl.load(beta_ptr + gate, mask=row_mask, other=0.0).to(tl.float32)
    g = tl.zeros([C], dtype=tl.float32)
    if HAS_G:
        g = tl.load(g_ptr + gate, mask=row_mask, other=0.0).to(tl.float32)
    return beta, tl.cumsum(g, axis=0)


@triton.jit
def unit_inverse(a, C: tl.constexpr, SB: tl.constexpr, LOWER: tl.constexpr, PRECISION: tl.constexpr):
    """(I + a)^{-1} for a strictly lower (LOWER) or strictly upper [C, C] float32 matrix.

    Blocked: with D the SB x SB diagonal blocks of I + a and N the rest, I + a = D (I + X),
    X = D^{-1} N; X is strictly block-triangular with C / SB <= 4 blocks, so X^4 = 0 and
    (I + a)^{-1} = (I - X)(I + X^2) D^{-1}. D^{-1} comes from substitution over the SB rows of
    all diagonal blocks at once (SB - 1 steps, each one [C, C] product on the tensor cores).
    """
    tl.static_assert(C <= 4 * SB)
    i = tl.arange(0, C)
    eye = tl.where(i[:, None] == i[None, :], 1.0, 0.0)
    same = (i[:, None] // SB) == (i[None, :] // SB)
    inner = tl.where(same, a, 0.0)
    t = eye
    for s in tl.static_range(1, SB):
        if LOWER:
            sel = (i % SB) == s
        else:
            sel = (i % SB) == (SB - 1 - s)
        # rows r in sel: T_r = e_r - sum_j a_rj T_j over rows j already final (same block, before r)
        part = tl.dot(tl.where(sel[:, None], inner, 0.0), t, input_precision=PRECISION)
        t = tl.where(sel[:, None], t - part, t)
    if C > SB:
        x = tl.dot(t, tl.where(same, 0.0, a), input_precision=PRECISION)
        x2 = tl.dot(x, x, input_precision=PRECISION)
        t = tl.dot(tl.dot(eye - x, eye + x2, input_precision=PRECISION), t, input_precision=PRECISION)
    return t


@triton.jit
def _prepare_kernel(
    k_ptr, v_ptr, beta_ptr, g_ptr, w_ptr, u_ptr, b_ptr, t_ptr, bounds_ptr, chunk_start_ptr, table_ptr,
    n_seqs, T, kv_heads, dk, dv,
    C: tl.constexpr, SB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr,
    VARLEN: tl.constexpr, PRECISION: tl.constexpr, STORE_T: tl.constexpr = False,
):
    i_c, hk = tl.program_id(0), tl.program_id(1)
    seq, local = chunk_of_program(i_c, table_ptr, T, C, VARLEN)
    if seq >= n_seqs:
        return
    bos, eos, _ = sequence_rows(seq, bounds_ptr, chunk_start_ptr, T, C, VARLEN)
    rows = bos + local * C + tl.arange(0, C)
    row_mask = rows < eos
    kcols = tl.arange(0, BK)
    gate = rows.to(tl.int64) * kv_heads + hk
    k = tile(k_ptr + hk * dk, rows, row_mask, kv_heads * dk, kcols, dk).to(tl.float32)
    beta, b = chunk_gates(beta_ptr, g_ptr, rows, row_mask, hk, kv_heads, C, HAS_G)
    if HAS_G:
        tl.store(b_ptr + gate, b, mask=row_mask)
    i = tl.arange(0, C)
    decay = tl.exp(tl.where(i[:, None] > i[None, :], b[:, None] - b[None, :], float("-inf")))
    a = beta[:, None] * decay * tl.dot(k, tl.trans(k), input_precision=PRECISION)
    t = unit_inverse(a, C, SB, True, PRECISION)
    if STORE_T:  # T per (flat chunk, kv head) for the backward's direct WY gradient (v3)
        tl.store(t_ptr + (i_c.to(tl.int64) * kv_heads + hk) * C * C + i[:, None] * C + i[None, :], t)
    w = tl.dot(t, (beta * tl.exp(b))[:, None] * k, input_precision=PRECISION)
    tl.store(w_ptr + gate[:, None] * dk + kcols[None, :], w, mask=row_mask[:, None] & (kcols < dk)[None, :])
    for v0 in range(0, dv, BV):
        vcols = v0 + tl.arange(0, BV)
        v = tile(v_ptr + hk * dv, rows, row_mask, kv_heads * dv, vcols, dv).to(tl.float32)
        u = tl.dot(t, beta[:, None] * v, input_precision=PRECISION)
        tl.store(u_ptr + gate[:, None] * dv + vcols[None, :], u, mask=row_mask[:, None] & (vcols < dv)[None, :])


@triton.jit
def _states_kernel(
    k_ptr, w_ptr, u_ptr, b_ptr, h0_ptr, h_ptr, ht_ptr, bounds_ptr, chunk_start_ptr,
    T, kv_heads, dk, dv,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr, HAS_H0: tl.constexpr,
    VARLEN: tl.constexpr, PRECISION: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    seq, hk = i_nh // kv_heads, i_nh % kv_heads
    bos, eos, first = sequence_rows(seq, bounds_ptr, chunk_start_ptr, T, C, VARLEN)
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
        w = tile(w_ptr + hk * dk, rows, row_mask, kv_heads * dk, kcols, dk)
        u = tile(u_ptr + hk * dv, rows, row_mask, kv_heads * dv, vcols, dv)
        k = tile(k_ptr + hk * dk, rows, row_mask, kv_heads * dk, kcols, dk).to(tl.float32)
        u -= tl.dot(w, state, input_precision=PRECISION)
        offs = (rows.to(tl.int64) * kv_heads + hk)[:, None] * dv + vcols[None, :]
        tl.store(u_ptr + offs, u, mask=row_mask[:, None] & (vcols < dv)[None, :])
        if HAS_G:
            last = tl.minimum(start + C, eos) - 1
            b = tl.load(b_ptr + rows.to(tl.int64) * kv_heads + hk, mask=row_mask, other=0.0)
            b_last = tl.load(b_ptr + last.to(tl.int64) * kv_heads + hk)
            k = k * tl.exp(b_last - b)[:, None]
            state = state * tl.exp(b_last)
        state += tl.dot(tl.trans(k), u, input_precision=PRECISION)
    tl.store(ht_ptr + i_nh.to(tl.int64) * dk * dv + state_offs, state, mask=state_mask)


@triton.jit
def tile_major(ptr, hk, kcols, vcols, flat_chunk, n_chunks_all, n_vtiles, BK: tl.constexpr, BV: tl.constexpr):
    """Pointers of a [BK, BV'] block in a tile-major [Hkv, V tiles, chunks, BK, BV] buffer (V tile = vcols // BV):
    one sequential program's (kv head, V tile) reads its chunks' [BK, BV] blocks one after another."""
    block = (hk * n_vtiles + vcols // BV).to(tl.int64) * n_chunks_all + flat_chunk
    return ptr + (block[None, :] * BK + kcols[:, None]) * BV + (vcols % BV)[None, :]


@triton.jit
def _transition_kernel(
    k_ptr, beta_ptr, g_ptr, w_ptr, u_ptr, n_ptr, nt_ptr, r_ptr, a_ptr, bounds_ptr, chunk_start_ptr, table_ptr,
    n_seqs, T, kv_heads, dk, dv, n_chunks_all,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr, VARLEN: tl.constexpr,
    PRECISION: tl.constexpr, STORE_N: tl.constexpr, STORE_NT: tl.constexpr, STORE_R: tl.constexpr,
):
    """Everything of one chunk's state step that does not depend on the state ("light" passes), per (chunk, kv head):
    N = -Kd^T W and / or N^T = -W^T Kd ([BK, BK], zero-padded), gamma_C = exp(b_C) and R = Kd^T U~ (tile-major
    with the scan's V tile BV, zero-padded), where Kd = diag(exp(b_C - b)) K. Then h' = gamma_C h + N h + R."""
    i_c, hk = tl.program_id(0), tl.program_id(1)
    seq, local = chunk_of_program(i_c, table_ptr, T, C, VARLEN)
    if seq >= n_seqs:
        return
    bos, eos, _ = sequence_rows(seq, bounds_ptr, chunk_start_ptr, T, C, VARLEN)
    rows = bos + local * C + tl.arange(0, C)
    row_mask = rows < eos
    kcols = tl.arange(0, BK)
    k = tile(k_ptr + hk * dk, rows, row_mask, kv_heads * dk, kcols, dk).to(tl.float32)
    _, b = chunk_gates(beta_ptr, g_ptr, rows, row_mask, hk, kv_heads, C, HAS_G)
    i = tl.arange(0, C)
    b_last = tl.sum(tl.where(i == C - 1, b, 0.0), axis=0)  # padded rows past the sequence end carry b_last too
    kd = k * tl.exp(b_last - b)[:, None]
    w = tile(w_ptr + hk * dk, rows, row_mask, kv_heads * dk, kcols, dk)
    block = (i_c.to(tl.int64) * kv_heads + hk) * BK * BK + kcols[:, None] * BK + kcols[None, :]
    if STORE_N:
        tl.store(n_ptr + block, -tl.dot(tl.trans(kd), w, input_precision=PRECISION))
    if STORE_NT:
        tl.store(nt_ptr + block, -tl.dot(tl.trans(w), kd, input_precision=PRECISION))
    if HAS_G:
        tl.store(a_ptr + i_c.to(tl.int64) * kv_heads + hk, tl.exp(b_last))
    if STORE_R:
        n_vtiles = tl.cdiv(dv, BV)
        for i_v in range(0, n_vtiles):
            vcols = i_v * BV + tl.arange(0, BV)
            u = tile(u_ptr + hk * dv, rows, row_mask, kv_heads * dv, vcols, dv)
            r = tl.dot(tl.trans(kd), u, input_precision=PRECISION)
            tl.store(tile_major(r_ptr, hk, kcols, vcols, i_c, n_chunks_all, n_vtiles, BK, BV), r)


@triton.jit
def _light_scan_kernel(
    n_ptr, r_ptr, a_ptr, h0_ptr, h_ptr, ht_ptr, bounds_ptr, chunk_start_ptr,
    T, kv_heads, dk, dv, n_chunks_all,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr, HAS_H0: tl.constexpr,
    REVERSE: tl.constexpr, VARLEN: tl.constexpr, PRECISION: tl.constexpr, STORE_LAST: tl.constexpr = True,
):
    """Per (V tile, sequence x kv head), over the sequence's chunks in order (or reversed): h[c] = S, then
    S = N_c S + (gamma_c S + R_c): one [BK, BK] x [BK, BV] product per step. N, gamma, R come from
    `_transition_kernel` (forward states) or N^T and the backward's own terms (state gradients); R and gamma are
    loaded one step ahead, N is left to the software pipeliner (a contiguous [BK, BK] block per step).
    Without HAS_H0 the scan starts from zeros; without STORE_LAST the last value is not stored (`ht_ptr` unused)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    seq, hk = i_nh // kv_heads, i_nh % kv_heads
    bos, eos, first = sequence_rows(seq, bounds_ptr, chunk_start_ptr, T, C, VARLEN)
    kcols = tl.arange(0, BK)
    vcols = i_v * BV + tl.arange(0, BV)
    state_offs = kcols[:, None] * dv + vcols[None, :]
    state_mask = (kcols < dk)[:, None] & (vcols < dv)[None, :]
    local_offs = kcols[:, None] * BV + tl.arange(0, BV)[None, :]
    mat = kcols[:, None] * BK + kcols[None, :]
    r_base = (hk * tl.cdiv(dv, BV) + i_v).to(tl.int64) * n_chunks_all + first
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        state += tl.load(h0_ptr + i_nh.to(tl.int64) * dk * dv + state_offs, mask=state_mask, other=0.0)
    n_chunks = tl.cdiv(eos - bos, C)
    if REVERSE:
        c = n_chunks - 1
        step = -1
    else:
        c = n_chunks * 0
        step = 1
    # masks as integer comparisons (0 or 1 chunks left to read): the interpreter rejects scalar-bool masks
    left = tl.minimum(n_chunks, 1)
    term = tl.load(r_ptr + (r_base + c) * (BK * BV) + local_offs, mask=local_offs < left * (BK * BV), other=0.0)
    decay = tl.full([BK], 1.0, dtype=tl.float32)
    if HAS_G:
        decay = tl.load(a_ptr + (first + c).to(tl.int64) * kv_heads + hk + kcols * 0, mask=kcols < left * BK,
                        other=0.0)
    for ii in range(0, n_chunks):
        nxt = c + step
        left = tl.minimum(tl.maximum(n_chunks - 1 - ii, 0), 1)
        next_term = tl.load(r_ptr + (r_base + nxt) * (BK * BV) + local_offs, mask=local_offs < left * (BK * BV),
                            other=0.0)
        next_decay = decay
        if HAS_G:
            next_decay = tl.load(a_ptr + (first + nxt).to(tl.int64) * kv_heads + hk + kcols * 0,
                                 mask=kcols < left * BK, other=0.0)
        tl.store(h_ptr + ((first + c).to(tl.int64) * kv_heads + hk) * dk * dv + state_offs, state, mask=state_mask)
        m = tl.load(n_ptr + ((first + c).to(tl.int64) * kv_heads + hk) * BK * BK + mat)
        state = tl.dot(m, state, acc=state * decay[:, None] + term, input_precision=PRECISION)
        term = next_term
        decay = next_decay
        c = nxt
    if STORE_LAST:
        tl.store(ht_ptr + i_nh.to(tl.int64) * dk * dv + state_offs, state, mask=state_mask)


@triton.jit
def _fix_u_kernel(
    w_ptr, u_ptr, h_ptr, bounds_ptr, chunk_start_ptr, table_ptr, n_seqs, T, kv_heads, dk, dv,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, VARLEN: tl.constexpr, PRECISION: tl.constexpr,
):
    """U = U~ - W h in place, per (chunk, V tile, kv head), after the "light" state scan."""
    i_c, i_v, hk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq, local = chunk_of_program(i_c, table_ptr, T, C, VARLEN)
    if seq >= n_seqs:
        return
    bos, eos, first = sequence_rows(seq, bounds_ptr, chunk_start_ptr, T, C, VARLEN)
    rows = bos + local * C + tl.arange(0, C)
    row_mask = rows < eos
    kcols = tl.arange(0, BK)
    vcols = i_v * BV + tl.arange(0, BV)
    w = tile(w_ptr + hk * dk, rows, row_mask, kv_heads * dk, kcols, dk)
    state_offs = (((first + local).to(tl.int64) * kv_heads + hk) * dk + kcols[:, None]) * dv + vcols[None, :]
    state = tl.load(h_ptr + state_offs, mask=(kcols < dk)[:, None] & (vcols < dv)[None, :], other=0.0)
    offs = (rows.to(tl.int64) * kv_heads + hk)[:, None] * dv + vcols[None, :]
    tile_mask = row_mask[:, None] & (vcols < dv)[None, :]
    u = tl.load(u_ptr + offs, mask=tile_mask, other=0.0)
    tl.store(u_ptr + offs, u - tl.dot(w, state, input_precision=PRECISION), mask=tile_mask)


@triton.jit
def _output_kernel(
    q_ptr, k_ptr, u_ptr, b_ptr, h_ptr, o_ptr, bounds_ptr, chunk_start_ptr, table_ptr,
    n_seqs, T, heads, kv_heads, dk, dv, scale,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr, VARLEN: tl.constexpr,
    PRECISION: tl.constexpr, w_ptr=None, FIX_U: tl.constexpr = False,
):
    """o = scale (gamma (Q h) + ((Q K^T) * Dc) U); with FIX_U, u_ptr holds U~ and U = U~ - W h is formed here
    (the "light" forward: no separate `_fix_u_kernel`, one more product per program)."""
    i_c, i_v, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq, local = chunk_of_program(i_c, table_ptr, T, C, VARLEN)
    if seq >= n_seqs:
        return
    bos, eos, first = sequence_rows(seq, bounds_ptr, chunk_start_ptr, T, C, VARLEN)
    hk = i_h // (heads // kv_heads)
    rows = bos + local * C + tl.arange(0, C)
    row_mask = rows < eos
    kcols = tl.arange(0, BK)
    vcols = i_v * BV + tl.arange(0, BV)
    q = tile(q_ptr + i_h * dk, rows, row_mask, heads * dk, kcols, dk).to(tl.float32)
    k = tile(k_ptr + hk * dk, rows, row_mask, kv_heads * dk, kcols, dk).to(tl.float32)
    u = tile(u_ptr + hk * dv, rows, row_mask, kv_heads * dv, vcols, dv)
    state_offs = (((first + local).to(tl.int64) * kv_heads + hk) * dk + kcols[:, None]) * dv + vcols[None, :]
    state = tl.load(h_ptr + state_offs, mask=(kcols < dk)[:, None] & (vcols < dv)[None, :], other=0.0)
    if FIX_U:
        w = tile(w_ptr + hk * dk, rows, row_mask, kv_heads * dk, kcols, dk)
        u -= tl.dot(w, state, input_precision=PRECISION)
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


def head_block(dk: int, dv: int) -> int:
    """BK: the whole key dim as one tile."""
    if dk > MAX_CHUNKED_KEY_DIM or dv > 256:
        raise ValueError(
            f"delta_rule: the chunked Triton kernels support key head dims up to {MAX_CHUNKED_KEY_DIM} and value head dims "
            f"up to 256, got K={dk}, V={dv} (their [K, K] float32 chunk blocks would not fit a GPU's shared memory); "
            "the CPU reference and the decode step take larger K"
        )
    return max(16, next_power_of_2(dk))


def state_block(sequences: int, dv: int) -> int:
    """V tile of the sequential state passes: narrow enough for ~128 programs (V columns are independent)."""
    bv = max(16, min(64, next_power_of_2(dv)))
    while bv > 16 and sequences * cdiv(dv, bv) < 128:
        bv //= 2
    return bv


def recompute(k, v, beta, g, initial_state, layout: Layout, prec: str, chunk: int, t_out: torch.Tensor | None = None,
              transposed: dict | None = None, fix_u: bool = True):
    """Kernels 1 and 2: (w [rows, Hkv, K], u [rows, Hkv, V] (corrected), b or None, h per chunk, final state).

    Under the "light" state pass with `fix_u` False, u is left uncorrected (U~) for a caller that corrects it.
    With `t_out` ([max_chunks, Hkv, C, C] float32), kernel 1 also stores each chunk's T = (I + A)^{-1} there.
    With `transposed` (a dict, for the backward's "light" state-gradient pass), it receives "nt": N^T = -W^T Kd
    per chunk [max_chunks, Hkv, BK, BK], "a": gamma_C [max_chunks, Hkv] (None without g) and "bv": the V tile.
    """
    state_pass = STATE_PASS
    if state_pass not in ("v2", "light"):
        raise ValueError(f"delta_rule: STATE_PASS must be 'v2' or 'light', got {state_pass!r}")
    batch_rows, kv_heads, dk = k.shape[0] * k.shape[1], k.shape[2], k.shape[-1]
    dv = v.shape[-1]
    bk = head_block(dk, dv)
    w = new_empty((batch_rows, kv_heads, dk), dtype=torch.float32, device=k.device)
    u = new_empty((batch_rows, kv_heads, dv), dtype=torch.float32, device=k.device)
    b = new_empty((batch_rows, kv_heads), dtype=torch.float32, device=k.device) if g is not None else None
    h = new_empty((layout.max_chunks, kv_heads, dk, dv), dtype=torch.float32, device=k.device)
    ht = new_empty((layout.n, kv_heads, dk, dv), dtype=torch.float32, device=k.device)
    bounds, chunk_start, table, n, length = layout.args(w)
    has_g, has_h0 = g is not None, initial_state is not None
    bv_wide = max(16, min(64, next_power_of_2(dv)))
    if layout.max_chunks > 0:
        _prepare_kernel[(layout.max_chunks, kv_heads)](
            k, v, beta, g if has_g else beta, w, u, b if has_g else w, w if t_out is None else t_out,
            bounds, chunk_start, table, n, length, kv_heads, dk, dv,
            C=chunk, SB=min(SUB, chunk), BK=bk, BV=bv_wide, HAS_G=has_g,
            VARLEN=layout.varlen, PRECISION=prec, STORE_T=t_out is not None, num_warps=4,
        )
    bv = state_block(layout.n * kv_heads, dv)
    h0 = initial_state.contiguous() if has_h0 else ht
    light = state_pass == "light"
    if light or transposed is not None:
        mats = dict(device=k.device, dtype=torch.float32)
        n_mat = new_empty((layout.max_chunks, kv_heads, bk, bk), **mats) if light else w
        nt = new_empty((layout.max_chunks, kv_heads, bk, bk), **mats) if transposed is not None else w
        r = new_empty((kv_heads * cdiv(dv, bv), layout.max_chunks, bk, bv), **mats) if light else w
        a = new_empty((layout.max_chunks, kv_heads), **mats) if has_g else None
        if transposed is not None:
            transposed.update(nt=nt, a=a, bv=bv)
        if layout.max_chunks > 0:
            _transition_kernel[(layout.max_chunks, kv_heads)](
                k, beta, g if has_g else beta, w, u, n_mat, nt, r, a if has_g else w, bounds, chunk_start, table,
                n, length, kv_heads, dk, dv, layout.max_chunks, C=chunk, BK=bk, BV=bv, HAS_G=has_g,
                VARLEN=layout.varlen, PRECISION=prec, STORE_N=light, STORE_NT=transposed is not None,
                STORE_R=light, num_warps=8 if bk >= 128 else 4,
            )
    if light:
        warps, stages = LIGHT_SCAN
        _light_scan_kernel[(cdiv(dv, bv), layout.n * kv_heads)](
            n_mat, r, a if has_g else w, h0, h, ht, bounds, chunk_start, length, kv_heads, dk, dv, layout.max_chunks,
            C=chunk, BK=bk, BV=bv, HAS_G=has_g, HAS_H0=has_h0, REVERSE=False, VARLEN=layout.varlen, PRECISION=prec,
            num_warps=warps, num_stages=stages,
        )
        if layout.max_chunks > 0 and fix_u:
            _fix_u_kernel[(layout.max_chunks, cdiv(dv, bv_wide), kv_heads)](
                w, u, h, bounds, chunk_start, table, n, length, kv_heads, dk, dv, C=chunk, BK=bk, BV=bv_wide,
                VARLEN=layout.varlen, PRECISION=prec, num_warps=4,
            )
        return w, u, b, h, ht
    _states_kernel[(cdiv(dv, bv), layout.n * kv_heads)](
        k, w, u, b if has_g else w, h0, h, ht, bounds, chunk_start,
        length, kv_heads, dk, dv, C=chunk, BK=bk, BV=bv, HAS_G=has_g, HAS_H0=has_h0, VARLEN=layout.varlen,
        PRECISION=prec, num_warps=4,
    )
    return w, u, b, h, ht


def transposed_transitions(k, beta, g, w, dv: int, layout: Layout, prec: str, chunk: int) -> dict:
    """For the backward's "light" state-gradient pass when the forward's W is kept (no recompute): one
    `_transition_kernel` launch storing only N^T = -W^T Kd [max_chunks, Hkv, BK, BK] and gamma_C [max_chunks, Hkv]
    (None without g). Returns the dict `recompute(..., transposed=...)` fills: "nt", "a", "bv" (the scan's V tile)."""
    kv_heads, dk = k.shape[2], k.shape[-1]
    bk = head_block(dk, dv)
    bv = state_block(layout.n * kv_heads, dv)
    nt = new_empty((layout.max_chunks, kv_heads, bk, bk), dtype=torch.float32, device=k.device)
    a = new_empty((layout.max_chunks, kv_heads), dtype=torch.float32, device=k.device) if g is not None else None
    if layout.max_chunks > 0:
        bounds, chunk_start, table, n, length = layout.args(w)
        _transition_kernel[(layout.max_chunks, kv_heads)](
            k, beta, beta if g is None else g, w, w, w, nt, w, w if a is None else a, bounds, chunk_start, table,
            n, length, kv_heads, dk, dv, layout.max_chunks, C=chunk, BK=bk, BV=bv, HAS_G=g is not None,
            VARLEN=layout.varlen, PRECISION=prec, STORE_N=False, STORE_NT=True, STORE_R=False,
            num_warps=8 if bk >= 128 else 4,
        )
    return dict(nt=nt, a=a, bv=bv)


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
    save: bool = False,
) -> tuple:
    """Chunked delta rule: (o [B, T, H, V] in q's dtype, final state [N, Hkv, K, V] float32).

    With `save`, also the tuple (w, u, b or None, h, t) that `triton_backward.chunk_backward(..., saved=...)` takes
    instead of recomputing it: float32 W [B*T, Hkv, K], U (corrected) [B*T, Hkv, V], in-chunk log-decay cumsum b
    [B*T, Hkv], states before every chunk h [max_chunks, Hkv, K, V] and T = (I + A)^{-1} [max_chunks, Hkv, C, C].
    """
    if q.dtype == torch.float64:
        raise ValueError("delta_rule: the Triton kernels take float32/float16/bfloat16, got float64")
    q, k, v, beta = q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous()
    g = None if g is None else g.contiguous()
    batch, length, heads, dk = q.shape
    kv_heads, dv = k.shape[2], v.shape[-1]
    prec = precision(q.dtype)
    layout = Layout(batch, length, cu_seqlens, chunk, q.device)
    # "light" state pass: U = U~ - W h formed by the output kernel, unless U is kept for the backward
    fix_in_output = STATE_PASS == "light" and not save
    t = new_empty((layout.max_chunks, kv_heads, chunk, chunk), dtype=torch.float32, device=q.device) if save else None
    w, u, b, h, ht = recompute(k, v, beta, g, initial_state, layout, prec, chunk, t_out=t, fix_u=not fix_in_output)
    o = new_empty((batch, length, heads, dv), dtype=q.dtype, device=q.device)
    if layout.max_chunks > 0:
        bv = max(16, min(64, next_power_of_2(dv)))
        _output_kernel[(layout.max_chunks, cdiv(dv, bv), heads)](
            q, k, u, b if b is not None else u, h, o, *layout.args(u), heads, kv_heads, dk, dv, scale,
            C=chunk, BK=head_block(dk, dv), BV=bv, HAS_G=g is not None, VARLEN=layout.varlen, PRECISION=prec,
            w_ptr=w, FIX_U=fix_in_output,
            num_warps=8 if fix_in_output and head_block(dk, dv) >= 128 else 4,  # FIX_U spills at 4
        )
    if save:
        return o, ht, (w, u, b, h, t)
    return o, ht
