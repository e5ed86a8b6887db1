"""Plain-PyTorch definition of varlen attention, the source of truth for the Triton kernels.

Tokens of N sequences lie back to back: sequence n holds rows cu_seqlens[n] .. cu_seqlens[n + 1] - 1
of q [T, H, D], k [T, Hkv, D] and v [T, Hkv, Dv]. Each query attends only to keys of its own
sequence (and, when causal, to keys at or before its own position); q head h reads kv head
h // (H / Hkv). Softmax runs in float32 (float64 for float64 inputs); lse [H, T] is each row's
log-sum-exp of the scaled scores, in natural log.
"""

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half inputs, else the input dtype (float32 or float64)."""
    return torch.promote_types(dtype, torch.float32)


def _segments(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    bounds = cu_seqlens.tolist()
    return [(s, e) for s, e in zip(bounds, bounds[1:]) if e > s]


def _scores(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """[H, L, L] scaled scores of one sequence with hidden keys at -inf (k already repeated to H heads)."""
    s = torch.einsum("lhd,mhd->hlm", q, k) * scale
    if causal:
        n = q.shape[0]
        hidden = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        s = s.masked_fill(hidden, float("-inf"))
    return s


def _sequence_kv(
    k: torch.Tensor, v: torch.Tensor, start: int, end: int, acc: torch.dtype, group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """k and v of the sequence in rows start .. end - 1, in `acc`, repeated to the query heads."""
    return k[start:end].to(acc).repeat_interleave(group, dim=1), v[start:end].to(acc).repeat_interleave(group, dim=1)


def varlen_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [T, H, Dv] in q's dtype, lse [H, T] in the accumulation dtype)."""
    acc = accumulation_dtype(q.dtype)
    group = q.shape[1] // k.shape[1]
    o = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    lse = torch.zeros(q.shape[1], q.shape[0], dtype=acc, device=q.device)
    for start, end in _segments(cu_seqlens):
        qs = q[start:end].to(acc)
        ks, vs = _sequence_kv(k, v, start, end, acc, group)
        s = _scores(qs, ks, causal, scale)
        row_lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - row_lse[..., None])
        o[start:end] = torch.einsum("hlm,mhd->lhd", p, vs).to(q.dtype)
        lse[:, start:end] = row_lse
    return o, lse


def varlen_attention_backward_reference(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) given the output gradient do [T, H, Dv] and the forward's o and lse."""
    acc = accumulation_dtype(q.dtype)
    heads, kv_heads = q.shape[1], k.shape[1]
    group = heads // kv_heads
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    for start, end in _segments(cu_seqlens):
        qs, dos, os_ = (x[start:end].to(acc) for x in (q, do, o))
        ks, vs = _sequence_kv(k, v, start, end, acc, group)
        p = torch.exp(_scores(qs, ks, causal, scale) - lse[:, start:end, None])  # [H, L, L]
        dv_h = torch.einsum("hlm,lhd->mhd", p, dos)
        dp = torch.einsum("lhd,mhd->hlm", dos, vs)
        delta = (dos * os_).sum(-1).transpose(0, 1)  # [H, L]
        ds = p * (dp - delta[..., None]) * scale
        dq[start:end] = torch.einsum("hlm,mhd->lhd", ds, ks)
        dk_h = torch.einsum("hlm,lhd->mhd", ds, qs)
        length = end - start
        dk[start:end] = dk_h.view(length, kv_heads, group, -1).sum(2)
        dv[start:end] = dv_h.view(length, kv_heads, group, -1).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
