"""Sliding-window decode step in Triton: one query per batch row over a ring-buffer KV cache.

Split-KV ("flash decoding"): programs run over (batch row x kv head, slice of cache slots); each
takes the G q heads that share its kv head as the rows of one tile, so k/v are read once per
group. Slot i is visible when i <= the query's position (see `reference.py`). The partial
results (normalised output and log-sum-exp per slice) are merged with a log-sum-exp weighting.
"""

import torch
import triton
import triton.language as tl

from rewrite.kernels.launch_math import next_power_of_2, slot_splits

from ..alloc import new_empty
from ..online_softmax import online_softmax_finish, online_softmax_start, online_softmax_update
from .triton_forward import LOG2E, check_dtype, head_block, precision

BLOCK_N = 64
TARGET_PROGRAMS = 256  # split programs to aim for: enough to fill a GPU


@triton.jit
def _decode_kernel(
    q_ptr, kc_ptr, vc_ptr, pos_ptr, o_ptr, lse_ptr,
    slots, heads, kv_heads, dk, dv, qk_scale, slots_per_split, n_splits,
    BG: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):
    i_bh, i_s = tl.program_id(0), tl.program_id(1)
    b, hk = i_bh // kv_heads, i_bh % kv_heads
    group = heads // kv_heads
    g = tl.arange(0, BG)
    g_mask = g < group
    head = hk * group + g
    kcols, vcols = tl.arange(0, BK), tl.arange(0, BV)
    q_offs = (b.to(tl.int64) * heads + head)[:, None] * dk + kcols[None, :]
    q = tl.load(q_ptr + q_offs, mask=g_mask[:, None] & (kcols < dk)[None, :], other=0.0)
    t = tl.load(pos_ptr + b).to(tl.int32)
    first = i_s * slots_per_split
    last = tl.minimum(tl.minimum(first + slots_per_split, t + 1), slots)
    acc, m_i, l_i = online_softmax_start(BG, BV)
    for start in range(first, last, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_mask = keys < last
        rows = (b.to(tl.int64) * slots + keys) * kv_heads + hk
        k = tl.load(kc_ptr + rows[:, None] * dk + kcols[None, :], mask=key_mask[:, None] & (kcols < dk)[None, :],
                    other=0.0)
        v = tl.load(vc_ptr + rows[:, None] * dv + vcols[None, :], mask=key_mask[:, None] & (vcols < dv)[None, :],
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(key_mask[None, :], s, float("-inf"))
        acc, m_i, l_i = online_softmax_update(acc, m_i, l_i, s, v, PRECISION)
    o, lse2 = online_softmax_finish(acc, m_i, l_i)
    part = (b.to(tl.int64) * heads + head) * n_splits + i_s
    o_mask = g_mask[:, None] & (vcols < dv)[None, :]
    tl.store(o_ptr + part[:, None] * dv + vcols[None, :], o, mask=o_mask)
    lse = tl.where(l_i > 0, lse2 / 1.4426950408889634, float("-inf"))
    tl.store(lse_ptr + part, lse, mask=g_mask)


def sliding_window_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor, scale: float
) -> torch.Tensor:
    """o [B, 1, H, V] for q [B, 1, H, K] over caches [B, S, Hkv, D] (slots <= positions[b] visible)."""
    check_dtype(q)
    q, k_cache, v_cache = q.contiguous(), k_cache.contiguous(), v_cache.contiguous()
    batch, _, heads, dk = q.shape
    slots, kv_heads, dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[-1]
    n_splits, per_split = slot_splits(slots, batch * kv_heads, block=BLOCK_N, target=TARGET_PROGRAMS)
    o_part = new_empty((batch, heads, n_splits, dv), dtype=torch.float32, device=q.device)
    lse_part = new_empty((batch, heads, n_splits), dtype=torch.float32, device=q.device)
    group = heads // kv_heads
    _decode_kernel[(batch * kv_heads, n_splits)](
        q, k_cache, v_cache, positions.contiguous(), o_part, lse_part,
        slots, heads, kv_heads, dk, dv, scale * LOG2E, per_split, n_splits,
        BG=max(16, next_power_of_2(group)), BLOCK_N=BLOCK_N, BK=head_block(dk), BV=head_block(dv),
        PRECISION=precision(q.dtype),
    )
    weights = torch.softmax(lse_part, dim=-1)  # exp(lse_s - logsumexp(lse)); empty slices weigh 0
    o = (weights[..., None] * o_part).sum(2)
    return o[:, None].to(q.dtype)
