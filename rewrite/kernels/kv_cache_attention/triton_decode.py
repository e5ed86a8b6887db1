"""Decode attention over a full KV cache in Triton: split-KV ("flash decoding") with GQA grouping.

Programs run over (batch row x kv head, slice of cache slots), so their count scales with the rows
that run (a layer-skip router that drops rows drops programs). Each program takes the G q heads that
share its kv head times the T new queries as the G*T rows of one tile, so k / v are read once per
group. Slot s is visible to query t of row b when visible[b, 0, t, s] (and, with `last_slot`, s is not after it:
the slots after the last query's are not read at all, so an unfilled cache tail costs nothing, the way a
cache_seqlens bound does in other decode kernels); optionally a tile of slots that no query of the program sees is
skipped without loading k / v (SKIP_EMPTY_TILES).
Each slice writes its normalised partial output and log-sum-exp (base 2); a second kernel merges the
slices with a log-sum-exp weighting and writes o in q's dtype. A query that sees no slot gets zeros.
"""

import torch
import triton
import triton.language as tl

from rewrite.kernels.launch_math import dot_precision, head_tile, next_power_of_2, slot_splits

from ..alloc import new_empty
from ..fitting_blocks import launch_fitting
from ..online_softmax import LOG2E, online_softmax_finish, online_softmax_start, online_softmax_update

BLOCK_N = 128
TARGET_PROGRAMS = 256
"""Split programs to aim for. With 128-slot tiles and 256 programs (one slice per (row, kv head) at 32 rows x 8 kv
heads, more as rows drop), a 16K cache took 0.538 / 0.464 / 0.275 / 0.245 ms at 32 / 24 / 16 / 8 rows on an H100
against 0.543 / 0.480 / 0.335 / 0.245 for 64-slot tiles and 1024 programs, and a 16-layer batch-32 decode step
7.08 ms against 8.11 (BENCHMARKS.md, 2026-12-07, thirteenth session)."""
MAX_SPLITS = 64
MERGE_CHUNK = 16
NUM_WARPS = 4  # the split kernel's launch (Triton's defaults); sweep with `benchmarks.layer_skip --kv-kernel-variants`
NUM_STAGES = 3
SKIP_EMPTY_TILES = False
"""Skip the k / v loads of a tile no query sees (a data-dependent branch in the slot loop). Off since 2026-12-07: the
plain loop was faster at every row count of a full 16K cache on an H100 (0.453 / 0.261 ms at 32 / 16 rows against
0.518 / 0.304, BENCHMARKS.md); the decode sites pass `last_slot`, so an unfilled tail is not read either way."""
MASK_UNSEEN_KEYS = False
"""Without SKIP_EMPTY_TILES: load k / v only for the slots some query sees (masked loads, no branch in the loop)."""


@triton.jit
def _tile(q, k_base, v_base, keys, key_mask, seen, kcols, vcols, sk_s, sv_s, dk, dv, qk_scale, acc, m_i, l_i,
          PRECISION: tl.constexpr):
    """Online-softmax update of (acc, m_i, l_i) with one tile of BLOCK_N slots."""
    k = tl.load(k_base + keys[:, None].to(tl.int64) * sk_s + kcols[None, :],
                mask=key_mask[:, None] & (kcols < dk)[None, :], other=0.0)
    v = tl.load(v_base + keys[:, None].to(tl.int64) * sv_s + vcols[None, :],
                mask=key_mask[:, None] & (vcols < dv)[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    s = tl.where(seen, s, float("-inf"))
    return online_softmax_update(acc, m_i, l_i, s, v, PRECISION)


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, lse_ptr, last_ptr,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sm_b, sm_t, sm_s,
    slots, heads, kv_heads, count, dk, dv, qk_scale, slots_per_split, n_splits,
    BM: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
    SKIP_EMPTY: tl.constexpr, MASK_UNSEEN: tl.constexpr, HAS_LAST: tl.constexpr,
):
    i_bh, i_s = tl.program_id(0), tl.program_id(1)
    b, hk = (i_bh // kv_heads).to(tl.int64), (i_bh % kv_heads).to(tl.int64)
    group = heads // kv_heads
    r = tl.arange(0, BM)
    r_mask = r < group * count
    head = hk * group + r // count
    t = r % count
    kcols, vcols = tl.arange(0, BK), tl.arange(0, BV)
    q_offs = b * sq_b + head[:, None] * sq_h + t[:, None] * sq_t + kcols[None, :]
    q = tl.load(q_ptr + q_offs, mask=r_mask[:, None] & (kcols < dk)[None, :], other=0.0)
    k_base = k_ptr + b * sk_b + hk * sk_h
    v_base = v_ptr + b * sv_b + hk * sv_h
    m_base = m_ptr + b * sm_b + t[:, None] * sm_t
    first = i_s * slots_per_split
    last = tl.minimum(first + slots_per_split, slots)
    if HAS_LAST:  # no query sees a slot after the last query's: its keys are not read
        last = tl.minimum(last, tl.load(last_ptr).to(tl.int32) + 1)
    acc, m_i, l_i = online_softmax_start(BM, BV)
    for start in range(first, last, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_mask = keys < last
        seen = tl.load(m_base + keys[None, :].to(tl.int64) * sm_s, mask=r_mask[:, None] & key_mask[None, :], other=0)
        seen = seen != 0
        if SKIP_EMPTY:
            if tl.max(tl.max(seen.to(tl.int32), axis=1), axis=0) > 0:
                acc, m_i, l_i = _tile(q, k_base, v_base, keys, key_mask, seen, kcols, vcols, sk_s, sv_s, dk, dv,
                                      qk_scale, acc, m_i, l_i, PRECISION)
        else:
            load_mask = key_mask
            if MASK_UNSEEN:
                load_mask = key_mask & (tl.max(seen.to(tl.int32), axis=0) > 0)
            acc, m_i, l_i = _tile(q, k_base, v_base, keys, load_mask, seen, kcols, vcols, sk_s, sv_s, dk, dv,
                                  qk_scale, acc, m_i, l_i, PRECISION)
    o, lse = online_softmax_finish(acc, m_i, l_i)
    part = ((b * heads + head) * count + t) * n_splits + i_s
    tl.store(o_ptr + part[:, None] * dv + vcols[None, :], o, mask=r_mask[:, None] & (vcols < dv)[None, :])
    tl.store(lse_ptr + part, tl.where(l_i > 0, lse, float("-inf")), mask=r_mask)


@triton.jit
def _merge_kernel(
    o_part_ptr, lse_ptr, o_ptr, n_splits, dv,
    BS: tl.constexpr, CHUNK: tl.constexpr, BV: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # (b, head, t) flattened, as o [B, H, T, Dv] is laid out
    sp = tl.arange(0, BS)
    lse = tl.load(lse_ptr + row * n_splits + sp, mask=sp < n_splits, other=float("-inf"))
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(tl.exp2(lse - top), axis=0)
    vcols = tl.arange(0, BV)
    acc = tl.zeros([BV], dtype=tl.float32)
    for c in range(0, n_splits, CHUNK):
        cs = c + tl.arange(0, CHUNK)
        c_mask = cs < n_splits
        w = tl.exp2(tl.load(lse_ptr + row * n_splits + cs, mask=c_mask, other=float("-inf")) - top)
        part = tl.load(o_part_ptr + (row * n_splits + cs)[:, None] * dv + vcols[None, :],
                       mask=c_mask[:, None] & (vcols < dv)[None, :], other=0.0)
        acc += tl.sum(tl.where(c_mask[:, None], w[:, None] * part, 0.0), axis=0)
    o = acc / tl.where(total > 0, total, 1.0)
    tl.store(o_ptr + row * dv + vcols, o.to(o_ptr.dtype.element_ty), mask=vcols < dv)



def split_count(slots: int, programs: int) -> tuple[int, int]:
    """(slices, slots per slice) of the cache per (row, kv head): about TARGET_PROGRAMS programs in all, at most
    MAX_SPLITS slices, each a multiple of BLOCK_N slots."""
    return slot_splits(slots, programs, block=BLOCK_N, target=TARGET_PROGRAMS, most=MAX_SPLITS)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def kv_cache_attention_decode(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, scale: float,
    last_slot: torch.Tensor | None = None,
) -> torch.Tensor:
    """o [B, H, T, Dv] for q [B, H, T, D] over keys / values [B, Hkv, S, D|Dv] (any strides) where visible
    (bool, broadcastable to [B, 1, T, S]) is True and the slot is not after `last_slot` ([1] integer, optional)."""
    if q.dtype == torch.float64:
        raise ValueError("kv_cache_attention: the Triton kernel takes float32/float16/bfloat16, got float64")
    q, keys, values = _unit_last(q), _unit_last(keys), _unit_last(values)
    batch, heads, count, dk = q.shape
    kv_heads, slots, dv = keys.shape[1], keys.shape[2], values.shape[-1]
    mask = visible.expand(batch, 1, count, slots).view(torch.uint8)
    o = new_empty((batch, heads, count, dv), dtype=q.dtype, device=q.device)
    if o.numel() == 0:
        return o
    n_splits, per_split = split_count(slots, batch * kv_heads)
    o_part = new_empty((batch, heads, count, n_splits, dv), dtype=torch.float32, device=q.device)
    lse_part = new_empty((batch, heads, count, n_splits), dtype=torch.float32, device=q.device)
    group = heads // kv_heads
    bk, bv = head_tile(dk, "kv_cache_attention"), head_tile(dv, "kv_cache_attention")

    def launch(blocks):  # BLOCK_N divides per_split at every size the fallback picks (powers of two <= BLOCK_N)
        bm, block_n, warps, stages = blocks
        _split_kernel[(batch * kv_heads, n_splits)](
            q, keys, values, mask, o_part, lse_part, mask if last_slot is None else last_slot,
            q.stride(0), q.stride(1), q.stride(2), keys.stride(0), keys.stride(1), keys.stride(2),
            values.stride(0), values.stride(1), values.stride(2), mask.stride(0), mask.stride(2), mask.stride(3),
            slots, heads, kv_heads, count, dk, dv, scale * LOG2E, per_split, n_splits,
            BM=bm, BLOCK_N=block_n, BK=bk, BV=bv, PRECISION=dot_precision(q.dtype), SKIP_EMPTY=SKIP_EMPTY_TILES,
            MASK_UNSEEN=MASK_UNSEEN_KEYS, HAS_LAST=last_slot is not None, num_warps=warps, num_stages=stages,
        )

    blocks = (max(16, next_power_of_2(group * count)), BLOCK_N, NUM_WARPS, NUM_STAGES)
    case = ("kv_cache_attention_split", blocks, bk, bv, q.dtype, last_slot is not None, SKIP_EMPTY_TILES,
            MASK_UNSEEN_KEYS, q.device)
    launch_fitting(case, blocks, launch, halve_m=False)  # BM holds every query row of a kv head
    _merge_kernel[(batch * heads * count,)](
        o_part, lse_part, o, n_splits, dv, BS=max(16, next_power_of_2(n_splits)), CHUNK=MERGE_CHUNK, BV=bv,
    )
    return o
