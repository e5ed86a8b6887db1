"""PyTorch reference of `rewrite::kv_cache_attention` (the CPU implementation): the SDPA formula with a boolean mask."""

import torch


def kv_cache_attention_reference(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, scale: float,
    last_slot: torch.Tensor | None = None,
) -> torch.Tensor:
    """o [B, H, T, Dv] = softmax(scale * q k^T masked by visible) v, the q heads of kv head j being j*G .. j*G+G-1.

    q [B, H, T, D], keys [B, Hkv, S, D], values [B, Hkv, S, Dv], visible bool broadcastable to [B, 1, T, S]. A
    query that sees no slot gets zeros (what SDPA gives for a fully masked row), not NaN. With `last_slot` ([1]
    integer), no query sees a slot after it.
    """
    batch, heads, count, dk = q.shape
    kv_heads, slots = keys.shape[1], keys.shape[2]
    groups = heads // kv_heads
    grouped = q.reshape(batch, kv_heads, groups, count, dk)
    scores = torch.einsum("bjgtd,bjsd->bjgts", grouped, keys) * scale
    mask = visible.expand(batch, 1, count, slots)
    if last_slot is not None:
        mask = mask & (torch.arange(slots, device=mask.device) <= last_slot.to(mask.device))
    mask = mask[:, :, None]  # [B, 1, 1, T, S]
    scores = scores.masked_fill(~mask, float("-inf"))
    top = scores.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp(scores - top)
    total = weights.sum(-1, keepdim=True)
    weights = weights / torch.where(total > 0, total, torch.ones_like(total))
    o = torch.einsum("bjgts,bjsv->bjgtv", weights, values)
    return o.reshape(batch, heads, count, values.shape[-1]).to(q.dtype)
