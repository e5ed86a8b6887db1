"""Sliding-window attention in plain PyTorch: the source of truth and the CPU implementation.

Inside one sequence (local positions), query t sees key s iff

    s <= t + lookahead  and  (t - s < window  or  s < sinks)

i.e. the last `window` keys (itself included), the next `lookahead` keys (0: causal) and the first
`sinks` tokens (those up to t + lookahead). With GQA, q head h
reads kv head h // (H / Hkv). o_t = softmax_s(scale * q_t . k_s) v_s; lse_t = logsumexp_s of the
same scores (float32, float64 for float64 inputs). Computes in float32 at least; o in q's dtype.
"""

import torch


def _sequences(q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> list[tuple[slice, slice]]:
    """(batch rows, token slice) of every run of sequences that can be processed together."""
    if cu_seqlens is None:
        return [(slice(None), slice(None))]
    bounds = cu_seqlens.tolist()
    return [(slice(0, 1), slice(s, e)) for s, e in zip(bounds, bounds[1:])]


def visible(length: int, window: int, sinks: int, device: torch.device, lookahead: int = 0) -> torch.Tensor:
    """Boolean [L, L] mask: entry (t, s) is True when query t sees key s."""
    t = torch.arange(length, device=device)[:, None]
    s = torch.arange(length, device=device)[None, :]
    return (s <= t + lookahead) & ((t - s < window) | (s < sinks))


def _expand(x: torch.Tensor, group: int) -> torch.Tensor:
    """[B, L, Hkv, D] -> [B, Hkv * G, L, D] (each kv head repeated for its G q heads)."""
    return x.transpose(1, 2).repeat_interleave(group, dim=1)


def _probabilities(q, k, window, sinks, scale, lookahead):
    """(P [B, H, L, L], lse [B, H, L]) for one run of equal-length sequences in the compute dtype."""
    group = q.shape[2] // k.shape[2]
    scores = scale * q.transpose(1, 2) @ _expand(k, group).transpose(-1, -2)
    scores = scores.masked_fill(~visible(q.shape[1], window, sinks, q.device, lookahead), float("-inf"))
    lse = scores.logsumexp(-1)
    return (scores - lse[..., None]).exp(), lse


def sliding_window_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    sinks: int,
    scale: float,
    cu_seqlens: torch.Tensor | None,
    lookahead: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, T, H, V] in q's dtype, lse [B, T, H]); q [B, T, H, K], k [B, T, Hkv, K], v [B, T, Hkv, V]."""
    compute = torch.promote_types(q.dtype, torch.float32)
    batch, length, heads, _ = q.shape
    group = heads // k.shape[2]
    o = torch.zeros(batch, length, heads, v.shape[-1], dtype=compute, device=q.device)
    lse = torch.zeros(batch, length, heads, dtype=compute, device=q.device)
    for rows, tokens in _sequences(q, cu_seqlens):
        qs, ks, vs = (x[rows, tokens].to(compute) for x in (q, k, v))
        if qs.shape[1] == 0:
            continue
        p, lse_s = _probabilities(qs, ks, window, sinks, scale, lookahead)
        o[rows, tokens] = (p @ _expand(vs, group)).transpose(1, 2)
        lse[rows, tokens] = lse_s.transpose(1, 2)
    return o.to(q.dtype), lse


def _fold(x: torch.Tensor, group: int) -> torch.Tensor:
    """[B, H, L, D] -> [B, L, Hkv, D], summing the G q heads that share a kv head."""
    batch, heads, length, dim = x.shape
    return x.view(batch, heads // group, group, length, dim).sum(2).transpose(1, 2)


def sliding_window_backward_reference(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    sinks: int,
    scale: float,
    cu_seqlens: torch.Tensor | None,
    lookahead: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of `sliding_window_reference`'s o given do.

    dP = dO V^T, dS = P * (dP - rowsum(dO * O)), dq = scale dS K, dk = scale dS^T Q, dv = P^T dO.
    """
    compute = torch.promote_types(q.dtype, torch.float32)
    group = q.shape[2] // k.shape[2]
    dq = torch.zeros(q.shape, dtype=compute, device=q.device)
    dk = torch.zeros(k.shape, dtype=compute, device=q.device)
    dv = torch.zeros(v.shape, dtype=compute, device=q.device)
    for rows, tokens in _sequences(q, cu_seqlens):
        qs, ks, vs, dos = (x[rows, tokens].to(compute) for x in (q, k, v, do))
        if qs.shape[1] == 0:
            continue
        p, _ = _probabilities(qs, ks, window, sinks, scale, lookahead)
        ve, dot = _expand(vs, group), dos.transpose(1, 2)
        dp = dot @ ve.transpose(-1, -2)
        ds = p * (dp - (dot * (p @ ve)).sum(-1, keepdim=True))
        dq[rows, tokens] = scale * (ds @ _expand(ks, group)).transpose(1, 2)
        dk[rows, tokens] = scale * _fold(ds.transpose(-1, -2) @ qs.transpose(1, 2), group)
        dv[rows, tokens] = _fold(p.transpose(-1, -2) @ dot, group)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def sliding_window_decode_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor, scale: float
) -> torch.Tensor:
    """One query per batch row over a ring-buffer cache: o [B, 1, H, V] in q's dtype.

    q [B, 1, H, K]; k_cache [B, S, Hkv, K], v_cache [B, S, Hkv, V] with S = sinks + window, laid
    out by `api.ring_slots`; positions [B] is each query's position t, its own k/v already in
    the cache. Slot i holds a visible token exactly when i <= t.
    """
    compute = torch.promote_types(q.dtype, torch.float32)
    group = q.shape[2] // k_cache.shape[2]
    qs = q.to(compute).transpose(1, 2)  # [B, H, 1, K]
    scores = scale * qs @ _expand(k_cache.to(compute), group).transpose(-1, -2)  # [B, H, 1, S]
    slots = torch.arange(k_cache.shape[1], device=q.device)
    mask = (slots[None, :] <= positions[:, None].to(slots.dtype))[:, None, None, :]
    p = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return (p @ _expand(v_cache.to(compute), group)).transpose(1, 2).to(q.dtype)
