"""Readable recurrent reference for the (gated) delta rule: one token at a time.

Per kv head the state S is [K, V] (the linear-attention family's layout). At token t, with
a_t = exp(g_t) (g_t <= 0, a_t = 1 without g), beta_t a scalar and k_t, v_t column vectors:

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
        = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T
    o_t = scale * S_t^T q_t                (per q head; q head h reads kv head h // (H / Hkv))

(In the [V, K] layout of the DeltaNet papers this is S_t = a_t S_{t-1} (I - beta_t k_t k_t^T)
+ beta_t v_t k_t^T.) Keys are expected L2-normalised by the caller: with |k_t| = 1 and beta_t in
[0, 1] (or [0, 2] with negative eigenvalues allowed) the transition's eigenvalues lie in [-1, 1]
and the recurrence is stable; the functions here do not normalise.

Shapes: q [B, T, H, K], k [B, T, Hkv, K], v [B, T, Hkv, V], beta [B, T, Hkv], g [B, T, Hkv] or
None, states [N, Hkv, K, V]; with cu_seqlens, B == 1 and sequence n is tokens
cu_seqlens[n]:cu_seqlens[n+1], each from its own initial state. Computes in float32 at least
(float64 for float64 inputs); o in q's dtype, states in the compute dtype.
"""

import torch


def sequence_bounds(batch: int, length: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """(batch row, start, end) of every sequence."""
    if cu_seqlens is None:
        return [(b, 0, length) for b in range(batch)]
    bounds = cu_seqlens.tolist()
    return [(0, bounds[n], bounds[n + 1]) for n in range(len(bounds) - 1)]


def naive_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The delta rule by the token recurrence; returns (o [B, T, H, V], final state [N, Hkv, K, V])."""
    batch, length, heads, dk = q.shape
    kv_heads, dv = k.shape[2], v.shape[-1]
    group = heads // kv_heads
    scale = dk**-0.5 if scale is None else scale
    compute = torch.promote_types(q.dtype, torch.float32)
    out_dtype = q.dtype
    q, k, v, beta = (x.to(compute) for x in (q, k, v, beta))
    g = None if g is None else g.to(compute)
    bounds = sequence_bounds(batch, length, cu_seqlens)
    o = torch.zeros(batch, length, heads, dv, dtype=compute, device=q.device)
    final = torch.zeros(len(bounds), kv_heads, dk, dv, dtype=compute, device=q.device)
    for n, (b, start, end) in enumerate(bounds):
        state = torch.zeros(kv_heads, dk, dv, dtype=compute, device=q.device)
        if initial_state is not None:
            state = initial_state[n].to(compute).clone()
        # each sequence's tokens sliced once and unbound, its outputs stacked and written once (not per token):
        # the same values, with autograd graphs whose size does not grow with the length times the tensors' size
        outs = []
        gs = [None] * (end - start) if g is None else g[b, start:end].unbind(0)
        tokens = zip(q[b, start:end].unbind(0), k[b, start:end].unbind(0), v[b, start:end].unbind(0),
                     beta[b, start:end].unbind(0), gs, strict=True)
        for q_t, k_t, v_t, beta_t, g_t in tokens:  # k_t: [Hkv, K]
            if g_t is not None:
                state = state * g_t.exp()[:, None, None]
            error = v_t - torch.einsum("hk,hkv->hv", k_t, state)
            state = state + beta_t[:, None, None] * k_t[:, :, None] * error[:, None, :]
            q_t = q_t.view(kv_heads, group, dk)
            outs.append(scale * torch.einsum("hgk,hkv->hgv", q_t, state).reshape(heads, dv))
        if outs:
            o[b, start:end] = torch.stack(outs)
        final[n] = state
    return o.to(out_dtype), final
