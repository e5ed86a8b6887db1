"""Chunked linear attention in plain PyTorch: the CPU implementation of `rewrite::linear_attention`.

Same semantics, shapes and dtypes as `naive.naive_linear_attention`. Tokens are cut into chunks of
C; inside a chunk the output is an attention-like product masked by the decay between tokens,
across chunks a state [K, V] per kv head carries the past. With b_i the log-decay summed from the
chunk start to token i (inclusive) and h the state before the chunk:

    o_i = scale * ((q_i * exp(b_i)) h + sum_{j <= i} (sum_k q_ik k_jk exp(b_ik - b_jk)) v_j)
    h'  = exp(b_last) * h + sum_j (k_j * exp(b_last - b_j))^T v_j

Every exponent is <= 0, so nothing overflows. The backward pass is written out by hand (it is
the model for the Triton backward); the log-decay gradient uses dB_t = sum over the q heads of
q_t * dq_t - k_t * dk_t, with B the decay summed from the sequence start, then
dg_s = sum_{t >= s} dB_t + sum_v S_T * dS_T (the last term from the final state).
"""

import torch
import torch.nn.functional as F

from .naive import sequence_bounds

CHUNK = 64
VECTOR_CHUNK = 16  # the per-key-dim decay builds a [C, C, K] tensor per chunk


def chunk_size_for(decay: str) -> int:
    """Chunk length of this CPU reference for a decay kind (the Triton kernels use 64 for every kind)."""
    return VECTOR_CHUNK if decay == "vector" else CHUNK


def token_log_decay(g: torch.Tensor | None, decay: str, like: torch.Tensor) -> torch.Tensor:
    """Per-token log-decay [N, L, Hkv, F] (F = K for "vector", else 1) for keys `like` [N, L, Hkv, K]."""
    n, length, kv_heads, _ = like.shape
    if decay == "none":
        return like.new_zeros(n, length, kv_heads, 1)
    if decay == "constant":
        return g.to(like.dtype).view(1, 1, kv_heads, 1).expand(n, length, kv_heads, 1)
    if decay == "scalar":
        return g.to(like.dtype)[..., None]
    return g.to(like.dtype)


def _chunk(x: torch.Tensor, size: int) -> torch.Tensor:
    """[N, L, Hx, F] -> [N, Hx, L/C, C, F], zero-padded to whole chunks."""
    n, length, heads, feat = x.shape
    pad = (-length) % size
    x = F.pad(x, (0, 0, 0, 0, 0, pad))
    return x.view(n, (length + pad) // size, size, heads, feat).permute(0, 3, 1, 2, 4)


def _unchunk(x: torch.Tensor, length: int) -> torch.Tensor:
    """[N, Hx, L/C, C, F] -> [N, L, Hx, F]."""
    n, heads, chunks, size, feat = x.shape
    return x.permute(0, 2, 3, 1, 4).reshape(n, chunks * size, heads, feat)[:, :length]


def _intra_decay(b: torch.Tensor) -> torch.Tensor:
    """exp(b_i - b_j) for j <= i else 0: [..., C, F] -> [..., C, C, F]."""
    size = b.shape[-2]
    causal = torch.ones(size, size, dtype=torch.bool, device=b.device).tril()[:, :, None]
    diff = b[..., :, None, :] - b[..., None, :, :]
    return torch.where(causal, diff, float("-inf")).exp()


class _Chunks:
    """One batch of equal-length sequences cut into chunks, in the compute dtype."""

    def __init__(self, q, k, v, log_decay, size):
        self.n, self.length, heads, self.dk = q.shape
        self.kv_heads, self.dv = k.shape[2], v.shape[-1]
        self.group = heads // self.kv_heads
        self.q = _chunk(q, size).reshape(self.n, self.kv_heads, self.group, -1, size, self.dk)
        self.k = _chunk(k, size)
        self.v = _chunk(v, size)
        self.b = _chunk(log_decay, size).cumsum(-2)  # [N, Hkv, nC, C, F]
        self.count = self.k.shape[2]
        self.decay = _intra_decay(self.b)  # [N, Hkv, nC, C, C, F]
        self.b_last = self.b[..., -1:, :]  # [N, Hkv, nC, 1, F]
        self.q_decayed = self.q * self.b.exp()[:, :, None]
        self.k_to_end = self.k * (self.b_last - self.b).exp()

    def attention(self) -> torch.Tensor:
        """Intra-chunk scores with decay, [N, Hkv, G, nC, C, C]."""
        if self.decay.shape[-1] == 1:
            return (self.q @ self.k[:, :, None].transpose(-1, -2)) * self.decay[:, :, None, ..., 0]
        return torch.einsum("nhgcik,nhcjk,nhcijk->nhgcij", self.q, self.k, self.decay)

    def decay_state(self, state: torch.Tensor, c: int) -> torch.Tensor:
        return state * self.b_last[:, :, c].exp().transpose(-1, -2)

    def states(self, initial: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """States before each chunk, and the final state."""
        state, before = initial, []
        for c in range(self.count):
            before.append(state)
            state = self.decay_state(state, c) + self.k_to_end[:, :, c].transpose(-1, -2) @ self.v[:, :, c]
        return before, state


def _unchunk_q(x: torch.Tensor, length: int) -> torch.Tensor:
    n, kv_heads, group, chunks, size, feat = x.shape
    return _unchunk(x.reshape(n, kv_heads * group, chunks, size, feat), length)


def _forward_equal(q, k, v, log_decay, scale, initial, size):
    ch = _Chunks(q, k, v, log_decay, size)
    before, final = ch.states(initial)
    o = ch.attention() @ ch.v[:, :, None]
    o = o + ch.q_decayed @ torch.stack(before, 2)[:, :, None]
    return _unchunk_q(scale * o, ch.length), final


def _backward_equal(do, dht, q, k, v, log_decay, scale, initial, size):
    ch = _Chunks(q, k, v, log_decay, size)
    before, final = ch.states(initial)
    do_c = _chunk(do, size).reshape(ch.n, ch.kv_heads, ch.group, ch.count, size, ch.dv)
    d_scores = scale * do_c @ ch.v[:, :, None].transpose(-1, -2)  # [N, Hkv, G, nC, C(i), C(j)]
    if ch.decay.shape[-1] == 1:
        d_scores = d_scores * ch.decay[:, :, None, ..., 0]
        dq = d_scores @ ch.k[:, :, None]
        dk = (d_scores.transpose(-1, -2) @ ch.q).sum(2)
    else:
        dq = torch.einsum("nhgcij,nhcijk,nhcjk->nhgcik", d_scores, ch.decay, ch.k)
        dk = torch.einsum("nhgcij,nhcijk,nhgcik->nhcjk", d_scores, ch.decay, ch.q)
    dv = scale * (ch.attention().transpose(-1, -2) @ do_c).sum(2)
    eb = ch.b.exp()
    dstate = dht
    for c in reversed(range(ch.count)):
        dk[:, :, c] += (ch.v[:, :, c] @ dstate.transpose(-1, -2)) * (ch.b_last[:, :, c] - ch.b[:, :, c]).exp()
        dv[:, :, c] += ch.k_to_end[:, :, c] @ dstate
        dq[:, :, :, c] += (
            scale * (do_c[:, :, :, c] @ before[c][:, :, None].transpose(-1, -2)) * eb[:, :, None, c]
        )
        dstate = ch.decay_state(dstate, c) + scale * (
            ch.q_decayed[:, :, :, c].transpose(-1, -2) @ do_c[:, :, :, c]
        ).sum(2)
    d_log_cum = _unchunk((ch.q * dq).sum(2) - ch.k * dk, ch.length)  # [N, L, Hkv, K]
    dg = d_log_cum.flip(1).cumsum(1).flip(1) + (final * dht).sum(-1)[:, None]
    return _unchunk_q(dq, ch.length), _unchunk(dk, ch.length), _unchunk(dv, ch.length), dg, dstate


def _reduce_log_decay_grad(dg: torch.Tensor, decay: str, g: torch.Tensor | None) -> torch.Tensor | None:
    """Per-token, per-key-dim log-decay gradient [B, T, Hkv, K] -> the shape of g."""
    if decay == "none":
        return None
    if decay == "vector":
        return dg.to(g.dtype)
    if decay == "scalar":
        return dg.sum(-1).to(g.dtype)
    return dg.sum((0, 1, 3)).to(g.dtype)


def _segments(q, cu_seqlens):
    """(batch rows, token slice, state rows) of each run of equal-length sequences."""
    if cu_seqlens is None:
        return [(slice(None), slice(None), slice(None))]
    return [
        (slice(0, 1), slice(s, e), slice(n, n + 1))
        for n, (_, s, e) in enumerate(sequence_bounds(1, q.shape[1], cu_seqlens))
    ]


def _state_or_zeros(initial_state, rows, n, kv_heads, dk, dv, dtype, device):
    if initial_state is None:
        return torch.zeros(n, kv_heads, dk, dv, dtype=dtype, device=device)
    return initial_state[rows].to(dtype)


def _slice_decay(g, decay, rows, tokens):
    return g[rows, tokens] if decay in ("scalar", "vector") else g


def chunked_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    decay: str,
    scale: float,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, T, H, V] in q's dtype, final state [N, Hkv, K, V] in the compute dtype)."""
    compute = torch.promote_types(q.dtype, torch.float32)
    batch, length, heads, dk = q.shape
    kv_heads, dv = k.shape[2], v.shape[-1]
    size = chunk_size_for(decay)
    o = torch.zeros(batch, length, heads, dv, dtype=compute, device=q.device)
    finals = []
    for rows, tokens, states in _segments(q, cu_seqlens):
        qs, ks, vs = (x[rows, tokens].to(compute) for x in (q, k, v))
        initial = _state_or_zeros(initial_state, states, qs.shape[0], kv_heads, dk, dv, compute, q.device)
        if qs.shape[1] == 0:  # an empty sequence: no output, the state passes through
            final = initial
        elif causal:
            log_decay = token_log_decay(_slice_decay(g, decay, rows, tokens), decay, ks)
            o[rows, tokens], final = _forward_equal(qs, ks, vs, log_decay, scale, initial, size)
        else:
            final = initial + torch.einsum("nthk,nthv->nhkv", ks, vs)
            group = heads // kv_heads
            qg = qs.view(*qs.shape[:2], kv_heads, group, dk)
            o[rows, tokens] = scale * torch.einsum("nthgk,nhkv->nthgv", qg, final).flatten(2, 3)
        finals.append(final)
    return o.to(q.dtype), torch.cat(finals)


def chunked_backward(
    do: torch.Tensor,
    dht: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    decay: str,
    scale: float,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (dq, dk, dv, dg, d_initial_state) of `chunked_forward` given do and d_final_state."""
    compute = torch.promote_types(q.dtype, torch.float32)
    batch, length, heads, dk_ = q.shape
    kv_heads, dv_ = k.shape[2], v.shape[-1]
    group = heads // kv_heads
    size = chunk_size_for(decay)
    dq = torch.zeros(q.shape, dtype=compute, device=q.device)
    dk = torch.zeros(k.shape, dtype=compute, device=q.device)
    dv = torch.zeros(v.shape, dtype=compute, device=q.device)
    dg = torch.zeros(batch, length, kv_heads, dk_, dtype=compute, device=q.device)
    dh0 = []
    for rows, tokens, states in _segments(q, cu_seqlens):
        qs, ks, vs, dos = (x[rows, tokens].to(compute) for x in (q, k, v, do))
        dhts = dht[states].to(compute)
        initial = _state_or_zeros(initial_state, states, qs.shape[0], kv_heads, dk_, dv_, compute, q.device)
        if qs.shape[1] == 0:  # an empty sequence: no token gradients, the state's gradient passes through
            dstate = dhts
        elif causal:
            log_decay = token_log_decay(_slice_decay(g, decay, rows, tokens), decay, ks)
            grads = _backward_equal(dos, dhts, qs, ks, vs, log_decay, scale, initial, size)
            dq[rows, tokens], dk[rows, tokens], dv[rows, tokens], dg[rows, tokens], dstate = grads
        else:
            total = initial + torch.einsum("nthk,nthv->nhkv", ks, vs)
            qg = qs.view(*qs.shape[:2], kv_heads, group, dk_)
            dog = dos.view(*dos.shape[:2], kv_heads, group, dv_)
            dstate = dhts + scale * torch.einsum("nthgk,nthgv->nhkv", qg, dog)
            dq[rows, tokens] = scale * torch.einsum("nthgv,nhkv->nthgk", dog, total).flatten(2, 3)
            dk[rows, tokens] = torch.einsum("nthv,nhkv->nthk", vs, dstate)
            dv[rows, tokens] = torch.einsum("nthk,nhkv->nthv", ks, dstate)
        dh0.append(dstate)
    dh0 = None if initial_state is None else torch.cat(dh0).to(initial_state.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), _reduce_log_decay_grad(dg, decay, g), dh0
