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


def log_decays(g: torch.Tensor | None, decay: str, b: int, start: int, end: int) -> list[torch.Tensor | None]:
    """The log-decay applied at each token of row b's tokens start:end, broadcastable to [Hkv, K, 1]; None for
    no decay. (Sliced per sequence and unbound: autograd then has one node per sequence where indexing every
    token would give each token's gradient the size of the whole `g`.)"""
    if decay == "none":
        return [None] * (end - start)
    if decay == "constant":
        return [g[:, None, None] for _ in range(start, end)]
    tokens = g[b, start:end].unbind(0)
    return [x[:, None, None] if decay == "scalar" else x[:, :, None] for x in tokens]


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
        # each sequence's tokens sliced once and unbound, its outputs stacked and written once (not per token):
        # the same values, with autograd graphs whose size does not grow with the length times the tensors' size
        outs = []
        tokens = zip(q[b, start:end].unbind(0), k[b, start:end].unbind(0), v[b, start:end].unbind(0),
                     log_decays(g, decay, b, start, end), strict=True)
        for q_t, k_t, v_t, log_decay in tokens:
            if causal:
                if log_decay is not None:
                    state = state * log_decay.exp()
                state = state + k_t[:, :, None] * v_t[:, None, :]
            q_t = q_t.view(kv_heads, group, dk)
            outs.append(scale * torch.einsum("hgk,hkv->hgv", q_t, state).reshape(heads, dv))
        if outs:
            o[b, start:end] = torch.stack(outs)
        final[n] = state
    return o.to(out_dtype), final


def naive_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    decay: str,
    scale: float,
    state: torch.Tensor,
    normalize: bool = False,
    eps: float = 0.0,
    normalizer: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode step's definition: (o [B, t, H, V], new state) from `state` [B, Hkv, K, V (+ 1)].

    Without `normalize` this is `naive_linear_attention` from `state`. With it the state's last
    column is z, the running (decayed) sum of k (the state of a column of ones appended to v), and
    o = scale * q S / (scale * q z + eps), divided before rounding to q's dtype. `normalizer`
    [B, t, Hkv, K], if given, is z after each token as the caller computed it: the denominators use
    it and the new state's last column is its last token's.
    """
    if not normalize:
        return naive_linear_attention(q, k, v, g, decay=decay, scale=scale, initial_state=state)
    compute = torch.promote_types(q.dtype, torch.float32)
    ones = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)
    o, new_state = naive_linear_attention(q.to(compute), k, ones, g, decay=decay, scale=scale, initial_state=state)
    den = o[..., -1]
    if normalizer is not None:
        z = normalizer.to(compute).repeat_interleave(q.shape[2] // k.shape[2], dim=2)
        den = scale * (q.to(compute) * z).sum(-1)
        new_state[..., -1] = normalizer[:, -1].to(new_state.dtype)
    return (o[..., :-1] / (den[..., None] + eps)).to(q.dtype), new_state
