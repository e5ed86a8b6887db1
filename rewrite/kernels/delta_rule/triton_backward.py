"""Chunked delta rule backward in Triton (WY / UT form); the forward's notation (`chunked_reference.py`).

Per chunk, with h the state before it, b the in-chunk log-decay cumsum, gamma = exp(b), X = diag(beta
gamma) K, Y = diag(beta) V, T = (I + A)^{-1}, W = T X, U = T Y - W h, Kd = diag(exp(b_C - b)) K:

    o_g = scale (diag(gamma) Q_g h + (Q_g K^T * Dc) U)        Dc_ij = exp(b_i - b_j), j <= i
    h'  = gamma_C h + Kd^T U

Given dO and dh' (the gradient of the state after the chunk):
    dU  = scale sum_g (Q_g K^T * Dc)^T dO_g + Kd dh'
    dh  = gamma_C dh' + scale sum_g (diag(gamma) Q_g)^T dO_g - W^T dU
    dQ_g = scale (diag(gamma) dO_g h^T + (dO_g U^T * Dc) K)
    dW = -dU h^T,  dT = dW X^T + dU Y^T,  dX = T^T dW,  dY = T^T dU,  dA = -T^T dT T^T (strictly lower)
and the chain through A_ij = beta_i exp(b_i - b_j) k_i.k_j, X, Y, Kd and gamma_C to k, v, beta and b;
dg is the in-chunk reverse cumsum of db.

Kernels (after recomputing W, U, b and the chunk states with the forward's kernels 1-2, unless the forward kept them):
1. `_du_local_kernel` per (chunk, V tile, kv head): scale sum_g (Q_g K^T * Dc)^T dO_g;
2. `_dstates_kernel` per (V tile, sequence x kv head), reverse over chunks: dh' of every chunk,
   dU (in place of 1's output) and d initial state;
3. `_dqk_kernel` per (chunk, kv head), looping over its q heads: dq, the o-part of dk and of db;
4. `_dwy_kernel` per (chunk, kv head): the WY part; dk, dv, dbeta, dg.
With BACKWARD_VERSION "v3", kernel 4 is `_dwy_direct_kernel` (T kept from the recompute, dA = -T^T dU U^T,
no inverse) and kernel 1 also forms each chunk's own state-gradient term for kernel 2 (STATE_TERM_OUTSIDE).
With DSTATE_PASS "light" (v3 only), kernel 1 forms R' = that term - W^T dU_local, kernel 2 is the forward's
one-product `_light_scan_kernel` run in reverse over N^T = -W^T Kd, and `_fix_du_kernel` adds Kd dh' to dU after it.
With `saved` (the forward's kept W, U, b, h, T: `op.SAVE_FOR_BACKWARD`), nothing is recomputed; the light pass then
forms only N^T (`triton_forward.transposed_transitions`).
Transposed products are computed directly, never as `tl.trans` of a `tl.dot` result (see
`triton_forward`): the kernels form both T and T^T = (I + A^T)^{-1}, and both dT and dT^T.
"""

import torch
import triton
import triton.language as tl

from rewrite.kernels.launch_math import cdiv, next_power_of_2

from ..alloc import new_empty
from . import triton_forward
from .triton_forward import (
    CHUNK,
    SUB,
    Layout,
    _light_scan_kernel,
    chunk_gates,
    chunk_of_program,
    head_block,
    precision,
    recompute,
    sequence_rows,
    state_block,
    tile,
    tile_major,
    transposed_transitions,
    unit_inverse,
)

# Backward form, read at every call: "v2" recomputes T and T^T by two blocked inverses in the WY kernel
# and forms dT; "v3" (default since the 2026-12-06 H100 run: fwd+bwd 4.07 / 14.4 / 55.9 ms against v2's
# 6.18 / 22.9 / 89.0 at 8K / 32K / 128K) keeps T from the recompute and forms dA = -T^T dU U^T directly
# (`_dwy_direct_kernel`: no inverse, about a third of the products, no [C, K] dW accumulators).
BACKWARD_VERSION = "v3"
# v3 WY kernel launch shape: (BV, warps, stages)
DWY_DIRECT_TILES = (16, 8, 2)
# v3 only: the chunk's own state-gradient term scale sum_g (diag(gamma) Q_g)^T dO_g is formed by the parallel
# dU_local kernel (one more [chunks, Hkv, K, V] float32 buffer) instead of inside the sequential loop
STATE_TERM_OUTSIDE = True
# State-gradient pass, read at every call: "v2" runs dU = dU_local + Kd dh' and
# dh = gamma_C dh' - W^T dU + R in the sequential loop; "light" (needs v3 with STATE_TERM_OUTSIDE) forms
# R' = R - W^T dU_local in the parallel dU_local kernel and N^T = -W^T Kd with the recompute, so each sequential step
# is dh = N^T dh' + (gamma_C dh' + R') (the forward's `_light_scan_kernel`, reversed: one product, operands
# prefetched), and dU += Kd dh' runs in parallel afterwards (`_fix_du_kernel`).
DSTATE_PASS = "light"  # default since the 2026-12-06 H100 run: fwd+bwd 3.51 vs 3.86 ms at 8K, 50.7 vs 55.8 at 128K


@triton.jit
def _du_local_kernel(
    q_ptr, k_ptr, do_ptr, b_ptr, du_ptr, r_ptr, bounds_ptr, chunk_start_ptr, table_ptr,
    n_seqs, T, heads, kv_heads, dk, dv, scale,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr, VARLEN: tl.constexpr,
    PRECISION: tl.constexpr, STATE_TERM: tl.constexpr = False, w_ptr=None, n_chunks_all=0, LIGHT: tl.constexpr = False,
    BVS: tl.constexpr = 16,
):
    """scale sum_g (Q_g K^T * Dc)^T dO_g; with STATE_TERM also the chunk's own term of the state gradient,
    scale sum_g (diag(gamma) Q_g)^T dO_g [K, BV], stored per chunk for `_dstates_kernel` (v3). With LIGHT the
    term is R' = that - W^T dU_local, stored tile-major with the light scan's V tile BVS (zero-padded)."""
    i_c, i_v, hk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq, local = chunk_of_program(i_c, table_ptr, T, C, VARLEN)
    if seq >= n_seqs:
        return
    bos, eos, first = sequence_rows(seq, bounds_ptr, chunk_start_ptr, T, C, VARLEN)
    group = heads // kv_heads
    rows = bos + local * C + tl.arange(0, C)
    row_mask = rows < eos
    kcols = tl.arange(0, BK)
    vcols = i_v * BV + tl.arange(0, BV)
    k = tile(k_ptr + hk * dk, rows, row_mask, kv_heads * dk, kcols, dk).to(tl.float32)
    i = tl.arange(0, C)
    upper = i[:, None] <= i[None, :]
    gamma = tl.full([C], 1.0, dtype=tl.float32)
    if HAS_G:
        b = tl.load(b_ptr + rows.to(tl.int64) * kv_heads + hk, mask=row_mask, other=0.0)
        decay_t = tl.exp(tl.where(upper, b[None, :] - b[:, None], float("-inf")))  # [j, i] = exp(b_i - b_j)
        gamma = tl.exp(b)
    else:
        decay_t = tl.where(upper, 1.0, 0.0)
    acc = tl.zeros([C, BV], dtype=tl.float32)
    term = tl.zeros([BK, BV], dtype=tl.float32)
    for j in range(0, group):
        i_h = hk * group + j
        q = tile(q_ptr + i_h * dk, rows, row_mask, heads * dk, kcols, dk).to(tl.float32)
        do = tile(do_ptr + i_h * dv, rows, row_mask, heads * dv, vcols, dv).to(tl.float32)
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * decay_t
        acc += tl.dot(st, do, input_precision=PRECISION)
        if STATE_TERM:
            term += tl.dot(tl.trans(q * (gamma * scale)[:, None]), do, input_precision=PRECISION)
    offs = (rows.to(tl.int64) * kv_heads + hk)[:, None] * dv + vcols[None, :]
    tl.store(du_ptr + offs, acc * scale, mask=row_mask[:, None] & (vcols < dv)[None, :])
    if LIGHT:
        w = tile(w_ptr + hk * dk, rows, row_mask, kv_heads * dk, kcols, dk)
        term -= tl.dot(tl.trans(w), acc * scale, input_precision=PRECISION)
        n_vtiles = tl.cdiv(dv, BVS)
        ptrs = tile_major(r_ptr, hk, kcols, vcols, first + local, n_chunks_all, n_vtiles, BK, BVS)
        tl.store(ptrs, term, mask=(vcols < n_vtiles * BVS)[None, :])
    elif STATE_TERM:
        r_offs = (((first + local).to(tl.int64) * kv_heads + hk) * dk + kcols[:, None]) * dv + vcols[None, :]
        tl.store(r_ptr + r_offs, term, mask=(kcols < dk)[:, None] & (vcols < dv)[None, :])


@triton.jit
def _dstates_kernel(
    q_ptr, k_ptr, w_ptr, b_ptr, do_ptr, du_ptr, dht_ptr, dh_ptr, dh0_ptr, r_ptr, bounds_ptr, chunk_start_ptr,
    T, heads, kv_heads, dk, dv, scale,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr, VARLEN: tl.constexpr,
    PRECISION: tl.constexpr, STATE_TERM: tl.constexpr = False, HAS_DHT: tl.constexpr = True,
    STORE_DH0: tl.constexpr = True,
):
    """Reverse over chunks: dh' per chunk, dU += Kd dh' in place, d initial state. With STATE_TERM the
    chunk's own term scale sum_g (diag(gamma) Q_g)^T dO_g is read from `r_ptr` (`_du_local_kernel`)
    instead of formed here, so each sequential step loads no q / dO and runs two products instead of 2 + group.
    Without HAS_DHT the d final state is zero (`dht_ptr` unused); without STORE_DH0 `dh0_ptr` is unused."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    seq, hk = i_nh // kv_heads, i_nh % kv_heads
    group = heads // kv_heads
    bos, eos, first = sequence_rows(seq, bounds_ptr, chunk_start_ptr, T, C, VARLEN)
    kcols = tl.arange(0, BK)
    vcols = i_v * BV + tl.arange(0, BV)
    state_offs = kcols[:, None] * dv + vcols[None, :]
    state_mask = (kcols < dk)[:, None] & (vcols < dv)[None, :]
    dh = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        dh += tl.load(dht_ptr + i_nh.to(tl.int64) * dk * dv + state_offs, mask=state_mask, other=0.0)
    n_chunks = tl.cdiv(eos - bos, C)
    for ii in range(0, n_chunks):
        c = n_chunks - 1 - ii
        tl.store(dh_ptr + ((first + c).to(tl.int64) * kv_heads + hk) * dk * dv + state_offs, dh, mask=state_mask)
        start = bos + c * C
        rows = start + tl.arange(0, C)
        row_mask = rows < eos
        k = tile(k_ptr + hk * dk, rows, row_mask, kv_heads * dk, kcols, dk).to(tl.float32)
        w = tile(w_ptr + hk * dk, rows, row_mask, kv_heads * dk, kcols, dk)
        offs = (rows.to(tl.int64) * kv_heads + hk)[:, None] * dv + vcols[None, :]
        tile_mask = row_mask[:, None] & (vcols < dv)[None, :]
        du = tl.load(du_ptr + offs, mask=tile_mask, other=0.0)
        gamma = tl.full([C], 1.0, dtype=tl.float32)
        if HAS_G:
            last = tl.minimum(start + C, eos) - 1
            b = tl.load(b_ptr + rows.to(tl.int64) * kv_heads + hk, mask=row_mask, other=0.0)
            b_last = tl.load(b_ptr + last.to(tl.int64) * kv_heads + hk)
            k = k * tl.exp(b_last - b)[:, None]
            gamma = tl.exp(b)
        du += tl.dot(k, dh, input_precision=PRECISION)
        tl.store(du_ptr + offs, du, mask=tile_mask)
        if HAS_G:
            dh = dh * tl.exp(b_last)
        dh -= tl.dot(tl.trans(w), du, input_precision=PRECISION)
        if STATE_TERM:
            dh += tl.load(r_ptr + ((first + c).to(tl.int64) * kv_heads + hk) * dk * dv + state_offs, mask=state_mask,
                          other=0.0)
        else:
            for j in range(0, group):
                i_h = hk * group + j
                q = tile(q_ptr + i_h * dk, rows, row_mask, heads * dk, kcols, dk).to(tl.float32)
                do = tile(do_ptr + i_h * dv, rows, row_mask, heads * dv, vcols, dv).to(tl.float32)
                dh += tl.dot(tl.trans(q * (gamma * scale)[:, None]), do, input_precision=PRECISION)
    if STORE_DH0:
        tl.store(dh0_ptr + i_nh.to(tl.int64) * dk * dv + state_offs, dh, mask=state_mask)


@triton.jit
def _fix_du_kernel(
    k_ptr, b_ptr, du_ptr, dh_ptr, bounds_ptr, chunk_start_ptr, table_ptr, n_seqs, T, kv_heads, dk, dv,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr, VARLEN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dU = dU_local + Kd dh' in place, per (chunk, V tile, kv head), after the "light" state-gradient scan."""
    i_c, i_v, hk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq, local = chunk_of_program(i_c, table_ptr, T, C, VARLEN)
    if seq >= n_seqs:
        return
    bos, eos, first = sequence_rows(seq, bounds_ptr, chunk_start_ptr, T, C, VARLEN)
    start = bos + local * C
    rows = start + tl.arange(0, C)
    row_mask = rows < eos
    kcols = tl.arange(0, BK)
    vcols = i_v * BV + tl.arange(0, BV)
    k = tile(k_ptr + hk * dk, rows, row_mask, kv_heads * dk, kcols, dk).to(tl.float32)
    if HAS_G:
        last = tl.minimum(start + C, eos) - 1
        b = tl.load(b_ptr + rows.to(tl.int64) * kv_heads + hk, mask=row_mask, other=0.0)
        b_last = tl.load(b_ptr + last.to(tl.int64) * kv_heads + hk)
        k = k * tl.exp(b_last - b)[:, None]
    state_offs = (((first + local).to(tl.int64) * kv_heads + hk) * dk + kcols[:, None]) * dv + vcols[None, :]
    dh = tl.load(dh_ptr + state_offs, mask=(kcols < dk)[:, None] & (vcols < dv)[None, :], other=0.0)
    offs = (rows.to(tl.int64) * kv_heads + hk)[:, None] * dv + vcols[None, :]
    tile_mask = row_mask[:, None] & (vcols < dv)[None, :]
    du = tl.load(du_ptr + offs, mask=tile_mask, other=0.0)
    tl.store(du_ptr + offs, du + tl.dot(k, dh, input_precision=PRECISION), mask=tile_mask)


@triton.jit
def _dqk_kernel(
    q_ptr, k_ptr, u_ptr, b_ptr, h_ptr, do_ptr, dq_ptr, dko_ptr, dbo_ptr, bounds_ptr, chunk_start_ptr, table_ptr,
    n_seqs, T, heads, kv_heads, dk, dv, scale,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr, VARLEN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_c, hk = tl.program_id(0), tl.program_id(1)
    seq, local = chunk_of_program(i_c, table_ptr, T, C, VARLEN)
    if seq >= n_seqs:
        return
    bos, eos, first = sequence_rows(seq, bounds_ptr, chunk_start_ptr, T, C, VARLEN)
    group = heads // kv_heads
    rows = bos + local * C + tl.arange(0, C)
    row_mask = rows < eos
    kcols = tl.arange(0, BK)
    k = tile(k_ptr + hk * dk, rows, row_mask, kv_heads * dk, kcols, dk).to(tl.float32)
    i = tl.arange(0, C)
    lower, upper = i[:, None] >= i[None, :], i[:, None] <= i[None, :]
    gate = rows.to(tl.int64) * kv_heads + hk
    if HAS_G:
        b = tl.load(b_ptr + gate, mask=row_mask, other=0.0)
        gamma = tl.exp(b)
        decay = tl.exp(tl.where(lower, b[:, None] - b[None, :], float("-inf")))
        decay_t = tl.exp(tl.where(upper, b[None, :] - b[:, None], float("-inf")))
    else:
        gamma = tl.full([C], 1.0, dtype=tl.float32)
        decay = tl.where(lower, 1.0, 0.0)
        decay_t = tl.where(upper, 1.0, 0.0)
    h_base = h_ptr + ((first + local).to(tl.int64) * kv_heads + hk) * dk * dv
    dko = tl.zeros([C, BK], dtype=tl.float32)
    db = tl.zeros([C], dtype=tl.float32)
    for j in range(0, group):
        i_h = hk * group + j
        q = tile(q_ptr + i_h * dk, rows, row_mask, heads * dk, kcols, dk).to(tl.float32)
        ds = tl.zeros([C, C], dtype=tl.float32)
        dst = tl.zeros([C, C], dtype=tl.float32)
        dqi = tl.zeros([C, BK], dtype=tl.float32)
        for v0 in range(0, dv, BV):
            vcols = v0 + tl.arange(0, BV)
            do = tile(do_ptr + i_h * dv, rows, row_mask, heads * dv, vcols, dv).to(tl.float32)
            u = tile(u_ptr + hk * dv, rows, row_mask, kv_heads * dv, vcols, dv)
            h = tl.load(h_base + kcols[:, None] * dv + vcols[None, :],
                        mask=(kcols < dk)[:, None] & (vcols < dv)[None, :], other=0.0)
            ds += tl.dot(do, tl.trans(u), input_precision=PRECISION)
            dst += tl.dot(u, tl.trans(do), input_precision=PRECISION)
            dqi += tl.dot(do, tl.trans(h), input_precision=PRECISION)
        ds = ds * (decay * scale)  # dS_ij exp(b_i - b_j), j <= i
        dst = dst * (decay_t * scale)
        dq = (scale * gamma)[:, None] * dqi + tl.dot(ds, k, input_precision=PRECISION)
        dq_offs = rows.to(tl.int64)[:, None] * (heads * dk) + i_h * dk + kcols[None, :]
        tl.store(dq_ptr + dq_offs, dq.to(dq_ptr.dtype.element_ty), mask=row_mask[:, None] & (kcols < dk)[None, :])
        dko += tl.dot(dst, q, input_precision=PRECISION)
        if HAS_G:
            p = ds * tl.dot(q, tl.trans(k), input_precision=PRECISION)  # dS_ij * score_ij
            db += (scale * gamma) * tl.sum(dqi * q, axis=1) + tl.sum(p, axis=1) - tl.sum(p, axis=0)
    tl.store(dko_ptr + gate[:, None] * dk + kcols[None, :], dko, mask=row_mask[:, None] & (kcols < dk)[None, :])
    if HAS_G:
        tl.store(dbo_ptr + gate, db, mask=row_mask)


@triton.jit
def _dwy_kernel(
    k_ptr, v_ptr, beta_ptr, g_ptr, u_ptr, du_ptr, h_ptr, dh_ptr, dko_ptr, dbo_ptr,
    dk_ptr, dv_ptr, dbeta_ptr, dg_ptr, bounds_ptr, chunk_start_ptr, table_ptr,
    n_seqs, T, kv_heads, dk, dv,
    C: tl.constexpr, SB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr,
    VARLEN: tl.constexpr, PRECISION: tl.constexpr,
):
    i_c, hk = tl.program_id(0), tl.program_id(1)
    seq, local = chunk_of_program(i_c, table_ptr, T, C, VARLEN)
    if seq >= n_seqs:
        return
    bos, eos, first = sequence_rows(seq, bounds_ptr, chunk_start_ptr, T, C, VARLEN)
    rows = bos + local * C + tl.arange(0, C)
    row_mask = rows < eos
    kcols = tl.arange(0, BK)
    k_mask = row_mask[:, None] & (kcols < dk)[None, :]
    gate = rows.to(tl.int64) * kv_heads + hk
    k = tile(k_ptr + hk * dk, rows, row_mask, kv_heads * dk, kcols, dk).to(tl.float32)
    beta, b = chunk_gates(beta_ptr, g_ptr, rows, row_mask, hk, kv_heads, C, HAS_G)
    i = tl.arange(0, C)
    is_last = i == C - 1  # padded rows past the sequence end carry b_last too
    b_last = tl.sum(tl.where(is_last, b, 0.0), axis=0)
    gamma = tl.exp(b)
    to_end = tl.exp(b_last - b)
    x = (beta * gamma)[:, None] * k
    h_base = ((first + local).to(tl.int64) * kv_heads + hk) * dk * dv
    dw = tl.zeros([C, BK], dtype=tl.float32)
    dwt = tl.zeros([BK, C], dtype=tl.float32)
    dkd = tl.zeros([C, BK], dtype=tl.float32)
    d_t = tl.zeros([C, C], dtype=tl.float32)
    d_tt = tl.zeros([C, C], dtype=tl.float32)
    hdh = tl.zeros([BK], dtype=tl.float32)
    for v0 in range(0, dv, BV):
        vcols = v0 + tl.arange(0, BV)
        v_mask = row_mask[:, None] & (vcols < dv)[None, :]
        offs = gate[:, None] * dv + vcols[None, :]
        u = tl.load(u_ptr + offs, mask=v_mask, other=0.0)
        du = tl.load(du_ptr + offs, mask=v_mask, other=0.0)
        y = beta[:, None] * tile(v_ptr + hk * dv, rows, row_mask, kv_heads * dv, vcols, dv).to(tl.float32)
        s_offs = h_base + kcols[:, None] * dv + vcols[None, :]
        s_mask = (kcols < dk)[:, None] & (vcols < dv)[None, :]
        h = tl.load(h_ptr + s_offs, mask=s_mask, other=0.0)
        dh = tl.load(dh_ptr + s_offs, mask=s_mask, other=0.0)
        dw -= tl.dot(du, tl.trans(h), input_precision=PRECISION)
        dwt -= tl.dot(h, tl.trans(du), input_precision=PRECISION)
        dkd += tl.dot(u, tl.trans(dh), input_precision=PRECISION)
        d_t += tl.dot(du, tl.trans(y), input_precision=PRECISION)
        d_tt += tl.dot(y, tl.trans(du), input_precision=PRECISION)
        hdh += tl.sum(h * dh, axis=1)
    d_t += tl.dot(dw, tl.trans(x), input_precision=PRECISION)
    d_tt += tl.dot(x, dwt, input_precision=PRECISION)
    # T and T^T after the V loop (shorter live ranges)
    below, above = i[:, None] > i[None, :], i[:, None] < i[None, :]
    decay = tl.exp(tl.where(below, b[:, None] - b[None, :], float("-inf")))  # strict
    decay_t = tl.exp(tl.where(above, b[None, :] - b[:, None], float("-inf")))
    kk = tl.dot(k, tl.trans(k), input_precision=PRECISION)
    a = beta[:, None] * decay * kk
    t = unit_inverse(a, C, SB, True, PRECISION)
    tt = unit_inverse(beta[None, :] * decay_t * kk, C, SB, False, PRECISION)  # A^T: k k^T is symmetric
    dx = tl.dot(tt, dw, input_precision=PRECISION)
    da = -tl.dot(tl.dot(tt, d_t, input_precision=PRECISION), tt, input_precision=PRECISION)
    da = tl.where(below, da, 0.0)
    dat = -tl.dot(tl.dot(t, d_tt, input_precision=PRECISION), t, input_precision=PRECISION)
    dat = tl.where(above, dat, 0.0)
    e = da * beta[:, None] * decay
    et = dat * beta[None, :] * decay_t
    d_k = tl.load(dko_ptr + gate[:, None] * dk + kcols[None, :], mask=k_mask, other=0.0)
    d_k += (beta * gamma)[:, None] * dx + to_end[:, None] * dkd
    d_k += tl.dot(e, k, input_precision=PRECISION) + tl.dot(et, k, input_precision=PRECISION)
    tl.store(dk_ptr + gate[:, None] * dk + kcols[None, :], d_k.to(dk_ptr.dtype.element_ty), mask=k_mask)
    xk = tl.sum(dx * k, axis=1)
    dbeta = tl.sum(da * decay * kk, axis=1) + gamma * xk
    for v0 in range(0, dv, BV):
        vcols = v0 + tl.arange(0, BV)
        v_mask = row_mask[:, None] & (vcols < dv)[None, :]
        du = tl.load(du_ptr + gate[:, None] * dv + vcols[None, :], mask=v_mask, other=0.0)
        v = tile(v_ptr + hk * dv, rows, row_mask, kv_heads * dv, vcols, dv).to(tl.float32)
        dy = tl.dot(tt, du, input_precision=PRECISION)
        dbeta += tl.sum(dy * v, axis=1)
        tl.store(dv_ptr + gate[:, None] * dv + vcols[None, :], (beta[:, None] * dy).to(dv_ptr.dtype.element_ty),
                 mask=v_mask)
    tl.store(dbeta_ptr + gate, dbeta.to(dbeta_ptr.dtype.element_ty), mask=row_mask)
    if HAS_G:
        fa = da * a
        r = to_end * tl.sum(dkd * k, axis=1)  # gradient of b_C - b_j through Kd
        db = tl.load(dbo_ptr + gate, mask=row_mask, other=0.0)
        db += tl.sum(fa, axis=1) - tl.sum(fa, axis=0) + beta * gamma * xk - r
        db += tl.where(is_last, tl.sum(r, axis=0) + tl.exp(b_last) * tl.sum(hdh, axis=0), 0.0)
        dg = tl.sum(db, axis=0) - tl.cumsum(db, axis=0) + db  # sum over i >= t in the chunk
        tl.store(dg_ptr + gate, dg.to(dg_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _dwy_direct_kernel(
    k_ptr, v_ptr, beta_ptr, g_ptr, u_ptr, du_ptr, h_ptr, dh_ptr, t_ptr, dko_ptr, dbo_ptr,
    dk_ptr, dv_ptr, dbeta_ptr, dg_ptr, bounds_ptr, chunk_start_ptr, table_ptr,
    n_seqs, T, kv_heads, dk, dv,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr,
    VARLEN: tl.constexpr, PRECISION: tl.constexpr,
):
    """The WY part without inverses (v3): T comes from the recompute, dA = -T^T dU U^T directly.

    dT = dW X^T + dU Y^T = dU (Y - X h)^T = dU ((I + A) U)^T, so dA = -T^T dT T^T = -T^T dU U^T,
    dX = T^T dW = -dY h^T with dY = T^T dU. dA^T = -(U dU^T) T is formed directly (no `tl.trans` of
    a dot result); T^T is T loaded with swapped indices.
    """
    i_c, hk = tl.program_id(0), tl.program_id(1)
    seq, local = chunk_of_program(i_c, table_ptr, T, C, VARLEN)
    if seq >= n_seqs:
        return
    bos, eos, first = sequence_rows(seq, bounds_ptr, chunk_start_ptr, T, C, VARLEN)
    rows = bos + local * C + tl.arange(0, C)
    row_mask = rows < eos
    kcols = tl.arange(0, BK)
    k_mask = row_mask[:, None] & (kcols < dk)[None, :]
    gate = rows.to(tl.int64) * kv_heads + hk
    beta, b = chunk_gates(beta_ptr, g_ptr, rows, row_mask, hk, kv_heads, C, HAS_G)
    i = tl.arange(0, C)
    t_base = t_ptr + (i_c.to(tl.int64) * kv_heads + hk) * C * C
    tt = tl.load(t_base + i[None, :] * C + i[:, None])  # T^T
    h_base = ((first + local).to(tl.int64) * kv_heads + hk) * dk * dv
    k = tile(k_ptr + hk * dk, rows, row_mask, kv_heads * dk, kcols, dk).to(tl.float32)
    below, above = i[:, None] > i[None, :], i[:, None] < i[None, :]
    # pass 1 over V: dU U^T and U dU^T (each other's transpose, both formed directly), then the
    # gradient through A: e = dA * beta_i exp(b_i - b_j) (strictly lower) plus its transpose from dA^T
    du_u = tl.zeros([C, C], dtype=tl.float32)
    u_du = tl.zeros([C, C], dtype=tl.float32)
    for v0 in range(0, dv, BV):
        vcols = v0 + tl.arange(0, BV)
        v_mask = row_mask[:, None] & (vcols < dv)[None, :]
        offs = gate[:, None] * dv + vcols[None, :]
        u = tl.load(u_ptr + offs, mask=v_mask, other=0.0)
        du = tl.load(du_ptr + offs, mask=v_mask, other=0.0)
        du_u += tl.dot(du, tl.trans(u), input_precision=PRECISION)
        u_du += tl.dot(u, tl.trans(du), input_precision=PRECISION)
    decay = tl.exp(tl.where(below, b[:, None] - b[None, :], float("-inf")))  # strict
    da = tl.where(below, -tl.dot(tt, du_u, input_precision=PRECISION), 0.0)
    p = da * decay * tl.dot(k, tl.trans(k), input_precision=PRECISION)  # dA_ij exp(b_i - b_j) k_i.k_j
    dbeta = tl.sum(p, axis=1)
    db_a = beta * tl.sum(p, axis=1) - tl.sum(beta[:, None] * p, axis=0)  # row minus column sums of dA * A
    e = da * beta[:, None] * decay  # d k_i += e_ij k_j ...
    t = tl.load(t_base + i[:, None] * C + i[None, :])
    dat = tl.where(above, -tl.dot(u_du, t, input_precision=PRECISION), 0.0)
    decay_t = tl.exp(tl.where(above, b[None, :] - b[:, None], float("-inf")))
    e += dat * beta[None, :] * decay_t  # ... and d k_j += e_ij k_i, as (e^T)_ji formed from dA^T
    # pass 2 over V: dY = T^T dU, dX = -dY h^T, dKd = U dh'^T, dv, the V part of dbeta
    dx = tl.zeros([C, BK], dtype=tl.float32)
    dkd = tl.zeros([C, BK], dtype=tl.float32)
    hdh = tl.zeros([BK], dtype=tl.float32)
    for v0 in range(0, dv, BV):
        vcols = v0 + tl.arange(0, BV)
        v_mask = row_mask[:, None] & (vcols < dv)[None, :]
        offs = gate[:, None] * dv + vcols[None, :]
        u = tl.load(u_ptr + offs, mask=v_mask, other=0.0)
        du = tl.load(du_ptr + offs, mask=v_mask, other=0.0)
        v = tile(v_ptr + hk * dv, rows, row_mask, kv_heads * dv, vcols, dv).to(tl.float32)
        s_offs = h_base + kcols[:, None] * dv + vcols[None, :]
        s_mask = (kcols < dk)[:, None] & (vcols < dv)[None, :]
        h = tl.load(h_ptr + s_offs, mask=s_mask, other=0.0)
        dh = tl.load(dh_ptr + s_offs, mask=s_mask, other=0.0)
        dy = tl.dot(tt, du, input_precision=PRECISION)
        dx -= tl.dot(dy, tl.trans(h), input_precision=PRECISION)
        dkd += tl.dot(u, tl.trans(dh), input_precision=PRECISION)
        hdh += tl.sum(h * dh, axis=1)
        dbeta += tl.sum(dy * v, axis=1)
        tl.store(dv_ptr + gate[:, None] * dv + vcols[None, :], (beta[:, None] * dy).to(dv_ptr.dtype.element_ty),
                 mask=v_mask)
    is_last = i == C - 1  # padded rows past the sequence end carry b_last too
    b_last = tl.sum(tl.where(is_last, b, 0.0), axis=0)
    gamma = tl.exp(b)
    to_end = tl.exp(b_last - b)
    xk = tl.sum(dx * k, axis=1)
    r = to_end * tl.sum(dkd * k, axis=1)  # gradient of b_C - b_j through Kd
    d_k = tl.load(dko_ptr + gate[:, None] * dk + kcols[None, :], mask=k_mask, other=0.0)
    d_k += (beta * gamma)[:, None] * dx + to_end[:, None] * dkd + tl.dot(e, k, input_precision=PRECISION)
    tl.store(dk_ptr + gate[:, None] * dk + kcols[None, :], d_k.to(dk_ptr.dtype.element_ty), mask=k_mask)
    dbeta += gamma * xk
    tl.store(dbeta_ptr + gate, dbeta.to(dbeta_ptr.dtype.element_ty), mask=row_mask)
    if HAS_G:
        db = tl.load(dbo_ptr + gate, mask=row_mask, other=0.0)
        db += db_a + beta * gamma * xk - r
        db += tl.where(is_last, tl.sum(r, axis=0) + tl.exp(b_last) * tl.sum(hdh, axis=0), 0.0)
        dg = tl.sum(db, axis=0) - tl.cumsum(db, axis=0) + db  # sum over i >= t in the chunk
        tl.store(dg_ptr + gate, dg.to(dg_ptr.dtype.element_ty), mask=row_mask)

def chunk_backward(
    do: torch.Tensor,
    d_final_state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    chunk: int = CHUNK,
    saved: tuple | None = None,
) -> tuple[torch.Tensor, ...]:
    """Gradients (dq, dk, dv, dbeta, dg or None, d_initial_state or None) of `chunk_forward`.

    `d_final_state` empty (numel 0) means zeros (nothing loaded). `saved`: the (w, u, b, h, t) that
    `chunk_forward(..., save=True)` returned for the same inputs; then W, U, b, h and T are not recomputed (no
    `_prepare_kernel` / state pass here; the "light" state-gradient pass still forms N^T from the kept W).
    """
    if q.dtype == torch.float64:
        raise ValueError("delta_rule: the Triton kernels take float32/float16/bfloat16, got float64")
    q, k, v, beta, do = (x.contiguous() for x in (q, k, v, beta, do))
    g = None if g is None else g.contiguous()
    has_dht = d_final_state.numel() > 0
    if has_dht:
        d_final_state = d_final_state.float().contiguous()
    batch, length, heads, dk = q.shape
    kv_heads, dv = k.shape[2], v.shape[-1]
    prec = precision(q.dtype)
    layout = Layout(batch, length, cu_seqlens, chunk, q.device)
    h0 = None if initial_state is None else initial_state.float()
    version = BACKWARD_VERSION
    if version not in ("v2", "v3"):
        raise ValueError(f"delta_rule: BACKWARD_VERSION must be 'v2' or 'v3', got {version!r}")
    state_term = version == "v3" and STATE_TERM_OUTSIDE
    dstate_pass = DSTATE_PASS
    if dstate_pass not in ("v2", "light"):
        raise ValueError(f"delta_rule: DSTATE_PASS must be 'v2' or 'light', got {dstate_pass!r}")
    light = dstate_pass == "light"
    if light and not state_term:
        raise ValueError("delta_rule: DSTATE_PASS 'light' needs BACKWARD_VERSION 'v3' with STATE_TERM_OUTSIDE")
    if saved is not None:
        w, u, b, h, t_all = saved  # kept by the forward: no recompute
        transposed = transposed_transitions(k, beta, g, w, dv, layout, prec, chunk) if light else None
    else:
        t_all = None
        if version == "v3":
            t_all = new_empty((layout.max_chunks, kv_heads, chunk, chunk), dtype=torch.float32, device=q.device)
        transposed = {} if light else None
        w, u, b, h, _ = recompute(k, v, beta, g, h0, layout, prec, chunk, t_out=t_all, transposed=transposed)
    has_g = g is not None
    bk = head_block(dk, dv)
    bv = max(16, min(64, next_power_of_2(dv)))
    rows = batch * length
    warps = 8 if bk >= 128 else 4
    b_arg = b if has_g else w
    du = new_empty((rows, kv_heads, dv), dtype=torch.float32, device=q.device)
    dh = new_empty(h.shape, dtype=torch.float32, device=q.device)
    has_h0 = initial_state is not None
    dh0 = new_empty((layout.n, kv_heads, dk, dv), dtype=torch.float32, device=q.device) if has_h0 else dh
    dht = d_final_state if has_dht else dh
    dq = new_empty(q.shape, dtype=q.dtype, device=q.device)
    dko = new_empty((rows, kv_heads, dk), dtype=torch.float32, device=q.device)
    dbo = new_empty((rows, kv_heads), dtype=torch.float32, device=q.device) if has_g else dko
    d_k = new_empty(k.shape, dtype=k.dtype, device=q.device)
    d_v = new_empty(v.shape, dtype=v.dtype, device=q.device)
    dbeta = new_empty(beta.shape, dtype=beta.dtype, device=q.device)
    dg = new_empty(g.shape, dtype=g.dtype, device=q.device) if has_g else None
    args = layout.args(w)
    common = dict(C=chunk, BK=bk, HAS_G=has_g, VARLEN=layout.varlen, PRECISION=prec)
    bvs = state_block(layout.n * kv_heads, dv)
    if light:
        r = new_empty((kv_heads * cdiv(dv, bvs), layout.max_chunks, bk, bvs), dtype=torch.float32,
                      device=q.device)
    else:
        r = new_empty(h.shape, dtype=torch.float32, device=q.device) if state_term else dh
    if layout.max_chunks > 0:
        _du_local_kernel[(layout.max_chunks, cdiv(dv, bv), kv_heads)](
            q, k, do, b_arg, du, r, *args, heads, kv_heads, dk, dv, scale, BV=bv, STATE_TERM=state_term,
            num_warps=8 if state_term and bk >= 128 else 4,  # the [K, BV] term spills at 4 warps
            w_ptr=w, n_chunks_all=layout.max_chunks, LIGHT=light, BVS=bvs, **common,
        )
        _dqk_kernel[(layout.max_chunks, kv_heads)](
            q, k, u, b_arg, h, do, dq, dko, dbo, *args, heads, kv_heads, dk, dv, scale,
            BV=min(bv, 32), num_warps=warps, num_stages=2, **common,
        )
    if light:
        assert transposed["bv"] == bvs
        warps_s, stages_s = triton_forward.LIGHT_SCAN  # read at every call
        _light_scan_kernel[(cdiv(dv, bvs), layout.n * kv_heads)](
            transposed["nt"], r, transposed["a"] if has_g else w, dht, dh, dh0, args[0], args[1], length,
            kv_heads, dk, dv, layout.max_chunks, C=chunk, BK=bk, BV=bvs, HAS_G=has_g, HAS_H0=has_dht, REVERSE=True,
            VARLEN=layout.varlen, PRECISION=prec, STORE_LAST=has_h0, num_warps=warps_s, num_stages=stages_s,
        )
        if layout.max_chunks > 0:
            _fix_du_kernel[(layout.max_chunks, cdiv(dv, bv), kv_heads)](
                k, b_arg, du, dh, *args, kv_heads, dk, dv, BV=bv, num_warps=4, **common,
            )
    else:
        _dstates_kernel[(cdiv(dv, bvs), layout.n * kv_heads)](
            q, k, w, b_arg, do, du, dht, dh, dh0, r, args[0], args[1], length, heads, kv_heads, dk, dv,
            scale, BV=bvs, STATE_TERM=state_term, HAS_DHT=has_dht, STORE_DH0=has_h0, num_warps=4, **common,
        )
    if layout.max_chunks > 0 and version == "v3":
        bv3, warps3, stages3 = DWY_DIRECT_TILES
        _dwy_direct_kernel[(layout.max_chunks, kv_heads)](
            k, v, beta, g if has_g else beta, u, du, h, dh, t_all, dko, dbo, d_k, d_v, dbeta,
            dg if has_g else dbeta, *args, kv_heads, dk, dv, BV=max(16, min(bv, bv3)), num_warps=warps3,
            num_stages=stages3, **common,
        )
    elif layout.max_chunks > 0:
        # BV 16 and two stages keep shared memory under Hopper's 227 KiB at head dim 128: triton 3.6
        # asked 312 KiB for BV 32 with three stages (measured on an H200)
        _dwy_kernel[(layout.max_chunks, kv_heads)](
            k, v, beta, g if has_g else beta, u, du, h, dh, dko, dbo, d_k, d_v, dbeta, dg if has_g else dbeta,
            *args, kv_heads, dk, dv, SB=min(SUB, chunk), BV=min(bv, 16), num_warps=warps, num_stages=2, **common,
        )
    d_h0 = dh0.to(initial_state.dtype) if has_h0 else None
    return dq, d_k, d_v, dbeta, dg, d_h0
