"""Chunked delta rule (WY / UT-transform form) in plain PyTorch: the CPU forward, and the backward.

Same semantics, shapes and dtypes as `naive.naive_delta_rule`. Tokens are cut into chunks of C.
Inside a chunk, with b_i the log-decay summed from the chunk start to token i (inclusive),
gamma_i = exp(b_i), h the state before the chunk and u_i = beta_i (v_i - a_i S_{i-1}^T k_i)
the written values, the recurrence unrolls to

    (I + A) U = diag(beta) V - diag(beta * gamma) K h,   A_ij = beta_i exp(b_i - b_j) k_i.k_j (j < i)

so with T = (I + A)^{-1} (the UT transform; A is strictly lower triangular):

    W = T diag(beta * gamma) K,   U~ = T diag(beta) V,   U = U~ - W h
    o_i = scale * (gamma_i q_i h + sum_{j <= i} exp(b_i - b_j) (q_i.k_j) u_j)
    h'  = gamma_C h + sum_j exp(b_C - b_j) k_j u_j^T

W and U~ depend only on the chunk (parallel over chunks); the state pass is sequential.
Zero-padded tokens (beta = 0, g = 0) change nothing. The backward pass here runs the token
recurrence in reverse (exact, written out by hand); `autodiff_backward` differentiates the
chunked form with torch.func (a cross-check in the tests; the CUDA op uses `triton_backward`).
"""

import torch
import torch.nn.functional as F

from .naive import sequence_bounds

CHUNK = 64


def _segments(q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> list[tuple[slice, slice, slice]]:
    """(batch rows, token slice, state rows) of each run of equal-length sequences."""
    if cu_seqlens is None:
        return [(slice(None), slice(None), slice(None))]
    return [(slice(0, 1), slice(s, e), slice(n, n + 1))
            for n, (_, s, e) in enumerate(sequence_bounds(1, q.shape[1], cu_seqlens))]


def _chunk(x: torch.Tensor, size: int) -> torch.Tensor:
    """[N, L, Hx, *F] -> [N, Hx, L/C, C, *F], zero-padded to whole chunks."""
    n, length, heads = x.shape[:3]
    pad = (-length) % size
    x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    x = x.view(n, (length + pad) // size, size, heads, *x.shape[3:])
    return x.permute(0, 3, 1, 2, *range(4, x.dim()))


def _unchunk(x: torch.Tensor, length: int) -> torch.Tensor:
    """[N, H, nC, C, F] -> [N, L, H, F]."""
    n, heads, chunks, size, feat = x.shape
    return x.permute(0, 2, 3, 1, 4).reshape(n, chunks * size, heads, feat)[:, :length]


def _forward_equal(q, k, v, beta, g, scale, initial, size):
    """Chunked forward for N equal-length sequences, all in the compute dtype."""
    n, length, heads, dk = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    qc = _chunk(q, size).reshape(n, kv_heads, group, -1, size, dk)  # [N, Hkv, G, nC, C, K]
    kc, vc = _chunk(k, size), _chunk(v, size)  # [N, Hkv, nC, C, *]
    betac = _chunk(beta[..., None], size)[..., 0]  # [N, Hkv, nC, C]
    b = torch.zeros_like(betac) if g is None else _chunk(g[..., None], size)[..., 0].cumsum(-1)
    lower = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
    decay = torch.where(lower, b[..., :, None] - b[..., None, :], float("-inf")).exp()  # j <= i
    strict = decay * ~torch.eye(size, dtype=torch.bool, device=q.device)
    a = betac[..., :, None] * strict * (kc @ kc.transpose(-1, -2))
    eye = torch.eye(size, dtype=q.dtype, device=q.device)
    t = torch.linalg.solve_triangular(eye + a, eye.expand_as(a), upper=False, unitriangular=True)
    gamma = b.exp()
    w = t @ ((betac * gamma)[..., None] * kc)
    u_tilde = t @ (betac[..., None] * vc)
    scores = (qc @ kc[:, :, None].transpose(-1, -2)) * decay[:, :, None]  # [N, Hkv, G, nC, C, C]
    k_to_end = kc * (b[..., -1:] - b).exp()[..., None]
    h, outputs = initial, []
    for c in range(kc.shape[2]):
        u = u_tilde[:, :, c] - w[:, :, c] @ h
        inter = gamma[:, :, None, c, :, None] * (qc[:, :, :, c] @ h[:, :, None])
        outputs.append(scale * (inter + scores[:, :, :, c] @ u[:, :, None]))
        h = gamma[:, :, c, -1, None, None] * h + k_to_end[:, :, c].transpose(-1, -2) @ u
    o = torch.stack(outputs, 3).reshape(n, heads, -1, size, v.shape[-1])
    return _unchunk(o, length), h


def chunked_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    chunk: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, T, H, V] in q's dtype, final state [N, Hkv, K, V] in the compute dtype)."""
    compute = torch.promote_types(q.dtype, torch.float32)
    batch, length, heads, dk = q.shape
    kv_heads, dv = k.shape[2], v.shape[-1]
    o = torch.zeros(batch, length, heads, dv, dtype=compute, device=q.device)
    finals = []
    for rows, tokens, states in _segments(q, cu_seqlens):
        qs, ks, vs, bs = (x[rows, tokens].to(compute) for x in (q, k, v, beta))
        gs = None if g is None else g[rows, tokens].to(compute)
        if initial_state is None:
            initial = torch.zeros(qs.shape[0], kv_heads, dk, dv, dtype=compute, device=q.device)
        else:
            initial = initial_state[states].to(compute)
        if qs.shape[1] == 0:
            finals.append(initial)
            continue
        o[rows, tokens], final = _forward_equal(qs, ks, vs, bs, gs, scale, initial, chunk)
        finals.append(final)
    return o.to(q.dtype), torch.cat(finals)


def _backward_equal(do, dht, q, k, v, beta, g, scale, initial):
    """Reverse token recurrence for N equal-length sequences (compute dtype)."""
    n, length, heads, dk = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    qg = q.view(n, length, kv_heads, group, dk)
    dog = do.view(n, length, kv_heads, group, v.shape[-1])
    states, state = [], initial
    for t in range(length):  # states before each token
        states.append(state)
        decayed = state if g is None else state * g[:, t].exp()[..., None, None]
        error = v[:, t] - torch.einsum("nhk,nhkv->nhv", k[:, t], decayed)
        state = decayed + beta[:, t, :, None, None] * k[:, t, :, :, None] * error[:, :, None, :]
    dq, dk_, dv_ = torch.zeros_like(qg), torch.zeros_like(k), torch.zeros_like(v)
    dbeta = torch.zeros_like(beta)
    dg = None if g is None else torch.zeros_like(g)
    ds = dht.clone()
    for t in reversed(range(length)):
        k_t, b_t = k[:, t], beta[:, t, :, None]
        decay = None if g is None else g[:, t].exp()[..., None, None]
        decayed = states[t] if decay is None else states[t] * decay
        error = v[:, t] - torch.einsum("nhk,nhkv->nhv", k_t, decayed)
        u = b_t * error
        state = decayed + k_t[..., None] * u[:, :, None, :]
        dq[:, t] = scale * torch.einsum("nhkv,nhgv->nhgk", state, dog[:, t])
        ds = ds + scale * torch.einsum("nhgk,nhgv->nhkv", qg[:, t], dog[:, t])
        du = torch.einsum("nhkv,nhk->nhv", ds, k_t)
        dk_[:, t] = torch.einsum("nhkv,nhv->nhk", ds, u)
        dbeta[:, t] = (du * error).sum(-1)
        d_error = b_t * du
        dv_[:, t] = d_error
        ds = ds - k_t[..., None] * d_error[:, :, None, :]  # through the prediction decayed^T k
        dk_[:, t] -= torch.einsum("nhkv,nhv->nhk", decayed, d_error)
        if decay is not None:
            dg[:, t] = (ds * decayed).sum((-1, -2))
            ds = ds * decay
    return dq.view(q.shape), dk_, dv_, dbeta, dg, ds


def chunked_backward(
    do: torch.Tensor,
    d_final_state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """Gradients (dq, dk, dv, dbeta, dg or None, d_initial_state or None) of `chunked_forward`.

    Runs the recurrence backwards token by token (states recomputed forwards first):
    from S_t = D + k u^T with D = a S_{t-1} and u = beta (v - D^T k):
    du = dS^T k, dk = dS u - D (beta du), dbeta = du.(v - D^T k), dv = beta du,
    dD = dS - k (beta du)^T, dg = <dD, D>, dS_{t-1} = a dD, plus dS += scale q do^T from o_t.
    """
    compute = torch.promote_types(q.dtype, torch.float32)
    batch, length, heads, dk_ = q.shape
    kv_heads, dv_ = k.shape[2], v.shape[-1]
    grads = [torch.zeros(x.shape, dtype=compute, device=q.device) for x in (q, k, v, beta)]
    dg = None if g is None else torch.zeros(g.shape, dtype=compute, device=q.device)
    dh0 = []
    for rows, tokens, states in _segments(q, cu_seqlens):
        qs, ks, vs, bs, dos = (x[rows, tokens].to(compute) for x in (q, k, v, beta, do))
        gs = None if g is None else g[rows, tokens].to(compute)
        if initial_state is None:
            initial = torch.zeros(qs.shape[0], kv_heads, dk_, dv_, dtype=compute, device=q.device)
        else:
            initial = initial_state[states].to(compute)
        dq, dk, dv, dbeta, dgs, ds = _backward_equal(dos, d_final_state[states].to(compute), qs, ks, vs, bs, gs,
                                                     scale, initial)
        for grad, part in zip(grads, (dq, dk, dv, dbeta)):
            grad[rows, tokens] = part
        if dg is not None:
            dg[rows, tokens] = dgs
        dh0.append(ds)
    dq, dk, dv, dbeta = (grad.to(x.dtype) for grad, x in zip(grads, (q, k, v, beta)))
    dg = None if g is None else dg.to(g.dtype)
    dh0 = None if initial_state is None else torch.cat(dh0).to(initial_state.dtype)
    return dq, dk, dv, dbeta, dg, dh0


def autodiff_backward(
    do: torch.Tensor,
    d_final_state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    chunk: int = CHUNK,
) -> tuple[torch.Tensor, ...]:
    """Same result as `chunked_backward`, by torch.func.vjp through `chunked_forward`.

    Not usable inside a CPU op implementation that `torch.library.opcheck` inspects. It was the
    CUDA op's backward before `triton_backward` (about 100x slower on the GPU).
    """
    primals = [x for x in (q, k, v, beta, g, initial_state)]
    present = [i for i, x in enumerate(primals) if x is not None]

    def forward(*tensors):
        full = list(primals)
        for i, x in zip(present, tensors):
            full[i] = x
        o, final = chunked_forward(*full[:5], scale, full[5], cu_seqlens, chunk)
        return o, final

    compute = torch.promote_types(q.dtype, torch.float32)
    (o, final), vjp = torch.func.vjp(forward, *[primals[i] for i in present])
    grads = vjp((do.to(o.dtype), d_final_state.to(final.dtype).to(compute)))
    full = [None] * 6
    for i, grad in zip(present, grads):
        full[i] = grad.to(primals[i].dtype)
    return tuple(full)
