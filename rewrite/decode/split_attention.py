"""A static decode step's attention over a full KV cache, cut along the cache's slots into equal parts.

The fused SDPA call of a one-token step over a cache [R, Hkv, S, D] hands the GPU R x Hkv pieces
of work, each reading one sequence's keys and values of one kv head over all S slots. When those
pieces outnumber the GPU's multiprocessors by less than a whole multiple, the busiest
multiprocessor runs as many of them as with more rows, so a routed block that runs 24 of 32 rows
takes as long as with 32 (docs/layer_skip.md, "Decode: where a partly skipped block's time goes").
Cut along the slots, the same work is R x Hkv x S / part pieces of `part` slots each, whose
count, and whose time when the step is bound by reading the cache, follows the running rows.

`SPLIT_SLOTS` turns it on (off by default: it rounds differently from the fused kernel and launches
more kernels; whether it is faster is for a GPU to measure, `benchmarks.layer_skip --split-slots`).
"""

from __future__ import annotations

import torch

SPLIT_SLOTS: int | None = None
"""Slots per part of a static one-token step's attention over a full KV cache; None: one fused SDPA call.
Read when a decode state is made (its capacity is rounded up to a multiple, so that the parts of every cache
are views) and when a step is captured or compiled."""


def part_slots() -> int | None:
    """The slots per part, or None when attention is not split."""
    if SPLIT_SLOTS is None:
        return None
    if not isinstance(SPLIT_SLOTS, int) or isinstance(SPLIT_SLOTS, bool) or SPLIT_SLOTS < 1:
        raise ValueError(f"split_attention.SPLIT_SLOTS must be a positive number of slots or None, got {SPLIT_SLOTS!r}")
    return SPLIT_SLOTS


def rounded_capacity(capacity: int) -> int:
    """`capacity` rounded up to a whole number of parts (unchanged when attention is not split)."""
    part = part_slots()
    return capacity if part is None else -(-capacity // part) * part


def split_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, scale: float | None, part: int
) -> torch.Tensor:
    """Attention of q [B, H, T, D] over keys / values [B, Hkv, S, D] (GQA, a whole cache: S a multiple
    of `part`, each [B, Hkv] block contiguous) where visible [B, 1, T, S] is True, as o [B, H, T, Dv].

    The scores of all S slots come from one matmul and one softmax (float32); the values are weighted
    part by part, as [B, Hkv, S / part] independent products of `part` slots, summed in float32.
    """
    batch, heads, count, dim = q.shape
    kv_heads, slots = keys.shape[1], keys.shape[2]
    if slots % part:
        raise ValueError(f"split attention: {slots} slots are not a whole number of parts of {part}")
    groups = heads // kv_heads
    rows = groups * count  # the query heads of one kv head attend together: the cache is never repeated
    grouped = q.reshape(batch, kv_heads, rows, dim)
    if groups > 1:
        visible = visible.expand(batch, groups, count, slots).reshape(batch, 1, rows, slots)
    scale = dim**-0.5 if scale is None else scale
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * scale  # [B, Hkv, rows, S]
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).to(values.dtype)
    parts = slots // part
    by_part = weights.unflatten(-1, (parts, part)).transpose(2, 3)  # [B, Hkv, parts, rows, part]
    out = torch.matmul(by_part, values.unflatten(2, (parts, part))).float().sum(2)  # [B, Hkv, rows, Dv]
    return out.to(q.dtype).reshape(batch, heads, count, values.shape[-1])
