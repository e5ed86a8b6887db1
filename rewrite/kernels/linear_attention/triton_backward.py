"""Chunked linear attention backward in Triton (causal); the math is `chunked_reference._backward_equal`.

Kernels: states at chunk starts (recomputed, `triton_forward`), state gradients at chunk starts
(reverse over chunks; with a decay as parallel chunk terms plus a sequential scan, like the states), dq and dk (per kv head, looping over its q heads, so k is never repeated),
dv, then the log-decay gradient as a reverse cumsum of sum_g q * dq - k * dk per sequence.

That cumsum cancels heavily (its terms sum to about zero over a sequence), so with a decay the
dq / dk kernel computes every term in float32 operands (TF32 products for 16-bit inputs) rather
than rounding states and score gradients to the input dtype first. Transposed score matrices
are computed directly (see `triton_forward` on the Hopper miscompile).
"""

import torch
import triton
import triton.language as tl

from rewrite.kernels.launch_math import cdiv, next_power_of_2

from ..alloc import new_empty
from . import triton_forward, triton_gated
from .triton_common import (
    block,
    chunk_log_decay,
    chunk_of_program,
    chunk_rows,
    hoisted_decay,
    sequence_rows,
    whole_chunk_down,
    whole_chunk_up,
)
from .triton_forward import _load_tile, chunk_states, precision, prepare, scan_states, scan_terms
from .triton_gated import lower_apply, sub_chunk, upper_apply, upper_scores

# (BK, BV, num_warps) per decay mode for the dq/dk kernel and the dv kernel. The dv kernel's
# in-chunk part came out wrong on H200 / triton 3.6 with BK 64 or 128 and 4 warps at K=100, V=32
# (fp16 and bf16; right with BK 32, or with 8 warps; NOTES.md): keep BK 32 there.
DQK_TILES = {0: (64, 64, 4), 1: (64, 64, 8), 2: (32, 64, 8)}  # vector: 8 warps from the 2026-12-06 H100 sweep
# the vector decay's dq/dk tiles at K <= DQK_SMALL_K: H100, H=32 / Hkv=8 / K=V=64, 32K: dq/dk kernel 1.83 vs 2.05 ms
DQK_SMALL_K = 64
DQK_TILES_SMALL_K = {2: (64, 64, 8)}
DV_TILES = {0: (32, 64, 4), 1: (32, 64, 4), 2: (32, 64, 4)}
DSTATE_TILES = (64, 32)
# input precision of the vector decay's in-chunk dq / dk products in chunks whose log-decay spreads too far for the
# whole-chunk form (strong gates), for 16-bit inputs; None: TF32 as elsewhere. Under an emulation of TF32 rounding
# (Triton interpreter, float16, strong gates) TF32 there takes dg's error from 2e-4 to 4.4e-3 (the reverse cumsum
# of q * dq - k * dk cancels), exact float32 products bring it back to 4.6e-4; "tf32x3" (three TF32 products)
# is the GPU's near-float32 form. H100, bf16, strong gates: dg 1.1e-2 -> 3.1e-3 against float64; fwd+bwd 3.40 ->
# 3.51 ms at 8K, 11.8 -> 12.5 at 32K (H=16, D=128; NOTES.md, "dg on strong gates"). None: TF32 there too.
STRONG_GATE_PRECISION: str | None = "tf32x3"
CUMSUM_TILE = (4096, 16)  # elements per step and most columns per program of the dg reverse cumsum
# v8 (NOTES.md): the dg reverse cumsum as chunk sums, a short scan over them per sequence, then every chunk's own
# reverse cumsum plus its offset, instead of one sequential walk. H100, H=32 / Hkv=8 / D=64 at 32K: the cumsum
# 0.45 -> 0.08 ms, fwd+bwd 4.65 -> 4.27 ms; H=16, D=128 at 8K: 3.40 -> 3.17 ms. False: the sequential walk.
CUMSUM_PARALLEL = True
CUMSUM_PARALLEL_COLS = 64  # most columns (kv heads x features, flattened) per program of its two passes
# v10 (NOTES.md; H100, H=32 / Hkv=8 / D=64: dq / dk 0.604 -> 0.215 ms at 8K, fwd+bwd 1.79 -> 1.15 ms): the vector decay's dq / dk in two launches when the in-chunk products take
# the whole-chunk form (triton_gated PATH 2). `_chunk_dqk_hoisted_kernel` handles every (chunk, K tile, kv head)
# whose log-decay spreads by at most LIMIT: the chunk's decay factors once per program for all q heads of the kv
# head, no exp in the q-head loop, no sub-chunk or exact code (fewer registers); it flags the others, which
# `_chunk_dqk_kernel` then computes as before (its programs for unflagged tiles return at once). Both launches
# use DQK_HOISTED_TILES (the flags are per K tile). False: `_chunk_dqk_kernel` alone, as before v10.
DQK_HOISTED = True
DQK_HOISTED_TILES = (64, 64, 8)  # (BK, BV, num_warps) of both launches
DQK_HOISTED_ONE_V = True  # V in one tile (V <= BV): v and the state loaded once per program, not per q head
# register cap of `_chunk_dqk_hoisted_kernel` (None: the compiler's choice, 233-255 at 8 warps = 1 CTA per SM);
# 128 at 8 warps lets 2 CTAs share an SM at the price of spills (sm_90 compile: 432 B at 32x64, 864 B at 64x64)
DQK_HOISTED_MAXNREG: int | None = None
# v12 (NOTES.md; H100, H=32 / Hkv=8 / K=V=64: dv 0.155 -> 0.112 + 0.003 ms at 8K): the vector decay's dv in two launches when the in-chunk products take the
# whole-chunk form (triton_gated PATH 2) and K fits one tile. `_chunk_dv_hoisted_kernel` handles every (chunk,
# V tile, kv head) whose log-decay spreads by at most LIMIT over all K columns: g's cumsum, the whole-chunk test,
# the decay factors and the scaled keys once per program for all q heads of the kv head (no exp, no cumsum in the
# q-head loop); it flags the others, which `_chunk_dv_kernel` then computes as before with its own tiles' BK and
# warps (DV_TILES) and the hoisted launch's BV (the flags are per V tile). False: `_chunk_dv_kernel` alone.
DV_HOISTED = True
# most K the hoisted launch takes: K <= 64 since 2026-12-06; up to the tile's 128 since 2026-12-07 (H100, B=1, H=16,
# K=V=128 with DV_HOISTED_WIDE_BV: fwd+bwd 2.386 -> 2.213 ms at 8K, 8.434 -> 7.923 at 32K, errors unchanged)
DV_HOISTED_MAX_K = 128
# (most K in one tile, BV, num_warps) of the hoisted launch; K above the first: `_chunk_dv_kernel` alone (the
# factors of several K tiles would have to stay live through the q-head loop). 8 warps: the dv kernel's in-chunk
# part was miscompiled at BK 64 / 4 warps on H200 / triton 3.6 (see DV_TILES).
DV_HOISTED_TILES = (128, 64, 8)
DV_HOISTED_WIDE_BV = 128
"""The hoisted launch's BV (and the flagged `_chunk_dv_kernel`'s) for K above 64: V up to 128 in one tile (timed at
K = V = 128; at K <= 64 the launch keeps DV_HOISTED_TILES' BV, as measured there)."""


def dv_hoisted_bv(dk: int) -> int:
    """BV of the hoisted dv launch for keys of dim `dk`."""
    return DV_HOISTED_WIDE_BV if dk > 64 else DV_HOISTED_TILES[1]


@triton.jit
def _tile_flag(flags_ptr, i_c, i_t, hk, kv_heads):
    """Where a hoisted kernel writes, and the flagged per-tile kernel reads, the flag of (chunk i_c, K or V tile
    i_t, kv head hk): flags [chunks, tiles, Hkv], tiles = the launch's grid dim 1 (both launches use the same)."""
    return flags_ptr + (i_c * tl.num_programs(1) + i_t) * kv_heads + hk


@triton.jit
def _state_tile(ptr, state_base, kcols, vcols, dk, dv):
    """The [BK, BV] tile (kcols, vcols) of the [K, V] state (or state gradient) at ptr + state_base."""
    state_offs = state_base + kcols[:, None] * dv + vcols[None, :]
    state_mask = (kcols < dk)[:, None] & (vcols < dv)[None, :]
    return tl.load(ptr + state_offs, mask=state_mask, other=0.0)


@triton.jit
def _chunk_dstates_kernel(
    q_ptr,
    do_ptr,
    g_ptr,
    dht_ptr,
    dh_ptr,
    dh0_ptr,
    bounds_ptr,
    chunk_start_ptr,
    T,
    heads,
    kv_heads,
    dk,
    dv,
    scale,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    MODE: tl.constexpr,
    CONST: tl.constexpr,
    GATE: tl.constexpr,
    VARLEN: tl.constexpr,
    PRECISION: tl.constexpr,
    F32_PRECISION: tl.constexpr,
):
    i_nh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq, hk = i_nh // kv_heads, i_nh % kv_heads
    group = heads // kv_heads
    bos, eos, first = sequence_rows(seq, bounds_ptr, chunk_start_ptr, T, C, VARLEN)
    kcols = i_k * BK + tl.arange(0, BK)
    vcols = i_v * BV + tl.arange(0, BV)
    state_offs = kcols[:, None] * dv + vcols[None, :]
    state_mask = (kcols < dk)[:, None] & (vcols < dv)[None, :]
    dstate = tl.load(dht_ptr + i_nh.to(tl.int64) * dk * dv + state_offs, mask=state_mask, other=0.0)
    n_chunks = tl.cdiv(eos - bos, C)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        tl.store(
            dh_ptr + ((first + c).to(tl.int64) * kv_heads + hk) * dk * dv + state_offs,
            dstate.to(dh_ptr.dtype.element_ty),
            mask=state_mask,
        )
        rows = bos + c * C + tl.arange(0, C)
        row_mask = rows < eos
        if MODE != 0:
            b, to_end, b_last = chunk_log_decay(g_ptr, rows, row_mask, hk, kv_heads, kcols, dk, MODE, CONST, GATE)
            if MODE == 1:
                dstate = dstate * tl.exp(b_last)
            else:
                dstate = dstate * tl.exp(b_last)[:, None]
        for j in range(0, group):
            h = hk * group + j
            q = _load_tile(q_ptr + h * dk, rows, row_mask, heads * dk, kcols, dk)
            do = _load_tile(do_ptr + h * dv, rows, row_mask, heads * dv, vcols, dv)
            if MODE == 0:
                dstate += scale * tl.dot(tl.trans(q), do, input_precision=PRECISION)
            else:  # float32 operands: dg needs the state gradients exact
                if MODE == 1:
                    q = q * tl.exp(b)[:, None]
                else:
                    q = q * tl.exp(b)
                dstate += scale * tl.dot(tl.trans(q), do.to(tl.float32), input_precision=F32_PRECISION)
    tl.store(dh0_ptr + i_nh.to(tl.int64) * dk * dv + state_offs, dstate, mask=state_mask)


@triton.jit
def _chunk_dqk_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    g_ptr,
    h_ptr,
    dh_ptr,
    dq_ptr,
    dk_ptr,
    dlog_ptr,
    flags_ptr,
    bounds_ptr,
    chunk_start_ptr,
    table_ptr,
    n_seqs,
    T,
    heads,
    kv_heads,
    dk,
    dv,
    scale,
    C: tl.constexpr,
    SUB: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    MODE: tl.constexpr,
    CONST: tl.constexpr,
    GATE: tl.constexpr,
    VARLEN: tl.constexpr,
    PRECISION: tl.constexpr,
    F32_PRECISION: tl.constexpr,
    PATH: tl.constexpr,
    SPLIT: tl.constexpr,
    STRONG_PRECISION: tl.constexpr,
    FLAGGED: tl.constexpr,
):
    """dq (stored per q head), dk and the log-decay gradient terms of one chunk, K tile and kv head.

    SPLIT (v5 vector decay, PATH != 0): per q head dq's part first, then dk's, each with its own pass
    over V (do and v loaded twice), so the two [C, C] score gradients are never live together.
    FLAGGED: only the (chunk, K tile, kv head) that `_chunk_dqk_hoisted_kernel` flagged (flags_ptr != 0).
    """
    i_c, i_k, hk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq, local = chunk_of_program(i_c, table_ptr, T, C, VARLEN)
    if seq >= n_seqs:
        return
    if FLAGGED:
        flag = tl.load(_tile_flag(flags_ptr, i_c, i_k, hk, kv_heads))
        if flag == 0:
            return
    rows, row_mask, group = chunk_rows(seq, local, bounds_ptr, chunk_start_ptr, T, heads, kv_heads, C, VARLEN)
    kcols = i_k * BK + tl.arange(0, BK)
    idx = tl.arange(0, C)
    causal = idx[:, None] >= idx[None, :]
    causal_t = idx[:, None] <= idx[None, :]
    k = _load_tile(k_ptr + hk * dk, rows, row_mask, kv_heads * dk, kcols, dk)
    kf = k.to(tl.float32)
    if MODE != 0:
        b, to_end, b_last = chunk_log_decay(g_ptr, rows, row_mask, hk, kv_heads, kcols, dk, MODE, CONST, GATE)
    if MODE == 1:
        pair = tl.exp(tl.where(causal, b[:, None] - b[None, :], float("-inf")))
        pair_t = tl.exp(tl.where(causal_t, b[None, :] - b[:, None], float("-inf")))
    state_base = (i_c.to(tl.int64) * kv_heads + hk) * dk * dv
    dk_acc = tl.zeros([C, BK], dtype=tl.float32)
    q_dq = tl.zeros([C, BK], dtype=tl.float32)
    for j in range(0, group):
        h = hk * group + j
        q = _load_tile(q_ptr + h * dk, rows, row_mask, heads * dk, kcols, dk)
        if SPLIT:
            qf = q.to(tl.float32)
            dq = tl.zeros([C, BK], dtype=tl.float32)
            dscores = tl.zeros([C, C], dtype=tl.float32)
            for i_v in range(0, tl.cdiv(dv, BV)):
                vcols = i_v * BV + tl.arange(0, BV)
                do = _load_tile(do_ptr + h * dv, rows, row_mask, heads * dv, vcols, dv)
                v = _load_tile(v_ptr + hk * dv, rows, row_mask, kv_heads * dv, vcols, dv)
                state = _state_tile(h_ptr, state_base, kcols, vcols, dk, dv)
                dq += tl.dot(do.to(tl.float32), tl.trans(state), input_precision=F32_PRECISION)
                dscores += tl.dot(do, tl.trans(v), input_precision=PRECISION)
            dscores = tl.where(causal, dscores * scale, 0.0)
            dq = dq * scale * tl.exp(b) + lower_apply(dscores, kf, b, C, SUB, F32_PRECISION, PATH, STRONG_PRECISION)
            q_dq += qf * dq
            offs = rows.to(tl.int64)[:, None] * (heads * dk) + h * dk + kcols[None, :]
            mask = row_mask[:, None] & (kcols < dk)[None, :]
            tl.store(dq_ptr + offs, dq.to(dq_ptr.dtype.element_ty), mask=mask)
            dscores_t = tl.zeros([C, C], dtype=tl.float32)
            for i_v in range(0, tl.cdiv(dv, BV)):
                vcols = i_v * BV + tl.arange(0, BV)
                do = _load_tile(do_ptr + h * dv, rows, row_mask, heads * dv, vcols, dv)
                v = _load_tile(v_ptr + hk * dv, rows, row_mask, kv_heads * dv, vcols, dv)
                dscores_t += tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dscores_t = tl.where(causal_t, dscores_t * scale, 0.0)
            dk_acc += upper_apply(dscores_t, qf, b, C, SUB, F32_PRECISION, PATH, STRONG_PRECISION)
        else:  # v4 order: both score gradients from one pass over V
            dq = tl.zeros([C, BK], dtype=tl.float32)
            dscores = tl.zeros([C, C], dtype=tl.float32)
            dscores_t = tl.zeros([C, C], dtype=tl.float32)
            for i_v in range(0, tl.cdiv(dv, BV)):
                vcols = i_v * BV + tl.arange(0, BV)
                do = _load_tile(do_ptr + h * dv, rows, row_mask, heads * dv, vcols, dv)
                v = _load_tile(v_ptr + hk * dv, rows, row_mask, kv_heads * dv, vcols, dv)
                state = _state_tile(h_ptr, state_base, kcols, vcols, dk, dv)
                if MODE == 0:
                    dq += tl.dot(do, tl.trans(state.to(do.dtype)), input_precision=PRECISION)
                else:
                    dq += tl.dot(do.to(tl.float32), tl.trans(state), input_precision=F32_PRECISION)
                dscores += tl.dot(do, tl.trans(v), input_precision=PRECISION)
                dscores_t += tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dq = dq * scale
            dscores = tl.where(causal, dscores * scale, 0.0)
            dscores_t = tl.where(causal_t, dscores_t * scale, 0.0)
            if MODE == 0:
                dq += tl.dot(dscores.to(k.dtype), k, input_precision=PRECISION)
                dk_acc += tl.dot(dscores_t.to(q.dtype), q, input_precision=PRECISION)
            if MODE == 1:
                dq = dq * tl.exp(b)[:, None]
                dq += tl.dot(dscores * pair, kf, input_precision=F32_PRECISION)
                dk_acc += tl.dot(dscores_t * pair_t, q.to(tl.float32), input_precision=F32_PRECISION)
            if MODE == 2:
                dq = dq * tl.exp(b)
                dq += lower_apply(dscores, kf, b, C, SUB, F32_PRECISION, PATH, STRONG_PRECISION)
                dk_acc += upper_apply(dscores_t, q.to(tl.float32), b, C, SUB, F32_PRECISION, PATH,
                                      STRONG_PRECISION)
            q_dq += q.to(tl.float32) * dq
            offs = rows.to(tl.int64)[:, None] * (heads * dk) + h * dk + kcols[None, :]
            mask = row_mask[:, None] & (kcols < dk)[None, :]
            tl.store(dq_ptr + offs, dq.to(dq_ptr.dtype.element_ty), mask=mask)
    dk_end = tl.zeros([C, BK], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(dv, BV)):
        vcols = i_v * BV + tl.arange(0, BV)
        v = _load_tile(v_ptr + hk * dv, rows, row_mask, kv_heads * dv, vcols, dv)
        dstate = _state_tile(dh_ptr, state_base, kcols, vcols, dk, dv)
        if MODE == 0:
            dk_end += tl.dot(v, tl.trans(dstate.to(v.dtype)), input_precision=PRECISION)
        else:
            dk_end += tl.dot(v.to(tl.float32), tl.trans(dstate), input_precision=F32_PRECISION)
    if MODE == 1:
        dk_end = dk_end * tl.exp(to_end)[:, None]
    if MODE == 2:
        if SPLIT:  # recomputed here (g reloaded) rather than kept live through the heads loop
            b_again, to_end, b_last = chunk_log_decay(g_ptr, rows, row_mask, hk, kv_heads, kcols, dk, MODE, CONST, GATE)
        dk_end = dk_end * tl.exp(to_end)
    dk_acc += dk_end
    offs = rows.to(tl.int64)[:, None] * (kv_heads * dk) + hk * dk + kcols[None, :]
    mask = row_mask[:, None] & (kcols < dk)[None, :]
    tl.store(dk_ptr + offs, dk_acc.to(dk_ptr.dtype.element_ty), mask=mask)
    if MODE == 1:  # one number per row and K tile: the scalar decay's gradient sums over K anyway
        n_k = tl.num_programs(1)
        dlog_offs = (rows.to(tl.int64) * kv_heads + hk) * n_k + i_k
        tl.store(dlog_ptr + dlog_offs, tl.sum(q_dq - kf * dk_acc, axis=1), mask=row_mask)
    if MODE == 2:
        tl.store(dlog_ptr + offs, q_dq - kf * dk_acc, mask=mask)


@triton.jit
def _chunk_dqk_hoisted_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    g_ptr,
    h_ptr,
    dh_ptr,
    dq_ptr,
    dk_ptr,
    dlog_ptr,
    flags_ptr,
    bounds_ptr,
    chunk_start_ptr,
    table_ptr,
    n_seqs,
    T,
    heads,
    kv_heads,
    dk,
    dv,
    scale,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    VARLEN: tl.constexpr,
    GATE: tl.constexpr,
    PRECISION: tl.constexpr,
    F32_PRECISION: tl.constexpr,
    ONE_V: tl.constexpr,
):
    """The vector decay's dq (per q head), dk and log-decay gradient terms of one chunk, K tile and kv head
    when the chunk's log-decay spreads by at most LIMIT in this K tile (`_chunk_dqk_kernel`'s whole-chunk form,
    the same products and precisions); flags_ptr gets 0 there, else 1 and nothing else is written.

    The decay factors depend on the kv head only: exp(b - top) and exp(top - b) are computed once and serve
    every q head's four in-chunk factors and the state term's exp(b) (per-column rescales by exp(top),
    exp(top - bot) cancel out of the upper form), so the q-head loop has no exp.
    """
    i_c, i_k, hk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq, local = chunk_of_program(i_c, table_ptr, T, C, VARLEN)
    if seq >= n_seqs:
        return
    rows, row_mask, group = chunk_rows(seq, local, bounds_ptr, chunk_start_ptr, T, heads, kv_heads, C, VARLEN)
    kcols = i_k * BK + tl.arange(0, BK)
    b, to_end, top, whole = hoisted_decay(g_ptr, rows, row_mask, hk, kv_heads, kcols, dk, GATE)
    tl.store(_tile_flag(flags_ptr, i_c, i_k, hk, kv_heads), tl.where(whole, 0, 1))
    if whole:
        idx = tl.arange(0, C)
        causal = idx[:, None] >= idx[None, :]
        causal_t = idx[:, None] <= idx[None, :]
        # lower forms (reference top): exp(b_i - b_j) = down_i * up_j; upper forms (c >= r):
        # exp(b_c - b_r) = down_c * up_r, the same two factors (bot's rescales cancel)
        down = whole_chunk_down(b, top)  # <= 1
        up = whole_chunk_up(b, top)  # <= exp(LIMIT)
        k = _load_tile(k_ptr + hk * dk, rows, row_mask, kv_heads * dk, kcols, dk)
        keys = k.to(tl.float32) * up
        state_scale = scale * tl.exp(top)  # exp(b) = down * exp(top)
        state_base = (i_c.to(tl.int64) * kv_heads + hk) * dk * dv
        dk_acc = tl.zeros([C, BK], dtype=tl.float32)
        q_dq = tl.zeros([C, BK], dtype=tl.float32)
        if ONE_V:  # V in one tile: v and the state (kv head only) loaded once for all q heads
            vcols = tl.arange(0, BV)
            v = _load_tile(v_ptr + hk * dv, rows, row_mask, kv_heads * dv, vcols, dv)
            state = _state_tile(h_ptr, state_base, kcols, vcols, dk, dv)
        for j in range(0, group):
            h = hk * group + j
            if ONE_V:
                do = _load_tile(do_ptr + h * dv, rows, row_mask, heads * dv, vcols, dv)
                dq = tl.dot(do.to(tl.float32), tl.trans(state), input_precision=F32_PRECISION)
                dscores = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            else:
                dq = tl.zeros([C, BK], dtype=tl.float32)
                dscores = tl.zeros([C, C], dtype=tl.float32)
                for i_v in range(0, tl.cdiv(dv, BV)):
                    vcols = i_v * BV + tl.arange(0, BV)
                    do = _load_tile(do_ptr + h * dv, rows, row_mask, heads * dv, vcols, dv)
                    v = _load_tile(v_ptr + hk * dv, rows, row_mask, kv_heads * dv, vcols, dv)
                    state = _state_tile(h_ptr, state_base, kcols, vcols, dk, dv)
                    dq += tl.dot(do.to(tl.float32), tl.trans(state), input_precision=F32_PRECISION)
                    dscores += tl.dot(do, tl.trans(v), input_precision=PRECISION)
            dscores = tl.where(causal, dscores * scale, 0.0)
            dq = (dq * state_scale[None, :] + tl.dot(dscores, keys, input_precision=F32_PRECISION)) * down
            qf = _load_tile(q_ptr + h * dk, rows, row_mask, heads * dk, kcols, dk).to(tl.float32)
            q_dq += qf * dq
            offs = rows.to(tl.int64)[:, None] * (heads * dk) + h * dk + kcols[None, :]
            tl.store(dq_ptr + offs, dq.to(dq_ptr.dtype.element_ty), mask=row_mask[:, None] & (kcols < dk)[None, :])
            if ONE_V:
                dscores_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            else:
                dscores_t = tl.zeros([C, C], dtype=tl.float32)
                for i_v in range(0, tl.cdiv(dv, BV)):
                    vcols = i_v * BV + tl.arange(0, BV)
                    do = _load_tile(do_ptr + h * dv, rows, row_mask, heads * dv, vcols, dv)
                    v = _load_tile(v_ptr + hk * dv, rows, row_mask, kv_heads * dv, vcols, dv)
                    dscores_t += tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dscores_t = tl.where(causal_t, dscores_t * scale, 0.0)
            dk_acc += tl.dot(dscores_t, qf * down, input_precision=F32_PRECISION)
        dk_acc = dk_acc * up
        dk_end = tl.zeros([C, BK], dtype=tl.float32)
        for i_v in range(0, tl.cdiv(dv, BV)):
            vcols = i_v * BV + tl.arange(0, BV)
            if not ONE_V:
                v = _load_tile(v_ptr + hk * dv, rows, row_mask, kv_heads * dv, vcols, dv)
            dstate = _state_tile(dh_ptr, state_base, kcols, vcols, dk, dv)
            dk_end += tl.dot(v.to(tl.float32), tl.trans(dstate), input_precision=F32_PRECISION)
        # to_end and k recomputed / reloaded here rather than kept live through the q-head loop (registers)
        b, to_end, b_last = chunk_log_decay(g_ptr, rows, row_mask, hk, kv_heads, kcols, dk, 2, False, GATE)
        dk_acc += dk_end * tl.exp(to_end)
        offs = rows.to(tl.int64)[:, None] * (kv_heads * dk) + hk * dk + kcols[None, :]
        mask = row_mask[:, None] & (kcols < dk)[None, :]
        tl.store(dk_ptr + offs, dk_acc.to(dk_ptr.dtype.element_ty), mask=mask)
        kf = _load_tile(k_ptr + hk * dk, rows, row_mask, kv_heads * dk, kcols, dk).to(tl.float32)
        tl.store(dlog_ptr + offs, q_dq - kf * dk_acc, mask=mask)


@triton.jit
def _chunk_dv_kernel(
    q_ptr,
    k_ptr,
    do_ptr,
    g_ptr,
    dh_ptr,
    dv_ptr,
    flags_ptr,
    bounds_ptr,
    chunk_start_ptr,
    table_ptr,
    n_seqs,
    T,
    heads,
    kv_heads,
    dk,
    dv,
    scale,
    C: tl.constexpr,
    SUB: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    MODE: tl.constexpr,
    CONST: tl.constexpr,
    GATE: tl.constexpr,
    VARLEN: tl.constexpr,
    PRECISION: tl.constexpr,
    F32_PRECISION: tl.constexpr,
    PATH: tl.constexpr,
    FLAGGED: tl.constexpr,
):
    """dv of one chunk, V tile and kv head: the in-chunk part summed over the kv head's q heads, then the state
    term. FLAGGED: only the (chunk, V tile, kv head) that `_chunk_dv_hoisted_kernel` flagged (flags_ptr != 0)."""
    i_c, i_v, hk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq, local = chunk_of_program(i_c, table_ptr, T, C, VARLEN)
    if seq >= n_seqs:
        return
    if FLAGGED:
        flag = tl.load(_tile_flag(flags_ptr, i_c, i_v, hk, kv_heads))
        if flag == 0:
            return
    rows, row_mask, group = chunk_rows(seq, local, bounds_ptr, chunk_start_ptr, T, heads, kv_heads, C, VARLEN)
    vcols = i_v * BV + tl.arange(0, BV)
    idx = tl.arange(0, C)
    causal_t = idx[:, None] <= idx[None, :]
    dv_acc = tl.zeros([C, BV], dtype=tl.float32)
    for j in range(0, group):
        h = hk * group + j
        scores_t = tl.zeros([C, C], dtype=tl.float32)  # scores_t[j, i] = score of query i on key j
        for i_k in range(0, tl.cdiv(dk, BK)):
            kcols = i_k * BK + tl.arange(0, BK)
            q = _load_tile(q_ptr + h * dk, rows, row_mask, heads * dk, kcols, dk)
            k = _load_tile(k_ptr + hk * dk, rows, row_mask, kv_heads * dk, kcols, dk)
            if MODE == 2:
                b, to_end, b_last = chunk_log_decay(
                    g_ptr, rows, row_mask, hk, kv_heads, kcols, dk, MODE, CONST, GATE
                )
                scores_t += upper_scores(k.to(tl.float32), q.to(tl.float32), b, C, SUB, F32_PRECISION, PATH)
            else:
                scores_t += tl.dot(k, tl.trans(q), input_precision=PRECISION)
        if MODE == 1:
            b, to_end, b_last = chunk_log_decay(g_ptr, rows, row_mask, hk, kv_heads, vcols, dk, MODE, CONST, GATE)
            scores_t = scores_t * tl.exp(tl.where(causal_t, b[None, :] - b[:, None], float("-inf")))
        else:
            scores_t = tl.where(causal_t, scores_t, 0.0)
        do = _load_tile(do_ptr + h * dv, rows, row_mask, heads * dv, vcols, dv)
        dv_acc += tl.dot(scores_t.to(do.dtype), do, input_precision=PRECISION)
    dv_acc = dv_acc * scale
    state_base = (i_c.to(tl.int64) * kv_heads + hk) * dk * dv
    for i_k in range(0, tl.cdiv(dk, BK)):
        kcols = i_k * BK + tl.arange(0, BK)
        k = _load_tile(k_ptr + hk * dk, rows, row_mask, kv_heads * dk, kcols, dk)
        if MODE == 1:
            b, to_end, b_last = chunk_log_decay(g_ptr, rows, row_mask, hk, kv_heads, kcols, dk, MODE, CONST, GATE)
            k = (k * tl.exp(to_end)[:, None]).to(k.dtype)
        if MODE == 2:
            b, to_end, b_last = chunk_log_decay(g_ptr, rows, row_mask, hk, kv_heads, kcols, dk, MODE, CONST, GATE)
            k = (k * tl.exp(to_end)).to(k.dtype)
        dstate = _state_tile(dh_ptr, state_base, kcols, vcols, dk, dv).to(k.dtype)
        dv_acc += tl.dot(k, dstate, input_precision=PRECISION)
    offs = rows.to(tl.int64)[:, None] * (kv_heads * dv) + hk * dv + vcols[None, :]
    tl.store(
        dv_ptr + offs, dv_acc.to(dv_ptr.dtype.element_ty), mask=row_mask[:, None] & (vcols < dv)[None, :]
    )


@triton.jit
def _chunk_dv_hoisted_kernel(
    q_ptr,
    k_ptr,
    do_ptr,
    g_ptr,
    dh_ptr,
    dv_ptr,
    flags_ptr,
    bounds_ptr,
    chunk_start_ptr,
    table_ptr,
    n_seqs,
    T,
    heads,
    kv_heads,
    dk,
    dv,
    scale,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    VARLEN: tl.constexpr,
    GATE: tl.constexpr,
    PRECISION: tl.constexpr,
    F32_PRECISION: tl.constexpr,
    LOW_SCORES: tl.constexpr,
):
    """The vector decay's dv of one chunk, V tile and kv head when the chunk's log-decay spreads by at most
    LIMIT over all K columns (`_chunk_dv_kernel`'s whole-chunk form, the same products and precisions);
    flags_ptr gets 0 there, else 1 and nothing else is written. K in one tile (BK >= dk).

    The decay factors depend on the kv head only and are computed once for all its q heads: the in-chunk
    scores^T[r, c] = sum_k k_rk q_ck exp(b_ck - b_rk) (c >= r) = (k * up) (q * down)^T with down = exp(b - top)
    (<= 1) and up = exp(top - b) (<= exp(LIMIT)), and the state term's keys k * exp(b_last - b) (the suffix
    sum, as in `_chunk_dv_kernel`). The q-head loop has no exp, no cumsum and no reduction: a load of q and do,
    one multiply, the TF32 score product, the mask and the bf16 (input dtype) product with do.
    """
    i_c, i_v, hk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq, local = chunk_of_program(i_c, table_ptr, T, C, VARLEN)
    if seq >= n_seqs:
        return
    rows, row_mask, group = chunk_rows(seq, local, bounds_ptr, chunk_start_ptr, T, heads, kv_heads, C, VARLEN)
    kcols = tl.arange(0, BK)
    vcols = i_v * BV + tl.arange(0, BV)
    b, to_end, top, whole = hoisted_decay(g_ptr, rows, row_mask, hk, kv_heads, kcols, dk, GATE)
    tl.store(_tile_flag(flags_ptr, i_c, i_v, hk, kv_heads), tl.where(whole, 0, 1))
    if whole:
        idx = tl.arange(0, C)
        causal_t = idx[:, None] <= idx[None, :]
        down = whole_chunk_down(b, top)  # <= 1
        k = _load_tile(k_ptr + hk * dk, rows, row_mask, kv_heads * dk, kcols, dk)
        keys = k.to(tl.float32) * whole_chunk_up(b, top)  # k * up, <= exp(LIMIT) |k|
        if LOW_SCORES:  # `triton_gated.SCORE_OPERANDS`: the bf16 product's keys
            keys_low = keys.to(k.dtype)
        else:
            keys_low = keys
        # the state term's keys: k * exp(b_last - b) rounded to the input dtype, as in `_chunk_dv_kernel` (kept
        # live through the q-head loop in the input dtype rather than k and the float32 suffix sum)
        k_end = (k * tl.exp(to_end)).to(k.dtype)
        dv_acc = tl.zeros([C, BV], dtype=tl.float32)
        for j in range(0, group):
            h = hk * group + j
            q = _load_tile(q_ptr + h * dk, rows, row_mask, heads * dk, kcols, dk)
            # scores_t[r, c] = score of query c on key r (computed directly, not as a transposed product)
            if LOW_SCORES:
                scores_t = tl.dot(keys_low, tl.trans((q.to(tl.float32) * down).to(q.dtype)), input_precision=PRECISION)
            else:
                scores_t = tl.dot(keys, tl.trans(q.to(tl.float32) * down), input_precision=F32_PRECISION)
            scores_t = tl.where(causal_t, scores_t, 0.0)
            do = _load_tile(do_ptr + h * dv, rows, row_mask, heads * dv, vcols, dv)
            dv_acc += tl.dot(scores_t.to(do.dtype), do, input_precision=PRECISION)
        dv_acc = dv_acc * scale
        state_base = (i_c.to(tl.int64) * kv_heads + hk) * dk * dv
        dstate = _state_tile(dh_ptr, state_base, kcols, vcols, dk, dv).to(k.dtype)
        dv_acc += tl.dot(k_end, dstate, input_precision=PRECISION)
        offs = rows.to(tl.int64)[:, None] * (kv_heads * dv) + hk * dv + vcols[None, :]
        tl.store(
            dv_ptr + offs, dv_acc.to(dv_ptr.dtype.element_ty), mask=row_mask[:, None] & (vcols < dv)[None, :]
        )


@triton.jit
def _reverse_cumsum_kernel(
    x_ptr,
    carry_ptr,
    out_ptr,
    bounds_ptr,
    chunk_start_ptr,
    T,
    heads,
    feat,
    C: tl.constexpr,
    ROWS: tl.constexpr,
    BF: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """out_t = carry + sum_{s >= t} x_s within each sequence, ROWS rows per step from the end."""
    seq, hk, i_f = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos, first = sequence_rows(seq, bounds_ptr, chunk_start_ptr, T, C, VARLEN)
    cols = i_f * BF + tl.arange(0, BF)
    col_mask = cols < feat
    carry = tl.load(carry_ptr + (seq * heads + hk) * feat + cols, mask=col_mask, other=0.0)
    n_blocks = tl.cdiv(eos - bos, ROWS)
    for i in range(0, n_blocks):
        rows = bos + (n_blocks - 1 - i) * ROWS + tl.arange(0, ROWS)
        mask = (rows < eos)[:, None] & col_mask[None, :]
        offs = (rows.to(tl.int64) * heads + hk)[:, None] * feat + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        tl.store(out_ptr + offs, carry[None, :] + tl.cumsum(x, axis=0, reverse=True), mask=mask)
        carry += tl.sum(x, axis=0)


@triton.jit
def _chunk_sums_kernel(
    x_ptr,
    sums_ptr,
    bounds_ptr,
    chunk_start_ptr,
    table_ptr,
    n_seqs,
    T,
    width,
    C: tl.constexpr,
    BW: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """Parallel reverse cumsum, pass 1: sums[i_c] = the column sums of flat chunk i_c of x [rows, width]."""
    i_c, i_w = tl.program_id(0), tl.program_id(1)
    seq, local = chunk_of_program(i_c, table_ptr, T, C, VARLEN)
    if seq >= n_seqs:
        return
    bos, eos, first = sequence_rows(seq, bounds_ptr, chunk_start_ptr, T, C, VARLEN)
    rows = bos + local * C + tl.arange(0, C)
    cols = i_w * BW + tl.arange(0, BW)
    col_mask = cols < width
    offs = rows.to(tl.int64)[:, None] * width + cols[None, :]
    x = tl.load(x_ptr + offs, mask=(rows < eos)[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
    tl.store(sums_ptr + i_c.to(tl.int64) * width + cols, tl.sum(x, axis=0), mask=col_mask)


@triton.jit
def _chunk_reverse_cumsum_kernel(
    x_ptr,
    suffix_ptr,
    carry_ptr,
    out_ptr,
    bounds_ptr,
    chunk_start_ptr,
    table_ptr,
    n_seqs,
    T,
    width,
    C: tl.constexpr,
    BW: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """Parallel reverse cumsum, pass 2: chunk i_c's own reverse cumsum plus what follows it in its sequence,
    suffix[i_c + 1] (carry + the sums of the later chunks), or the carry for a sequence's last chunk."""
    i_c, i_w = tl.program_id(0), tl.program_id(1)
    seq, local = chunk_of_program(i_c, table_ptr, T, C, VARLEN)
    if seq >= n_seqs:
        return
    bos, eos, first = sequence_rows(seq, bounds_ptr, chunk_start_ptr, T, C, VARLEN)
    rows = bos + local * C + tl.arange(0, C)
    cols = i_w * BW + tl.arange(0, BW)
    col_mask = cols < width
    if local + 1 < tl.cdiv(eos - bos, C):
        after = tl.load(suffix_ptr + (i_c + 1).to(tl.int64) * width + cols, mask=col_mask, other=0.0)
    else:
        after = tl.load(carry_ptr + seq.to(tl.int64) * width + cols, mask=col_mask, other=0.0)
    offs = rows.to(tl.int64)[:, None] * width + cols[None, :]
    mask = (rows < eos)[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, after.to(tl.float32)[None, :] + tl.cumsum(x, axis=0, reverse=True), mask=mask)


def _sequential_reverse_cumsum(x, carry, chunks):
    """`reverse_cumsum` by `_reverse_cumsum_kernel`: one program per sequence, kv head and feature tile."""
    bounds, chunk_start, _, _, length = chunks.args(x)
    return _walk_reverse_cumsum(x, carry, bounds, chunk_start, chunks.n, length, chunks.chunk, chunks.varlen)


def _walk_reverse_cumsum(x, carry, bounds, chunk_start, n, length, chunk, varlen):
    _, heads, feat = x.shape
    out = new_empty(x.shape, dtype=torch.float32, device=x.device)
    bf = min(CUMSUM_TILE[1], next_power_of_2(feat))
    rows = max(16, CUMSUM_TILE[0] // bf)
    _reverse_cumsum_kernel[(n, heads, cdiv(feat, bf))](
        x,
        carry,
        out,
        bounds,
        chunk_start,
        length,
        heads,
        feat,
        C=chunk,
        ROWS=rows,
        BF=bf,
        VARLEN=varlen,
    )
    return out


def _parallel_reverse_cumsum(x, carry, chunks):
    """`reverse_cumsum` in three launches, none of which walks a sequence's rows: the column sums of every
    chunk (C rows of one sequence, `chunks`' table) in parallel; their reverse cumsum per sequence plus the
    carry, by `_reverse_cumsum_kernel` on the [chunks, width] sums with each sequence's chunk range as its
    bounds (1/C of the rows); then every chunk's own reverse cumsum plus the part after it, in parallel.
    Columns are kv heads x features, flattened."""
    width = x.shape[1] * x.shape[2]
    bw = min(CUMSUM_PARALLEL_COLS, next_power_of_2(width))
    bounds, chunk_start, table, n, length = chunks.args(x)
    grid = (chunks.max_chunks, cdiv(width, bw))
    common = dict(C=chunks.chunk, BW=bw, VARLEN=chunks.varlen)
    sums = new_empty((chunks.max_chunks, width), dtype=torch.float32, device=x.device)
    _chunk_sums_kernel[grid](x, sums, bounds, chunk_start, table, n, length, width, **common)
    # suffix[c] = carry + the sums of chunks c.. of c's sequence: sequence s covers flat chunks
    # chunk_start[s]:chunk_start[s + 1] (varlen) or s * NT:(s + 1) * NT (dense, NT chunks per sequence);
    # rows past the last real chunk (varlen's max_chunks is an upper bound) are neither read nor written
    suffix = _walk_reverse_cumsum(
        sums.view(-1, 1, width), carry, chunk_start, chunk_start, n, cdiv(length, chunks.chunk), 1, chunks.varlen
    ).view(-1, width)
    out = new_empty(x.shape, dtype=torch.float32, device=x.device)
    _chunk_reverse_cumsum_kernel[grid](x, suffix, carry, out, bounds, chunk_start, table, n, length, width, **common)
    return out


def reverse_cumsum(x, carry, chunks, parallel: bool):
    """out [rows, Hkv, F] float32: out_t = carry[n] + sum_{s >= t} x_s over the rows s of t's sequence n.

    x: float32 [B * T, Hkv, F] contiguous; carry: float32 [N, Hkv, F] contiguous; `chunks`: the sequences.
    """
    return (_parallel_reverse_cumsum if parallel else _sequential_reverse_cumsum)(x, carry, chunks)


def _log_decay_grad(dlog, final, d_final, g, decay, chunks, key_gate):
    """dg from dB = sum_g q * dq - k * dk ([B * T, Hkv, K]) and the final-state term, in g's dtype; under the key
    gate (key_gate > 0, g the raw keys) the gradient w.r.t. the log-decay, float32, in g's shape."""
    carry = (final * d_final).sum(-1)  # [N, Hkv, K]
    if decay != "vector":
        dlog, carry = dlog.sum(-1, keepdim=True), carry.sum(-1, keepdim=True)
    out = reverse_cumsum(dlog, carry.contiguous(), chunks, CUMSUM_PARALLEL)
    if decay == "constant":
        return out.sum((0, 2)).to(g.dtype)
    return out.view(g.shape) if key_gate else out.view(g.shape).to(g.dtype)


def chunk_backward(
    do: torch.Tensor,
    d_final_state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    decay: str,
    scale: float,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    saved: tuple[torch.Tensor, torch.Tensor] | None = None,
    key_gate: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (dq, dk, dv, dg, d_initial_state) of `triton_forward.chunk_forward`.

    saved: (h, final state) from `chunk_forward(..., save=True)`, used instead of recomputing them.
    key_gate > 0 (decay "vector"): g holds the raw keys, as in `chunk_forward`; dg is then the gradient w.r.t. the
    log-decay logsigmoid(g) / key_gate (float32, g's shape), not w.r.t. g (the op applies the gate's derivative)."""
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    d_final_state = d_final_state.float().contiguous()
    batch, length, heads, dk = q.shape
    kv_heads, dv = k.shape[2], v.shape[-1]
    prec, device = precision(q.dtype), q.device
    chunks, decay_kw = prepare(q, k, g, decay, cu_seqlens, key_gate)
    mode, const, gate = decay_kw["MODE"], decay_kw["CONST"], decay_kw["GATE"]
    if saved is None:  # chunk_forward(..., save=True) computes its kept states with this same call
        h, final = chunk_states(k, v, decay_kw, initial_state, chunks, wide=mode != 0)
    else:
        h, final = saved
    dh = new_empty(h.shape, dtype=torch.float32, device=device)
    dh0 = new_empty(final.shape, dtype=torch.float32, device=device)
    bounds, chunk_start, table, n, length = chunks.args(q)
    if mode in triton_forward.SCAN_MODES:  # chunk terms in parallel (float32 operands for dg), then the scan
        terms, decays = scan_terms(q, do, decay_kw, chunks, kv_heads, scale, query=True, wide=True)
        scan_states(terms, decays, mode, chunks, dh, d_final_state, dh0, reverse=True)
    else:
        bk, bv = block(dk, DSTATE_TILES[0]), block(dv, DSTATE_TILES[1])
        _chunk_dstates_kernel[(chunks.n * kv_heads, cdiv(dk, bk), cdiv(dv, bv))](
            q,
            do,
            decay_kw["g"],
            d_final_state,
            dh,
            dh0,
            bounds,
            chunk_start,
            length,
            heads,
            kv_heads,
            dk,
            dv,
            scale,
            C=chunks.chunk,
            BK=bk,
            BV=bv,
            MODE=mode,
            CONST=const,
            GATE=gate,
            VARLEN=chunks.varlen,
            PRECISION=prec,
            F32_PRECISION=prec,
        )
    dq = new_empty(q.shape, dtype=q.dtype, device=device)
    dk_ = new_empty(k.shape, dtype=k.dtype, device=device)
    dv_ = new_empty(v.shape, dtype=v.dtype, device=device)
    common = dict(C=chunks.chunk, SUB=sub_chunk(chunks.chunk), MODE=mode, CONST=const, GATE=gate,
                  VARLEN=chunks.varlen)
    common.update(PRECISION=prec, F32_PRECISION=prec, PATH=triton_gated.path("backward"))
    hoisted = DQK_HOISTED and mode == 2 and common["PATH"] == 2
    if hoisted:
        bk, bv, warps = DQK_HOISTED_TILES
    else:
        bk, bv, warps = DQK_TILES_SMALL_K[mode] if dk <= DQK_SMALL_K and mode in DQK_TILES_SMALL_K else DQK_TILES[mode]
    bk, bv = block(dk, bk), block(dv, bv)
    # per key dim for "vector"; else summed over each K tile's columns in the kernel
    feat = dk if mode == 2 else cdiv(dk, bk)
    dlog = new_empty((batch * length, kv_heads, feat), dtype=torch.float32, device=device) if mode else q
    grid = (chunks.max_chunks, cdiv(dk, bk), kv_heads)
    flags = q
    if hoisted:  # the whole-chunk tiles; the rest flagged for `_chunk_dqk_kernel`
        flags = torch.empty(grid, dtype=torch.int32, device=device)
        _chunk_dqk_hoisted_kernel[grid](
            q, k, v, do, decay_kw["g"], h, dh, dq, dk_, dlog, flags, bounds, chunk_start, table, n, length, heads,
            kv_heads, dk, dv, scale, C=chunks.chunk, BK=bk, BV=bv, VARLEN=chunks.varlen, GATE=gate, PRECISION=prec,
            F32_PRECISION=prec, ONE_V=DQK_HOISTED_ONE_V and dv <= bv, num_warps=warps,
            **({} if DQK_HOISTED_MAXNREG is None else {"maxnreg": DQK_HOISTED_MAXNREG}),
        )
    _chunk_dqk_kernel[grid](
        q,
        k,
        v,
        do,
        decay_kw["g"],
        h,
        dh,
        dq,
        dk_,
        dlog,
        flags,
        bounds,
        chunk_start,
        table,
        n,
        length,
        heads,
        kv_heads,
        dk,
        dv,
        scale,
        BK=bk,
        BV=bv,
        SPLIT=mode == 2 and common["PATH"] != 0,
        STRONG_PRECISION=STRONG_GATE_PRECISION if prec == "tf32" and STRONG_GATE_PRECISION else prec,
        FLAGGED=hoisted,
        num_warps=warps,
        **common,
    )
    bk, bv, warps = DV_TILES[mode]
    dv_hoisted = DV_HOISTED and mode == 2 and common["PATH"] == 2 and dk <= min(DV_HOISTED_TILES[0], DV_HOISTED_MAX_K)
    if dv_hoisted:
        bv = dv_hoisted_bv(dk)
    bk, bv = block(dk, bk), block(dv, bv)
    grid = (chunks.max_chunks, cdiv(dv, bv), kv_heads)
    flags = q
    if dv_hoisted:  # the whole-chunk tiles; the rest flagged for `_chunk_dv_kernel`
        flags = torch.empty(grid, dtype=torch.int32, device=device)
        _chunk_dv_hoisted_kernel[grid](
            q, k, do, decay_kw["g"], dh, dv_, flags, bounds, chunk_start, table, n, length, heads, kv_heads, dk, dv,
            scale, C=chunks.chunk, BK=block(dk, DV_HOISTED_TILES[0]), BV=bv, VARLEN=chunks.varlen, GATE=gate,
            PRECISION=prec, F32_PRECISION=prec, LOW_SCORES=triton_gated.low_scores(q.dtype),
            num_warps=DV_HOISTED_TILES[2],
        )
    _chunk_dv_kernel[grid](
        q,
        k,
        do,
        decay_kw["g"],
        dh,
        dv_,
        flags,
        bounds,
        chunk_start,
        table,
        n,
        length,
        heads,
        kv_heads,
        dk,
        dv,
        scale,
        BK=bk,
        BV=bv,
        FLAGGED=dv_hoisted,
        num_warps=warps,
        **common,
    )
    dg = None if mode == 0 else _log_decay_grad(dlog, final, d_final_state, g, decay, chunks, key_gate)
    dh0 = None if initial_state is None else dh0.to(initial_state.dtype)
    return dq, dk_, dv_, dg, dh0
