"""Chunked linear attention forward in Triton (causal); see `chunked_reference.py` for the math.

States at every chunk start, then outputs (parallel over chunks, q heads and V tiles). Without
a decay the states come from one kernel, sequential over the chunks of one sequence; with a decay
from two: every chunk's own term in parallel, then a sequential scan that only decays and adds. Chunks are 64 tokens for every decay kind. The in-chunk decay cumsum is computed inside
each kernel from g (no extra pass). Decay modes: 0 none, 1 per-head scalar (constant and
scalar), 2 per key dim (vector; in-chunk products through `triton_gated`).

Never feed `tl.trans` of a `tl.dot` result to another `tl.dot`: triton 3.4-3.7.0 miscompiles
that on Hopper (wrong values; flash-linear-attention issue 640). Transposed score matrices are
computed directly as their own products instead.
"""

import torch
import triton
import triton.language as tl

from rewrite.kernels.launch_math import cdiv, next_power_of_2

from ..alloc import new_empty
from . import triton_gated
from .triton_common import (
    Chunks,
    block,
    check_head_dims,
    chunk_log_decay,
    chunk_of_program,
    chunk_rows,
    hoisted_decay,
    sequence_rows,
    whole_chunk_down,
    whole_chunk_up,
)
from .triton_gated import lower_scores, sub_chunk

DECAY_MODE = {"none": 0, "constant": 1, "scalar": 1, "vector": 2}
CHUNK = 64
# launch shapes, per decay mode: (BK, BV, num_warps) of the output kernel; (BK, BV) of the states kernel
OUTPUT_TILES = {0: (64, 64, 4), 1: (64, 64, 4), 2: (32, 64, 4)}
STATE_TILES = (64, 32)
# decay modes whose states are chunk terms in parallel, then a sequential scan (v4); the others use
# the single sequential kernel of v3. (BK, BV) tiles of the scan, warps of the chunk-term kernel.
SCAN_MODES = (2,)
SCAN_TILES = (64, 32)
# smaller scan tiles when SCAN_TILES leave the scan fewer than SCAN_MIN_PROGRAMS programs (sequences x kv heads x
# tiles): H100, H=32 / Hkv=8 / K=V=64, B=1, 32K (16 programs at 64x32): fwd 0.97 vs 1.16 ms, fwd+bwd 4.96 vs 5.45
# with 32x16 and SCAN_GROUP 4; H200, H=16 / K=V=128 (128 programs): fwd 2.06 (64x32) vs 2.47 ms (32x16) at 32K
SCAN_TILES_FEW = (32, 16)
SCAN_MIN_PROGRAMS = 128
TERM_WARPS = 8
# the scan's K tiles one `_chunk_contrib_kernel` program computes (a power of two): 1, or more to load each chunk's values (and, for
# the backward's state gradients, its output gradients) once for several K tiles, with fewer, larger programs
CONTRIB_K_TILES = 1
# software-pipelining stages of `_chunk_contrib_kernel` (None: Triton's default, 3). Its only loop runs over the q heads
# of a kv head (once without GQA), so the extra stages are shared-memory buffers with nothing to overlap: sm_90
# compile (triton 3.9, K = V = 128, 64-row K tiles, 8 warps) 147 registers and 96 KB shared at the default (one
# program per multiprocessor), 128 registers and 48 KB at 1 stage (two)
TERM_STAGES = None
# v7: chunks per load of the scan. 1: `_chunk_scan_kernel` (one chunk's term loaded one
# step ahead: each step waits about one memory latency, ~1 us on the H100, which is the whole scan's time when
# it has few programs, e.g. 16 at 8 kv heads and K = V = 64). G > 1: `_chunk_scan_group_kernel` loads the
# terms and decays of G chunks (2, or 4 for any G > 2) at once, a group ahead, so a sequence of n chunks waits
# about n / G latencies.
SCAN_GROUP = 4  # H200, H=16 / K=V=128, 64x32 tiles: fwd+bwd 3.25 vs 3.47 ms at 8K, 11.50 vs 11.94 at 32K (G 1)
SCAN_GROUP_WARPS = 8  # sm_90 compile (triton 3.9), G 4, tiles 64x32: 217 registers at 8 warps, 255 + 568 B spill at 4
# v11 (NOTES.md): the vector decay's outputs in two launches when the in-chunk products take the whole-chunk form
# (triton_gated PATH 2). `_chunk_output_hoisted_kernel`, one program per (chunk, V tile, kv head) with K in one
# tile, computes the chunk's decay factors, the decayed keys, v and the state tile once and loops over the q heads
# of the kv head (no exp, no reduction in the loop); chunks whose log-decay spreads past LIMIT in some key dim are
# flagged and `_chunk_output_kernel` computes them as before (its programs for unflagged chunks return at once).
# Read at every call. H100, H=32 / Hkv=8 / K=V=64: the output kernel 0.155 -> 0.106 + 0.011 ms at 8K, fwd 0.945 ->
# 0.765 ms at 32K. K above OUTPUT_HOISTED_MAX_K keeps `_chunk_output_kernel` alone: 64 by default, the K checked on a
# GPU (2026-12-06); up to 128 passes the interpreter tests and waits for `test_cuda_output_hoisted_bfloat16_against_float64`.
OUTPUT_HOISTED = True
OUTPUT_HOISTED_TILES = (64, 8)  # (BV, num_warps) of the hoisted kernel; BK is K's power of two
OUTPUT_HOISTED_MAX_K = 64
# forward-only calls (nothing kept for a backward) store the states before each chunk in q's dtype, which is what
# the output kernels round them to anyway: at 32K, B=1, H=16, K=V=128 in bfloat16, 268 instead of 537 MB written
# by the scan and read by the output kernel. Read at every call; False stores float32 as before.
STATES_IN_INPUT_DTYPE = True


@triton.jit
def _load_tile(ptr, rows, row_mask, row_stride, cols, n_cols):
    offs = rows.to(tl.int64)[:, None] * row_stride + cols[None, :]
    return tl.load(ptr + offs, mask=row_mask[:, None] & (cols < n_cols)[None, :], other=0.0)


@triton.jit
def _chunk_states_kernel(
    k_ptr,
    v_ptr,
    g_ptr,
    h0_ptr,
    h_ptr,
    ht_ptr,
    bounds_ptr,
    chunk_start_ptr,
    T,
    kv_heads,
    dk,
    dv,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    MODE: tl.constexpr,
    CONST: tl.constexpr,
    GATE: tl.constexpr,
    HAS_H0: tl.constexpr,
    VARLEN: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDE: tl.constexpr,
    F32_PRECISION: tl.constexpr,
):
    i_nh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq, hk = i_nh // kv_heads, i_nh % kv_heads
    bos, eos, first = sequence_rows(seq, bounds_ptr, chunk_start_ptr, T, C, VARLEN)
    kcols = i_k * BK + tl.arange(0, BK)
    vcols = i_v * BV + tl.arange(0, BV)
    state_offs = kcols[:, None] * dv + vcols[None, :]
    state_mask = (kcols < dk)[:, None] & (vcols < dv)[None, :]
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        state += tl.load(h0_ptr + i_nh.to(tl.int64) * dk * dv + state_offs, mask=state_mask, other=0.0)
    for c in range(0, tl.cdiv(eos - bos, C)):
        tl.store(
            h_ptr + ((first + c).to(tl.int64) * kv_heads + hk) * dk * dv + state_offs,
            state.to(h_ptr.dtype.element_ty),
            mask=state_mask,
        )
        rows = bos + c * C + tl.arange(0, C)
        row_mask = rows < eos
        k = _load_tile(k_ptr + hk * dk, rows, row_mask, kv_heads * dk, kcols, dk)
        v = _load_tile(v_ptr + hk * dv, rows, row_mask, kv_heads * dv, vcols, dv)
        if MODE == 0:
            state += tl.dot(tl.trans(k), v, input_precision=PRECISION)
        else:
            b, to_end, b_last = chunk_log_decay(g_ptr, rows, row_mask, hk, kv_heads, kcols, dk, MODE, CONST, GATE)
            if MODE == 1:
                k = k * tl.exp(to_end)[:, None]
                state = state * tl.exp(b_last)
            else:
                k = k * tl.exp(to_end)
                state = state * tl.exp(b_last)[:, None]
            if WIDE:  # float32 operands: states for the backward, where dg needs them exact
                state += tl.dot(tl.trans(k), v.to(tl.float32), input_precision=F32_PRECISION)
            else:
                state += tl.dot(tl.trans(k.to(v.dtype)), v, input_precision=PRECISION)
    tl.store(ht_ptr + i_nh.to(tl.int64) * dk * dv + state_offs, state, mask=state_mask)


@triton.jit
def _chunk_contrib_kernel(
    x_ptr,
    y_ptr,
    g_ptr,
    d_ptr,
    a_ptr,
    bounds_ptr,
    chunk_start_ptr,
    table_ptr,
    n_seqs,
    n_chunks,
    T,
    x_heads,
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
    SK: tl.constexpr,
    SV: tl.constexpr,
    QUERY: tl.constexpr,
    WIDE: tl.constexpr,
    PRECISION: tl.constexpr,
    F32_PRECISION: tl.constexpr,
):
    """One chunk's own term of the state recurrence, for every chunk at once, and its decay.

    D_c = scale * sum over the kv head's group of (x * exp(f))^T y on a [BK, V] tile, with f the
    decay to the chunk end (keys, QUERY False) or from the chunk start (queries, QUERY True);
    a_c = exp(b_last), the whole chunk's decay ([K] per kv head, or one number for MODE 1).
    D is stored tile-major, [Hkv, K tiles, V tiles, chunks, SK, SV] in the scan's [SK, SV] tiles: the scan reads
    it contiguously. A program's K tile (BK) holds one or more of the scan's (SK); its V tile all of V.
    """
    i_c, i_k, hk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq, local = chunk_of_program(i_c, table_ptr, T, C, VARLEN)
    if seq >= n_seqs:
        return
    bos, eos, first = sequence_rows(seq, bounds_ptr, chunk_start_ptr, T, C, VARLEN)
    rows = bos + local * C + tl.arange(0, C)
    row_mask = rows < eos
    kcols = i_k * BK + tl.arange(0, BK)
    vcols = tl.arange(0, BV)
    b, to_end, b_last = chunk_log_decay(g_ptr, rows, row_mask, hk, kv_heads, kcols, dk, MODE, CONST, GATE)
    if QUERY:
        factor = tl.exp(b)
    else:
        factor = tl.exp(to_end)
    group = x_heads // kv_heads
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    for j in range(0, group):
        h = hk * group + j
        x = _load_tile(x_ptr + h * dk, rows, row_mask, x_heads * dk, kcols, dk)
        y = _load_tile(y_ptr + h * dv, rows, row_mask, x_heads * dv, vcols, dv)
        if MODE == 1:
            xd = x * factor[:, None]
        else:
            xd = x * factor
        if WIDE:  # float32 operands (TF32 for 16-bit inputs): the backward's dg needs them
            acc += tl.dot(tl.trans(xd), y.to(tl.float32), input_precision=F32_PRECISION)
        else:
            acc += tl.dot(tl.trans(xd.to(y.dtype)), y, input_precision=PRECISION)
    base = i_c.to(tl.int64) * kv_heads + hk
    # the scan's [SK, SV] tiles: this program's K tile is BK / SK rows of them (BV >= dv)
    n_sk, n_sv = tl.cdiv(dk, SK), tl.cdiv(dv, SV)
    i_sk, i_sv = kcols // SK, vcols // SV
    tile = (((hk * n_sk + i_sk)[:, None] * n_sv + i_sv[None, :]).to(tl.int64) * n_chunks + i_c) * (SK * SV)
    offs = tile + (kcols % SK)[:, None] * SV + (vcols % SV)[None, :]
    tl.store(d_ptr + offs, acc * scale, mask=(kcols < n_sk * SK)[:, None] & (vcols < n_sv * SV)[None, :])
    if MODE == 1:
        if i_k == 0:
            tl.store(a_ptr + base, tl.exp(b_last))
    else:
        tl.store(a_ptr + base * dk + kcols, tl.exp(b_last), mask=kcols < dk)


@triton.jit
def _chunk_scan_kernel(
    d_ptr,
    a_ptr,
    h_ptr,
    init_ptr,
    final_ptr,
    bounds_ptr,
    chunk_start_ptr,
    n_chunks_all,
    T,
    kv_heads,
    dk,
    dv,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    MODE: tl.constexpr,
    HAS_INIT: tl.constexpr,
    REVERSE: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """h[c] = S, then S = a_c * S + D_c, over the chunks of one sequence in order (or reversed), with
    the chunk terms D from `_chunk_contrib_kernel`; S starts at init (or zero) and ends in final.
    The next chunk's term and decay are loaded one step ahead, so the loop waits on no load."""
    i_nh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq, hk = i_nh // kv_heads, i_nh % kv_heads
    bos, eos, first = sequence_rows(seq, bounds_ptr, chunk_start_ptr, T, C, VARLEN)
    kcols = i_k * BK + tl.arange(0, BK)
    vcols = i_v * BV + tl.arange(0, BV)
    tile = kcols[:, None] * dv + vcols[None, :]
    mask = (kcols < dk)[:, None] & (vcols < dv)[None, :]
    local_offs = tl.arange(0, BK)[:, None] * BV + tl.arange(0, BV)[None, :]
    d_base = ((hk * tl.cdiv(dk, BK) + i_k) * tl.cdiv(dv, BV) + i_v).to(tl.int64) * n_chunks_all + first
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_INIT:
        state += tl.load(init_ptr + i_nh.to(tl.int64) * dk * dv + tile, mask=mask, other=0.0)
    n_chunks = tl.cdiv(eos - bos, C)
    if REVERSE:
        c = n_chunks - 1
        step = -1
    else:
        c = n_chunks * 0
        step = 1
    if MODE == 1:  # one decay per chunk, read into every row of the tile
        a_step, a_cols = kv_heads, kcols * 0
    else:
        a_step, a_cols = kv_heads * dk, kcols
    a_base = hk.to(tl.int64) * (a_step // kv_heads) + a_cols
    # masks as integer comparisons (0 or 1 chunks left to read): the interpreter rejects scalar-bool masks
    left = tl.minimum(n_chunks, 1)
    term = tl.load(d_ptr + (d_base + c) * (BK * BV) + local_offs, mask=local_offs < left * (BK * BV), other=0.0)
    decay = tl.load(a_ptr + (first + c).to(tl.int64) * a_step + a_base, mask=kcols < left * dk, other=0.0)
    for i in range(0, n_chunks):
        nxt = c + step
        left = tl.minimum(tl.maximum(n_chunks - 1 - i, 0), 1)
        next_term = tl.load(d_ptr + (d_base + nxt) * (BK * BV) + local_offs, mask=local_offs < left * (BK * BV),
                            other=0.0)
        next_decay = tl.load(a_ptr + (first + nxt).to(tl.int64) * a_step + a_base, mask=kcols < left * dk, other=0.0)
        tl.store(h_ptr + ((first + c).to(tl.int64) * kv_heads + hk) * dk * dv + tile,
                 state.to(h_ptr.dtype.element_ty), mask=mask)
        state = state * decay[:, None] + term
        term = next_term
        decay = next_decay
        c = nxt
    tl.store(final_ptr + i_nh.to(tl.int64) * dk * dv + tile, state, mask=mask)


@triton.jit
def _scan_load(d_ptr, a_ptr, d_base, local_offs, first, a_step, a_base, kcols, dk, n_chunks, step,
               BK: tl.constexpr, BV: tl.constexpr, REVERSE: tl.constexpr):
    """(term [BK, BV], decay [BK]) of the chunk at `step` of the scan; past the last chunk a zero term and
    a decay of one, so the state passes through."""
    if REVERSE:
        c = n_chunks - 1 - step
    else:
        c = step
    # masks as integer comparisons (a tensor on each side): the interpreter rejects scalar-bool masks
    left = tl.minimum(tl.maximum(n_chunks - step, 0), 1)
    term = tl.load(d_ptr + (d_base + c) * (BK * BV) + local_offs, mask=local_offs < left * (BK * BV), other=0.0)
    decay = tl.load(a_ptr + (first + c).to(tl.int64) * a_step + a_base, mask=kcols < left * dk, other=1.0)
    return term, decay


@triton.jit
def _scan_step(state, term, decay, h_ptr, first, kv_heads, hk, dk, dv, tile, mask, n_chunks, step,
               REVERSE: tl.constexpr):
    """Store the state before the chunk at `step` (nothing past the last chunk) and return the state after it."""
    if REVERSE:
        c = n_chunks - 1 - step
    else:
        c = step
    live = tl.minimum(tl.maximum(n_chunks - step, 0), 1)
    tl.store(h_ptr + ((first + c).to(tl.int64) * kv_heads + hk) * dk * dv + tile, state.to(h_ptr.dtype.element_ty),
             mask=mask & (tile * 0 < live))
    return state * decay[:, None] + term


@triton.jit
def _chunk_scan_group_kernel(
    d_ptr,
    a_ptr,
    h_ptr,
    init_ptr,
    final_ptr,
    bounds_ptr,
    chunk_start_ptr,
    n_chunks_all,
    T,
    kv_heads,
    dk,
    dv,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    G: tl.constexpr,
    MODE: tl.constexpr,
    HAS_INIT: tl.constexpr,
    REVERSE: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """`_chunk_scan_kernel` with the terms and decays of G (2 or 4) chunks loaded together, a group ahead:
    the sequential loop waits on one memory latency per G chunks instead of one per chunk. Each chunk's
    term is its own [BK, BV] load (same layout as the state: no layout conversion, no extraction)."""
    i_nh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq, hk = i_nh // kv_heads, i_nh % kv_heads
    bos, eos, first = sequence_rows(seq, bounds_ptr, chunk_start_ptr, T, C, VARLEN)
    kcols = i_k * BK + tl.arange(0, BK)
    vcols = i_v * BV + tl.arange(0, BV)
    tile = kcols[:, None] * dv + vcols[None, :]
    mask = (kcols < dk)[:, None] & (vcols < dv)[None, :]
    local_offs = tl.arange(0, BK)[:, None] * BV + tl.arange(0, BV)[None, :]
    d_base = ((hk * tl.cdiv(dk, BK) + i_k) * tl.cdiv(dv, BV) + i_v).to(tl.int64) * n_chunks_all + first
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_INIT:
        state += tl.load(init_ptr + i_nh.to(tl.int64) * dk * dv + tile, mask=mask, other=0.0)
    n_chunks = tl.cdiv(eos - bos, C)
    if MODE == 1:  # one decay per chunk, read into every row of the tile
        a_step, a_cols = kv_heads, kcols * 0
    else:
        a_step, a_cols = kv_heads * dk, kcols
    a_base = hk.to(tl.int64) * (a_step // kv_heads) + a_cols
    t0, d0 = _scan_load(d_ptr, a_ptr, d_base, local_offs, first, a_step, a_base, kcols, dk, n_chunks, 0, BK, BV,
                        REVERSE)
    t1, d1 = _scan_load(d_ptr, a_ptr, d_base, local_offs, first, a_step, a_base, kcols, dk, n_chunks, 1, BK, BV,
                        REVERSE)
    if G == 4:
        t2, d2 = _scan_load(d_ptr, a_ptr, d_base, local_offs, first, a_step, a_base, kcols, dk, n_chunks, 2, BK,
                            BV, REVERSE)
        t3, d3 = _scan_load(d_ptr, a_ptr, d_base, local_offs, first, a_step, a_base, kcols, dk, n_chunks, 3, BK,
                            BV, REVERSE)
    for i in range(0, tl.cdiv(n_chunks, G)):
        s = i * G
        n0, e0 = _scan_load(d_ptr, a_ptr, d_base, local_offs, first, a_step, a_base, kcols, dk, n_chunks, s + G,
                            BK, BV, REVERSE)
        n1, e1 = _scan_load(d_ptr, a_ptr, d_base, local_offs, first, a_step, a_base, kcols, dk, n_chunks,
                            s + G + 1, BK, BV, REVERSE)
        if G == 4:
            n2, e2 = _scan_load(d_ptr, a_ptr, d_base, local_offs, first, a_step, a_base, kcols, dk, n_chunks,
                                s + G + 2, BK, BV, REVERSE)
            n3, e3 = _scan_load(d_ptr, a_ptr, d_base, local_offs, first, a_step, a_base, kcols, dk, n_chunks,
                                s + G + 3, BK, BV, REVERSE)
        state = _scan_step(state, t0, d0, h_ptr, first, kv_heads, hk, dk, dv, tile, mask, n_chunks, s, REVERSE)
        state = _scan_step(state, t1, d1, h_ptr, first, kv_heads, hk, dk, dv, tile, mask, n_chunks, s + 1, REVERSE)
        if G == 4:
            state = _scan_step(state, t2, d2, h_ptr, first, kv_heads, hk, dk, dv, tile, mask, n_chunks, s + 2,
                               REVERSE)
            state = _scan_step(state, t3, d3, h_ptr, first, kv_heads, hk, dk, dv, tile, mask, n_chunks, s + 3,
                               REVERSE)
            t2, d2, t3, d3 = n2, e2, n3, e3
        t0, d0, t1, d1 = n0, e0, n1, e1
    tl.store(final_ptr + i_nh.to(tl.int64) * dk * dv + tile, state, mask=mask)


@triton.jit
def _chunk_output_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    h_ptr,
    o_ptr,
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
    """o of one chunk, V tile and q head. FLAGGED: only the (chunk, kv head) that `_chunk_output_hoisted_kernel`
    flagged (flags_ptr [chunks, Hkv] != 0); the other programs return at once."""
    i_c, i_v, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq, local = chunk_of_program(i_c, table_ptr, T, C, VARLEN)
    if seq >= n_seqs:
        return
    hk = i_h // (heads // kv_heads)
    if FLAGGED:
        flag = tl.load(flags_ptr + i_c * kv_heads + hk)
        if flag == 0:
            return
    rows, row_mask, group = chunk_rows(seq, local, bounds_ptr, chunk_start_ptr, T, heads, kv_heads, C, VARLEN)
    vcols = i_v * BV + tl.arange(0, BV)
    causal = tl.arange(0, C)[:, None] >= tl.arange(0, C)[None, :]
    o = tl.zeros([C, BV], dtype=tl.float32)
    scores = tl.zeros([C, C], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(dk, BK)):
        kcols = i_k * BK + tl.arange(0, BK)
        q = _load_tile(q_ptr + i_h * dk, rows, row_mask, heads * dk, kcols, dk)
        k = _load_tile(k_ptr + hk * dk, rows, row_mask, kv_heads * dk, kcols, dk)
        state_offs = ((i_c.to(tl.int64) * kv_heads + hk) * dk + kcols[:, None]) * dv + vcols[None, :]
        state_mask = (kcols < dk)[:, None] & (vcols < dv)[None, :]
        state = tl.load(h_ptr + state_offs, mask=state_mask, other=0.0).to(q.dtype)
        if MODE == 2:
            b, to_end, b_last = chunk_log_decay(g_ptr, rows, row_mask, hk, kv_heads, kcols, dk, MODE, CONST, GATE)
            part, qd = lower_scores(q.to(tl.float32), k.to(tl.float32), b, C, SUB, F32_PRECISION, PATH)
            scores += part
            o += tl.dot(qd.to(q.dtype), state, input_precision=PRECISION)
        else:
            o += tl.dot(q, state, input_precision=PRECISION)
            scores += tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if MODE == 1:
        b, to_end, b_last = chunk_log_decay(g_ptr, rows, row_mask, hk, kv_heads, vcols, dk, MODE, CONST, GATE)
        o = o * tl.exp(b)[:, None]
        scores = scores * tl.exp(tl.where(causal, b[:, None] - b[None, :], float("-inf")))
    else:
        scores = tl.where(causal, scores, 0.0)
    v = _load_tile(v_ptr + hk * dv, rows, row_mask, kv_heads * dv, vcols, dv)
    o += tl.dot(scores.to(v.dtype), v, input_precision=PRECISION)
    offs = rows.to(tl.int64)[:, None] * (heads * dv) + i_h * dv + vcols[None, :]
    tl.store(
        o_ptr + offs, (o * scale).to(o_ptr.dtype.element_ty), mask=row_mask[:, None] & (vcols < dv)[None, :]
    )


@triton.jit
def _chunk_output_hoisted_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    h_ptr,
    o_ptr,
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
    """The vector decay's o for every q head of one kv head, on one chunk and V tile, K in one tile (BK >= dk),
    when the chunk's log-decay spreads by at most LIMIT in every key dim: `_chunk_output_kernel`'s whole-chunk
    form with the same products and operand precisions. flags_ptr [chunks, Hkv] gets 0 there (from the first V
    tile's program), else 1 and no o is written.

    Kv-head-only work once per program: g's cumsum, the whole-chunk test, down = exp(b - top) (<= 1), the keys
    k * exp(top - b), exp(top) (the state term's exp(b) = down * exp(top)), v and the state tile. Per q head:
    o = ((q * down * exp(top)) h + causal((q * down) keys^T) v) * scale, no exp and no reduction.
    """
    i_c, i_v, hk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq, local = chunk_of_program(i_c, table_ptr, T, C, VARLEN)
    if seq >= n_seqs:
        return
    rows, row_mask, group = chunk_rows(seq, local, bounds_ptr, chunk_start_ptr, T, heads, kv_heads, C, VARLEN)
    kcols = tl.arange(0, BK)
    vcols = i_v * BV + tl.arange(0, BV)
    b, to_end, top, whole = hoisted_decay(g_ptr, rows, row_mask, hk, kv_heads, kcols, dk, GATE)
    if i_v == 0:
        tl.store(flags_ptr + i_c * kv_heads + hk, tl.where(whole, 0, 1))
    if whole:
        causal = tl.arange(0, C)[:, None] >= tl.arange(0, C)[None, :]
        down = whole_chunk_down(b, top)
        k = _load_tile(k_ptr + hk * dk, rows, row_mask, kv_heads * dk, kcols, dk)
        keys = k.to(tl.float32) * whole_chunk_up(b, top)
        if LOW_SCORES:  # `triton_gated.SCORE_OPERANDS`: the bf16 product's keys
            keys_low = keys.to(k.dtype)
        else:
            keys_low = keys
        state_top = tl.exp(top)
        v = _load_tile(v_ptr + hk * dv, rows, row_mask, kv_heads * dv, vcols, dv)
        state_offs = ((i_c.to(tl.int64) * kv_heads + hk) * dk + kcols[:, None]) * dv + vcols[None, :]
        state_mask = (kcols < dk)[:, None] & (vcols < dv)[None, :]
        state = tl.load(h_ptr + state_offs, mask=state_mask, other=0.0).to(q_ptr.dtype.element_ty)
        o_mask = row_mask[:, None] & (vcols < dv)[None, :]
        for j in range(0, group):
            h = hk * group + j
            q = _load_tile(q_ptr + h * dk, rows, row_mask, heads * dk, kcols, dk)
            qs = q.to(tl.float32) * down
            if LOW_SCORES:
                scores = tl.dot(qs.to(q.dtype), tl.trans(keys_low), input_precision=PRECISION)
            else:
                scores = tl.dot(qs, tl.trans(keys), input_precision=F32_PRECISION)
            scores = tl.where(causal, scores, 0.0)
            o = tl.dot((qs * state_top[None, :]).to(q.dtype), state, input_precision=PRECISION)
            o += tl.dot(scores.to(v.dtype), v, input_precision=PRECISION)
            offs = rows.to(tl.int64)[:, None] * (heads * dv) + h * dv + vcols[None, :]
            tl.store(o_ptr + offs, (o * scale).to(o_ptr.dtype.element_ty), mask=o_mask)


def precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact float32 for float32 inputs (no TF32)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def decay_args(g: torch.Tensor | None, decay: str, dummy: torch.Tensor, key_gate: float = 0.0) -> dict:
    """g as the kernels read it (no copy for contiguous g) and its mode flags. key_gate > 0 (decay "vector"
    only): g holds the raw keys and the kernels compute the log-decay logsigmoid(g) / key_gate themselves
    (`triton_common.chunk_log_decay`'s GATE)."""
    if key_gate and decay != "vector":
        raise ValueError(f'linear_attention: the in-kernel key gate needs decay "vector", got {decay!r}')
    return {
        "g": dummy if g is None else g.contiguous(),
        "MODE": DECAY_MODE[decay],
        "CONST": decay == "constant",
        "GATE": float(key_gate),
    }


def prepare(q, k, g, decay, cu_seqlens, key_gate=0.0):
    """(chunks, decay arguments) for the chunked kernels."""
    batch, length, _, dk = q.shape
    check_head_dims(dk, k.shape[-1])
    return Chunks(batch, length, cu_seqlens, CHUNK, q.device), decay_args(g, decay, q, key_gate)


def chunk_states(k, v, decay_kw, initial_state, chunks, state_dtype=torch.float32, wide=False):
    """(states before every chunk [chunks, Hkv, K, V] in state_dtype, final states [N, Hkv, K, V] float32).

    wide: decayed keys enter the products as float32 (TF32 for 16-bit inputs), not rounded to k's dtype.
    With a decay, every chunk's own term is computed in parallel first (`_chunk_contrib_kernel`) and
    only the decay-and-add runs sequentially (`_chunk_scan_kernel`). Either way the running state is float32;
    state_dtype is only what h is stored in.
    """
    kv_heads, dk, dv = k.shape[2], k.shape[-1], v.shape[-1]
    bounds, chunk_start, table, n, length = chunks.args(k)
    mode = decay_kw["MODE"]
    if mode in SCAN_MODES:
        h = new_empty((chunks.max_chunks, kv_heads, dk, dv), dtype=state_dtype, device=k.device)
        ht = new_empty((chunks.n, kv_heads, dk, dv), dtype=torch.float32, device=k.device)
        terms, decays = scan_terms(k, v, decay_kw, chunks, kv_heads, 1.0, query=False, wide=wide)
        scan_states(terms, decays, mode, chunks, h, initial_state, ht, reverse=False)
        return h, ht
    h = new_empty((chunks.max_chunks, kv_heads, dk, dv), dtype=state_dtype, device=k.device)
    ht = new_empty((chunks.n, kv_heads, dk, dv), dtype=torch.float32, device=k.device)
    bk, bv = block(dk, STATE_TILES[0]), block(dv, STATE_TILES[1])
    grid = (chunks.n * kv_heads, cdiv(dk, bk), cdiv(dv, bv))
    _chunk_states_kernel[grid](
        k,
        v,
        decay_kw["g"],
        initial_state.contiguous() if initial_state is not None else ht,
        h,
        ht,
        bounds,
        chunk_start,
        length,
        kv_heads,
        dk,
        dv,
        C=chunks.chunk,
        BK=bk,
        BV=bv,
        MODE=mode,
        CONST=decay_kw["CONST"],
        GATE=decay_kw["GATE"],
        HAS_H0=initial_state is not None,
        VARLEN=chunks.varlen,
        PRECISION=precision(k.dtype),
        WIDE=wide,
        F32_PRECISION=precision(k.dtype),
    )
    return h, ht


def scan_tiles(heads: int, dk: int, dv: int) -> tuple[int, int]:
    """(BK, BV) of the scan's tiles for `heads` (sequences x kv heads) states of [dk, dv]."""
    bk, bv = block(dk, SCAN_TILES[0]), block(dv, SCAN_TILES[1])
    if heads * cdiv(dk, bk) * cdiv(dv, bv) >= SCAN_MIN_PROGRAMS:
        return bk, bv
    return block(dk, SCAN_TILES_FEW[0]), block(dv, SCAN_TILES_FEW[1])


def scan_terms(x, y, decay_kw, chunks, kv_heads, scale, *, query, wide):
    """(every chunk's own state term in the scan's tile-major layout, see `_chunk_contrib_kernel`;
    the per-chunk decays a [chunks, Hkv, K or 1] float32), both for `scan_states`."""
    dk, dv = x.shape[-1], y.shape[-1]
    mode = decay_kw["MODE"]
    bk, bv = scan_tiles(chunks.n * kv_heads, dk, dv)
    n_k, n_v = cdiv(dk, bk), cdiv(dv, bv)
    terms = new_empty((kv_heads * n_k * n_v, chunks.max_chunks, bk, bv), dtype=torch.float32, device=x.device)
    shape = (chunks.max_chunks, kv_heads, dk if mode == 2 else 1)
    decays = new_empty(shape, dtype=torch.float32, device=x.device)
    bounds, chunk_start, table, n, length = chunks.args(x)
    full_v = max(bv, next_power_of_2(dv))
    per_program = min(CONTRIB_K_TILES, n_k)  # the scan's K tiles a program computes
    _chunk_contrib_kernel[(chunks.max_chunks, cdiv(n_k, per_program), kv_heads)](
        x,
        y,
        decay_kw["g"],
        terms,
        decays,
        bounds,
        chunk_start,
        table,
        n,
        chunks.max_chunks,
        length,
        x.shape[2],
        kv_heads,
        dk,
        dv,
        float(scale),
        C=chunks.chunk,
        BK=bk * per_program,
        BV=full_v,
        MODE=mode,
        CONST=decay_kw["CONST"],
        GATE=decay_kw["GATE"],
        VARLEN=chunks.varlen,
        SK=bk,
        SV=bv,
        QUERY=query,
        WIDE=wide,
        PRECISION=precision(x.dtype),
        F32_PRECISION=precision(x.dtype),
        num_warps=TERM_WARPS,
        **({} if TERM_STAGES is None else {"num_stages": TERM_STAGES}),
    )
    return terms, decays


def scan_states(terms, decays, mode, chunks, h, init, final, *, reverse):
    """Fill h [chunks, Hkv, K, V] with the running state before each chunk (after it, when reverse)."""
    kv_heads, dk, dv = h.shape[1:]
    bounds, chunk_start, _, _, length = chunks.args(h)
    bk, bv = terms.shape[-2:]
    grid = (chunks.n * kv_heads, cdiv(dk, bk), cdiv(dv, bv))
    args = (terms, decays, h, final if init is None else init.contiguous(), final, bounds, chunk_start,
            chunks.max_chunks, length, kv_heads, dk, dv)
    kw = dict(C=chunks.chunk, BK=bk, BV=bv, MODE=mode, HAS_INIT=init is not None, REVERSE=reverse,
              VARLEN=chunks.varlen)
    if SCAN_GROUP > 1:
        _chunk_scan_group_kernel[grid](*args, G=2 if SCAN_GROUP == 2 else 4, num_warps=SCAN_GROUP_WARPS, **kw)
    else:
        _chunk_scan_kernel[grid](*args, **kw)


def chunk_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    decay: str,
    scale: float,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    save: bool = False,
    key_gate: float = 0.0,
) -> tuple[torch.Tensor, ...]:
    """Causal chunked linear attention: (o [B, T, H, V] in q's dtype, final state [N, Hkv, K, V] float32).

    save: also return the states before every chunk, h [chunks, Hkv, K, V] float32, for the backward
    (`triton_backward.chunk_backward(..., saved=(h, final))`). They are then computed as the backward's
    recompute computes them (`wide` with a decay: float32 operands, for dg), so the gradients are unchanged
    by keeping them; the outputs come from those states (a rounding-level difference from save=False).
    key_gate > 0 (decay "vector"): g holds the raw keys [B, T, Hkv, K] and the log-decay is
    logsigmoid(g) / key_gate, computed inside the kernels.
    """
    if q.dtype == torch.float64:
        raise ValueError("linear_attention: the Triton kernels take float32/float16/bfloat16, got float64")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    batch, length, heads, dk = q.shape
    kv_heads, dv = k.shape[2], v.shape[-1]
    chunks, decay_kw = prepare(q, k, g, decay, cu_seqlens, key_gate)
    mode = decay_kw["MODE"]
    # the backward's recompute is chunk_states(..., wide=mode != 0) (triton_backward.chunk_backward)
    # the output kernels round the states to q's dtype before their product, so a forward that does not keep them
    # may store them so (`STATES_IN_INPUT_DTYPE`): the same outputs bit for bit, half the states' bytes for 16-bit q
    state_dtype = q.dtype if STATES_IN_INPUT_DTYPE and not save else torch.float32
    h, ht = chunk_states(k, v, decay_kw, initial_state, chunks, state_dtype, wide=save and mode != 0)
    o = new_empty((batch, length, heads, dv), dtype=q.dtype, device=q.device)
    bounds, chunk_start, table, n, length = chunks.args(q)
    path = triton_gated.path("forward")
    prec = precision(q.dtype)
    hoisted = OUTPUT_HOISTED and mode == 2 and path == 2 and dk <= OUTPUT_HOISTED_MAX_K
    flags = q
    if hoisted:  # the whole-chunk chunks; the rest flagged for `_chunk_output_kernel`
        bv, warps = OUTPUT_HOISTED_TILES
        bk, bv = max(16, next_power_of_2(dk)), block(dv, bv)
        flags = torch.empty((chunks.max_chunks, kv_heads), dtype=torch.int32, device=q.device)
        _chunk_output_hoisted_kernel[(chunks.max_chunks, cdiv(dv, bv), kv_heads)](
            q, k, v, decay_kw["g"], h, o, flags, bounds, chunk_start, table, n, length, heads, kv_heads, dk, dv,
            scale, C=chunks.chunk, BK=bk, BV=bv, VARLEN=chunks.varlen, GATE=decay_kw["GATE"], PRECISION=prec,
            F32_PRECISION=prec, LOW_SCORES=triton_gated.low_scores(q.dtype), num_warps=warps,
        )
    bk, bv, warps = OUTPUT_TILES[mode]
    bk, bv = block(dk, bk), block(dv, bv)
    grid = (chunks.max_chunks, cdiv(dv, bv), heads)
    _chunk_output_kernel[grid](
        q,
        k,
        v,
        decay_kw["g"],
        h,
        o,
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
        C=chunks.chunk,
        SUB=sub_chunk(chunks.chunk),
        BK=bk,
        BV=bv,
        MODE=mode,
        CONST=decay_kw["CONST"],
        GATE=decay_kw["GATE"],
        VARLEN=chunks.varlen,
        PRECISION=prec,
        F32_PRECISION=prec,
        PATH=path,
        FLAGGED=hoisted,
        num_warps=warps,
    )
    return (o, ht, h) if save else (o, ht)
