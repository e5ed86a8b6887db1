"""Sliding-window attention through PyTorch's FlexAttention: a block mask built from the window, then
`torch.nn.attention.flex_attention` (compiled on CUDA, eager elsewhere).

Same arguments, layout and visibility rule as `sliding_window_attention` (see `reference.py`). The
block mask lists, for every 128-query block, the key blocks that hold a visible key (partial blocks,
where the mask function runs) and those where every key is visible (full blocks, no mask function);
FlexAttention skips every other block, so time grows with T * window, not T^2. The block mask is
built from block bounds only (never a [T, T] mask) and kept for the next call with the same
(device, T, window, sinks, lookahead, cu_seqlens).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .op import sliding_window_op

BLOCK_SIZE = 128
"""Query and key block size of the block mask (FlexAttention's default sparse block)."""

_CACHE_ENTRIES = 16
_block_masks: OrderedDict[tuple, BlockMask] = OrderedDict()
_compiled_flex_attention: Callable[..., Any] | None = None


def _flex_kernel(device: torch.device) -> Callable[..., Any]:
    """flex_attention compiled once (static shapes: each new T or window compiles its own kernels) on CUDA.

    Elsewhere the eager flex_attention: on the CPU it forms the full score matrix (small inputs only), and
    PyTorch has no CPU backward for it.
    """
    global _compiled_flex_attention
    if device.type != "cuda":
        return flex_attention
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex_attention


def _sequence_tables(cu_seqlens: torch.Tensor, padded: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence id, start of its sequence) of every position in [0, padded); positions past the last
    sequence get id -1 (so they share no sequence with a real position) and start 0."""
    bounds = cu_seqlens.to(device=device, dtype=torch.int64)
    positions = torch.arange(padded, device=device)
    ids = torch.searchsorted(bounds, positions, right=True) - 1  # empty sequences are never chosen
    inside = positions < bounds[-1]
    ids = torch.where(inside, ids, -1)
    starts = torch.where(inside, bounds[ids.clamp(0, bounds.numel() - 2)], 0)
    return ids.to(torch.int32), starts.to(torch.int32)


def _mask_function(
    length: int, window: int, sinks: int, lookahead: int, tables: tuple[torch.Tensor, torch.Tensor] | None
) -> Callable[..., torch.Tensor]:
    """FlexAttention mask_mod: True where query q_idx sees key kv_idx (global positions)."""
    if tables is None:
        def visible(b, h, q_idx, kv_idx):
            not_ahead = kv_idx <= q_idx + lookahead
            near = q_idx - kv_idx < window
            keep = not_ahead & ((near | (kv_idx < sinks)) if sinks else near)
            return keep & (kv_idx < length) if lookahead else keep

        return visible

    ids, starts = tables

    def visible_packed(b, h, q_idx, kv_idx):
        # in one sequence, local offsets differ as global ones do; only the sink test needs local positions
        keep = (ids[q_idx] == ids[kv_idx]) & (kv_idx <= q_idx + lookahead)
        near = q_idx - kv_idx < window
        return keep & ((near | (kv_idx - starts[kv_idx] < sinks)) if sinks else near)

    return visible_packed


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count per row, column indices with the listed ones first in ascending order) of a 0/1 block matrix."""
    blocks = blocks.to(torch.int32)
    counts = blocks.sum(-1, dtype=torch.int32)
    indices = torch.argsort(blocks, dim=-1, descending=True, stable=True).to(torch.int32)
    return counts.contiguous(), indices.contiguous()


def block_classes(
    length: int,
    window: int,
    sinks: int,
    lookahead: int,
    tables: tuple[torch.Tensor, torch.Tensor] | None,
    block_size: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) boolean [n, n] matrices over (query block, key block), n = ceil(length / block_size).

    full: the block lies inside [0, length) and every query in it sees every key. partial: not full,
    and some query may see some key (exact without packing; with packing it may list a block whose
    only shared sequence has no visible pair, which costs time, not correctness).
    """
    n = -(-length // block_size)
    first = torch.arange(n, device=device) * block_size
    last = torch.clamp(first + block_size, max=length) - 1  # last real position of each block
    inside = first + block_size <= length
    q_first, q_last, k_first, k_last = first[:, None], last[:, None], first[None, :], last[None, :]
    # band t - window < s <= t + lookahead: offsets s - t of a block pair span [k_first - q_last, k_last - q_first]
    band_any = (k_first - q_last <= lookahead) & (k_last - q_first > -window)
    band_all = (k_first - q_last > -window) & (k_last - q_first <= lookahead)
    if tables is None:
        meets = one_sequence = torch.ones(n, n, dtype=torch.bool, device=device)
        lowest_local, highest_local = k_first, k_last
    else:
        ids, starts = (t.long() for t in tables)
        id_first, id_last = ids[first], ids[last]
        meets = (id_first[:, None] <= id_last[None, :]) & (id_first[None, :] <= id_last[:, None])
        one_sequence = (id_first == id_last)[:, None] & (id_first == id_last)[None, :] & (
            id_first[:, None] == id_first[None, :])
        # a key block that starts a sequence inside it holds local position 0
        lowest_local = torch.where(id_first == id_last, first - starts[first], 0)[None, :]
        highest_local = (last - starts[last])[None, :]
    sink_any = (lowest_local < sinks) & (k_first <= q_last + lookahead)
    sink_all = (highest_local < sinks) & (k_last <= q_first + lookahead)
    full = inside[:, None] & inside[None, :] & one_sequence & (band_all | sink_all)
    partial = meets & (band_any | sink_any) & ~full
    return partial, full


def sliding_window_block_mask(
    length: int,
    window: int,
    sinks: int,
    lookahead: int,
    cu_seqlens: torch.Tensor | None,
    device: torch.device,
    block_size: int = BLOCK_SIZE,
) -> BlockMask:
    """The FlexAttention block mask (broadcast over batch and heads) of the sliding-window rule at length T."""
    n = -(-length // block_size)
    tables = None if cu_seqlens is None else _sequence_tables(cu_seqlens, n * block_size, device)
    partial, full = block_classes(length, window, sinks, lookahead, tables, block_size, device)
    partial_counts, partial_indices = _ordered(partial[None, None])
    full_counts, full_indices = _ordered(full[None, None])
    return BlockMask.from_kv_blocks(
        partial_counts, partial_indices, full_counts, full_indices,
        BLOCK_SIZE=(block_size, block_size),
        mask_mod=_mask_function(length, window, sinks, lookahead, tables),
        seq_lengths=(length, length),
    )


def cached_block_mask(
    length: int, window: int, sinks: int, lookahead: int, cu_seqlens: torch.Tensor | None, device: torch.device
) -> BlockMask:
    """`sliding_window_block_mask`, kept for the last few distinct arguments (cu_seqlens by value: one host read)."""
    packing = None if cu_seqlens is None else tuple(cu_seqlens.tolist())
    key = (str(device), length, window, sinks, lookahead, packing, BLOCK_SIZE)
    mask = _block_masks.get(key)
    if mask is None:
        mask = sliding_window_block_mask(length, window, sinks, lookahead, cu_seqlens, device)
        _block_masks[key] = mask
        if len(_block_masks) > _CACHE_ENTRIES:
            _block_masks.popitem(last=False)
    else:
        _block_masks.move_to_end(key)
    return mask


def flex_sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    *,
    sinks: int = 0,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    lookahead: int = 0,
) -> torch.Tensor:
    """`sliding_window_attention` (same arguments, layout and result) computed by FlexAttention.

    q [B, T, H, K], k [B, T, Hkv, K], v [B, T, Hkv, V] -> o [B, T, H, V]. Arguments are not checked
    (the public function checks them). On CUDA the compiled FlexAttention kernels run (forward and
    backward); each new T, window, sinks or lookahead (and grad mode) compiles once, and past
    torch._dynamo's recompile limit Dynamo falls back to eager FlexAttention, which forms the full
    score matrix. On the CPU eager FlexAttention runs: forward only, small inputs.
    """
    length = q.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if length == 0:  # nothing to attend: the op's (empty) result, without a block mask of no blocks
        return sliding_window_op(q, k, v, window, sinks, scale, cu_seqlens, lookahead)[0]
    block_mask = cached_block_mask(length, window, sinks, lookahead, cu_seqlens, q.device)
    o = _flex_kernel(q.device)(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        block_mask=block_mask, scale=scale, enable_gqa=k.shape[2] != q.shape[2],
    )
    return o.transpose(1, 2).contiguous()
