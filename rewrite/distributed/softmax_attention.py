"""Softmax attention over a sequence split across ranks: Ulysses (all-to-all) and ring (online softmax).

Both take SDPA's layout for this rank's shard: q [B, H, Ll, D], k / v [B, Hkv, Ll, D] (GQA heads not
repeated), `valid` [P, B, Ll] bool marking every rank's real (non-padding) keys (see
`gather_key_validity`) or None, and return o [B, H, Ll, Dv].
`causal` is about global positions, which the shard layout gives (see `layout`).

- **Ulysses** trades the sequence split for a head split with one all-to-all each for q, k, v and
  the output. With fewer kv heads than ranks, each rank receives only the one kv head its query
  heads read (no repeat to the query-head count).
- **Ring** keeps queries in place and passes k / v blocks around the ring, merging blocks with an
  online softmax (running log-sum-exp); the next block's transfer runs while the current one is
  computed. Under the zigzag layout causal work is equal on every rank. Its backward passes the
  k / v blocks around again with their gradient accumulators, which arrive home after P steps.

Query rows with no visible key (padding) attend uniformly rather than producing NaN; their outputs
are meaningless, as they are for the original model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rewrite.distributed.collectives import all_to_all
from rewrite.distributed.groups import GroupError, SequenceGroup
from rewrite.distributed.layout import Segment, gathered_order, global_positions, segments

HIDDEN = -1e30
"""Score given to hidden keys in the ring's blocks (finite, so fully hidden rows stay finite)."""


def gather_key_validity(valid: torch.Tensor, group: SequenceGroup) -> torch.Tensor | None:
    """[P, B, Ll] bool: every rank's real keys, or None when no rank has padding (decided alike on every rank)."""
    gathered = group.all_gather(valid.to(torch.uint8)).bool()
    return None if bool(gathered.all()) else gathered


def ulysses_group_sizes(heads: int, kv_heads: int) -> list[int]:
    """Group sizes Ulysses supports for `heads` query and `kv_heads` kv heads."""
    return [p for p in range(1, heads + 1) if heads % p == 0 and (kv_heads % p == 0 or p % kv_heads == 0)]


def check_ulysses(heads: int, kv_heads: int, size: int, layer: str = "") -> None:
    """Raise GroupError unless Ulysses can split `heads` / `kv_heads` over `size` ranks."""
    if heads % size or (kv_heads % size and size % kv_heads):
        where = f"{layer}: " if layer else ""
        raise GroupError(
            f"{where}ulysses needs the group size to divide the {heads} query heads and to divide or be a "
            f"multiple of the {kv_heads} kv heads; group size {size} does not (valid sizes: "
            f"{ulysses_group_sizes(heads, kv_heads)}); use strategy 'ring' for other sizes"
        )


def kv_heads_sent(kv_heads: int, size: int) -> int:
    """kv heads each rank receives under Ulysses: Hkv / P, or 1 when there are fewer kv heads than ranks."""
    return max(1, kv_heads // size)


def _allowed(valid_q: torch.Tensor | None, valid_k: torch.Tensor | None, causal: bool, lq: int, lk: int,
             device) -> torch.Tensor | None:
    """[B or 1, 1, Lq, Lk] bool of visible keys (rows with none visible see every key), or None if all are."""
    if valid_k is None and not causal:
        return None
    allowed = torch.ones(1, 1, lq, lk, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed.tril()
    if valid_k is not None:
        allowed = allowed & valid_k[:, None, None, :]
    return allowed | ~allowed.any(-1, keepdim=True)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor | None,
    *,
    causal: bool,
    scale: float | None,
    group: SequenceGroup,
    layout: str = "contiguous",
    layer: str = "",
) -> torch.Tensor:
    """Ulysses: all-to-all sequence -> heads, attention over the whole sequence, all-to-all back."""
    batch, heads, local, dim = q.shape
    kv_heads, size = k.shape[1], group.size
    check_ulysses(heads, kv_heads, size, layer)
    hq, hk = heads // size, kv_heads_sent(kv_heads, size)
    order = None if layout == "contiguous" else gathered_order(local, size, layout, device=q.device)

    def to_heads(x: torch.Tensor, per_rank: int) -> torch.Tensor:
        # [B, P*per_rank, Ll, D] -> [B, per_rank, L, D]: rank j keeps head group j of every shard
        send = x.reshape(batch, size, per_rank, local, x.shape[-1]).transpose(0, 1)
        got = all_to_all(send.contiguous(), group)  # [P(src), B, per_rank, Ll, D]
        full = got.permute(1, 2, 0, 3, 4).reshape(batch, per_rank, size * local, x.shape[-1])
        return full if order is None else full.index_select(2, order)

    if kv_heads >= size:
        k_send, v_send = k, v
    else:  # each destination needs one kv head: send that one, not a repeat to the query-head count
        index = torch.tensor([d * kv_heads // size for d in range(size)], device=k.device)
        k_send, v_send = k.index_select(1, index), v.index_select(1, index)
    qf, kf, vf = to_heads(q, hq), to_heads(k_send, hk), to_heads(v_send, hk)
    length = size * local
    valid_full = None
    if valid is not None:
        valid_full = valid.permute(1, 0, 2).reshape(batch, length)
        if order is not None:
            valid_full = valid_full.index_select(1, order)
    mask = _allowed(None, valid_full, causal, length, length, q.device)
    o = F.scaled_dot_product_attention(
        qf, kf, vf, attn_mask=mask, is_causal=causal and mask is None, scale=scale, enable_gqa=hq != hk
    )  # [B, hq, L, Dv]
    if order is not None:
        back = torch.cat([global_positions(local, r, size, layout) for r in range(size)]).to(q.device)
        o = o.index_select(2, back)
    dv = o.shape[-1]
    send = o.reshape(batch, hq, size, local, dv).permute(2, 0, 1, 3, 4)  # [P(dst), B, hq, Ll, Dv]
    got = all_to_all(send.contiguous(), group)  # [P(src head group), B, hq, Ll, Dv]
    return got.transpose(0, 1).reshape(batch, heads, local, dv)


# --- ring ----------------------------------------------------------------------------------------


def _pairs(q_segs: list[Segment], k_segs: list[Segment], causal: bool):
    """(q segment, k segment, needs a causal mask) for every pair with at least one visible key."""
    for qs in q_segs:
        for ks in k_segs:
            if causal and ks.start > qs.stop - 1:
                continue  # every key after every query
            yield qs, ks, causal and ks.stop - 1 > qs.start


def _block_mask(valid_k: torch.Tensor | None, qs: Segment, ks: Segment, causal: bool, device) -> torch.Tensor | None:
    mask = None
    if causal:
        qpos = torch.arange(qs.start, qs.stop, device=device)[:, None]
        kpos = torch.arange(ks.start, ks.stop, device=device)[None, :]
        mask = (kpos <= qpos)[None, None]
    if valid_k is not None:
        kv = valid_k[:, None, None, ks.local_start: ks.local_start + ks.length]
        mask = kv if mask is None else mask & kv
    return mask


def _expand_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _reduce_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, h, length, d = x.shape
    return x.view(b, h // groups, groups, length, d).sum(2)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, valid, causal: bool, scale: float, group: SequenceGroup, layout: str):
        batch, heads, local, _ = q.shape
        groups = heads // k.shape[1]
        rank, size = group.rank, group.size
        q_segs = segments(local, rank, size, layout)
        qf = q.float()
        out = q.new_zeros(batch, heads, local, v.shape[-1], dtype=torch.float32)
        lse = q.new_full((batch, heads, local), float("-inf"), dtype=torch.float32)
        kv = torch.cat([k, v], dim=-1)
        for step in range(size):
            src = (rank - step) % size
            pending = None
            if step < size - 1:
                pending = group.exchange_start(kv, (rank + 1) % size, (rank - 1) % size)
            kb = _expand_heads(kv[..., : k.shape[-1]].float(), groups)
            vb = _expand_heads(kv[..., k.shape[-1]:].float(), groups)
            vk = None if valid is None else valid[src]
            for qs, ks, diagonal in _pairs(q_segs, segments(local, src, size, layout), causal):
                qsl = slice(qs.local_start, qs.local_start + qs.length)
                ksl = slice(ks.local_start, ks.local_start + ks.length)
                scores = qf[:, :, qsl] @ kb[:, :, ksl].transpose(-1, -2) * scale
                mask = _block_mask(vk, qs, ks, diagonal, q.device)
                if mask is not None:
                    scores = scores.masked_fill(~mask, HIDDEN)
                block_lse = torch.logsumexp(scores, dim=-1)
                block_out = torch.softmax(scores, dim=-1) @ vb[:, :, ksl]
                new_lse = torch.logaddexp(lse[:, :, qsl], block_lse)
                out[:, :, qsl] = (out[:, :, qsl] * torch.exp(lse[:, :, qsl] - new_lse)[..., None]
                                  + block_out * torch.exp(block_lse - new_lse)[..., None])
                lse[:, :, qsl] = new_lse
            if pending is not None:
                kv = pending.wait()
        ctx.save_for_backward(q, k, v, out, lse, *(() if valid is None else (valid,)))
        ctx.has_valid, ctx.causal, ctx.scale, ctx.group, ctx.layout = valid is not None, causal, scale, group, layout
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, *rest = ctx.saved_tensors
        valid = rest[0] if ctx.has_valid else None
        group, causal, scale, layout = ctx.group, ctx.causal, ctx.scale, ctx.layout
        batch, heads, local, dk_dim = q.shape
        groups = heads // k.shape[1]
        rank, size = group.rank, group.size
        q_segs = segments(local, rank, size, layout)
        qf, do = q.float(), grad_out.float()
        delta = (do * out).sum(-1)  # [B, H, Ll]
        dq = torch.zeros_like(qf)
        kv = torch.cat([k, v], dim=-1)
        acc = kv.new_zeros(kv.shape, dtype=torch.float32)  # gradient of the block now held, travelling with it
        for step in range(size):
            src = (rank - step) % size
            kb = _expand_heads(kv[..., :dk_dim].float(), groups)
            vb = _expand_heads(kv[..., dk_dim:].float(), groups)
            vk = None if valid is None else valid[src]
            dkb, dvb = torch.zeros_like(kb), torch.zeros_like(vb)
            for qs, ks, diagonal in _pairs(q_segs, segments(local, src, size, layout), causal):
                qsl = slice(qs.local_start, qs.local_start + qs.length)
                ksl = slice(ks.local_start, ks.local_start + ks.length)
                scores = qf[:, :, qsl] @ kb[:, :, ksl].transpose(-1, -2) * scale
                mask = _block_mask(vk, qs, ks, diagonal, q.device)
                if mask is not None:
                    scores = scores.masked_fill(~mask, HIDDEN)
                p = torch.exp(scores - lse[:, :, qsl, None])
                dvb[:, :, ksl] += p.transpose(-1, -2) @ do[:, :, qsl]
                dp = do[:, :, qsl] @ vb[:, :, ksl].transpose(-1, -2)
                ds = p * (dp - delta[:, :, qsl, None])
                if mask is not None:
                    ds = ds.masked_fill(~mask, 0.0)
                dq[:, :, qsl] += ds @ kb[:, :, ksl] * scale
                dkb[:, :, ksl] += ds.transpose(-1, -2) @ qf[:, :, qsl] * scale
            acc = acc + torch.cat([_reduce_heads(dkb, groups), _reduce_heads(dvb, groups)], dim=-1)
            nxt, prv = (rank + 1) % size, (rank - 1) % size
            if size > 1:
                acc_pending = group.exchange_start(acc, nxt, prv)
                kv_pending = group.exchange_start(kv, nxt, prv) if step < size - 1 else None
                acc = acc_pending.wait()
                if kv_pending is not None:
                    kv = kv_pending.wait()
        dk, dv = acc[..., :dk_dim].to(k.dtype), acc[..., dk_dim:].to(v.dtype)
        return dq.to(q.dtype), dk, dv, None, None, None, None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor | None,
    *,
    causal: bool,
    scale: float | None,
    group: SequenceGroup,
    layout: str = "contiguous",
    layer: str = "",
) -> torch.Tensor:
    """Ring attention: k / v blocks travel round the ring, merged by online softmax (see the module doc)."""
    if q.shape[1] % k.shape[1]:
        raise GroupError(f"{layer}: {q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _RingAttention.apply(q, k, v, valid, causal, scale, group, layout)
