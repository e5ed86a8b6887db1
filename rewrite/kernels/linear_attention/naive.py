"""Readable recurrent reference for linear attention: one token at a time.

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t        (state per kv head, [K, V])
    o_t = scale * q_t S_t                            (per q head; q head h reads kv head h // G)

Non-causal (decay "none" only): o_t = scale * q_t (S_0 + sum over every s of k_s^T v_s).
Shapes: q [B, T, H, K], k [B, T, Hkv, K], v [B, T, Hkv, V], o [B, T, H, V], state [N, Hkv, K, V];
g: [Hkv] ("constant"), [B, T, Hkv] ("scalar"), [B, T, Hkv, K] ("vector"), None ("none").
With cu_seqlens, B == 1 and sequence n is tokens cu_seqlens[n]:cu_seqlens[n+1]; N = number of sequences.
Computes in float32 at least (float64 for float64 inputs); o in q's dtype, state in the compute dtype.
"""

import torch


def sequence_bounds(batch: int, length: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """(batch row, start, end) of every sequence."""
    if cu_seqlens is None:
        return [(b, 0, length) for b in range(batch)]
    bounds = cu_seqlens.tolist()
    return [(0, bounds[n], bounds[n + 1]) for n in range(len(bounds) - 1)]


def log_decay_at(g: torch.Tensor | None, decay: str, b: int, t: int) -> torch.Tensor | None:
    """The log-decay applied at token (b, t), broadcastable to [Hkv, K, 1]; None for no decay."""
    if decay == "none":
        return None
    if decay == "constant":
        return g[:, None, None]
    if decay == "scalar":
        return g[b, t][:, None, None]
    return g[b, t][:, :, None]


def naive_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    decay: str = "none",
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear attention by the token recurrence; returns (o, final state per sequence)."""
    batch, length, heads, dk = q.shape
    kv_heads, dv = k.shape[2], v.shape[-1]
    group = heads // kv_heads
    scale = dk**-0.5 if scale is None else scale
    out_dtype = q.dtype
    compute = torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    g = None if g is None else g.to(compute)
    bounds = sequence_bounds(batch, length, cu_seqlens)
    o = torch.zeros(batch, length, heads, dv, dtype=compute, device=q.device)
    final = torch.zeros(len(bounds), kv_heads, dk, dv, dtype=compute, device=q.device)
    for n, (b, start, end) in enumerate(bounds):
        state = torch.zeros(kv_heads, dk, dv, dtype=compute, device=q.device)
        if initial_state is not None:
            state = initial_state[n].to(compute).clone()
        if not causal:
            state = state + torch.einsum("thk,thv->hkv", k[b, start:end], v[b, start:end])
        for t in range(start, end):
            if causal:
                log_decay = log_decay_at(g, decay, b, t)
                if log_decay is not None:
                    state = state * log_decay.exp()
                state = state + k[b, t][:, :, None] * v[b, t][:, None, :]
            q_t = q[b, t].view(kv_heads, group, dk)
            o[b, t] = scale * torch.einsum("hgk,hkv->hgv", q_t, state).reshape(heads, dv)
        final[n] = state
    return o.to(out_dtype), final
