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
- **Ulysses x ring** (`ulysses_ring_attention`): P = U x R ranks; Ulysses over each inner group of U
  consecutive ranks, then the ring over the R ranks holding the same head group (groups larger than
  the head count; zigzag stays balanced, GQA heads are not repeated).

Packed rows: `starts` [P, B, Ll] (every rank's sequence starts, gathered) keeps attention inside
each sequence: Ulysses runs the varlen kernel, the ring masks each block by sequence id.

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


def _inner_order(local: int, first: int, inner: int, size: int, layout: str, device) -> torch.Tensor | None:
    """Index putting the shards of ranks first .. first+inner-1, concatenated in rank order, into increasing
    global position (None when they already are); the result is the ring layout's shard of those ranks."""
    positions = torch.cat([global_positions(local, first + u, size, layout) for u in range(inner)])
    order = torch.argsort(positions)
    if torch.equal(order, torch.arange(order.numel())):
        return None
    return order.to(device)


def _inverse(order: torch.Tensor | None) -> torch.Tensor | None:
    return None if order is None else torch.argsort(order)


def _scatter_heads(x: torch.Tensor, per_rank: int, group: SequenceGroup, order: torch.Tensor | None) -> torch.Tensor:
    """[B, G*per_rank, Ll, D] -> [B, per_rank, G*Ll, D]: rank j keeps head group j of every rank's shard."""
    batch, _, local, dim = x.shape
    size = group.size
    send = x.reshape(batch, size, per_rank, local, dim).transpose(0, 1)
    got = all_to_all(send.contiguous(), group)  # [G(src), B, per_rank, Ll, D]
    full = got.permute(1, 2, 0, 3, 4).reshape(batch, per_rank, size * local, dim)
    return full if order is None else full.index_select(2, order)


def _gather_heads(o: torch.Tensor, group: SequenceGroup, local: int, order: torch.Tensor | None) -> torch.Tensor:
    """The inverse of `_scatter_heads`: [B, hq, G*Ll, Dv] (positions in `order`) -> [B, G*hq, Ll, Dv]."""
    back = _inverse(order)
    if back is not None:
        o = o.index_select(2, back)
    batch, hq, _, dv = o.shape
    size = group.size
    send = o.reshape(batch, hq, size, local, dv).permute(2, 0, 1, 3, 4)  # [G(dst), B, hq, Ll, Dv]
    got = all_to_all(send.contiguous(), group)  # [G(src head group), B, hq, Ll, Dv]
    return got.transpose(0, 1).reshape(batch, size * hq, local, dv)


def _kv_to_send(k: torch.Tensor, v: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k / v as sent by the all-to-all: all kv heads, or with fewer kv heads than ranks the one each
    destination's query heads read (no repeat to the query-head count)."""
    kv_heads = k.shape[1]
    if kv_heads >= size:
        return k, v
    index = torch.tensor([d * kv_heads // size for d in range(size)], device=k.device)
    return k.index_select(1, index), v.index_select(1, index)


def _full_rows(x: torch.Tensor, first: int, inner: int, order: torch.Tensor | None) -> torch.Tensor:
    """x [P, B, Ll] (one row per rank) -> [B, inner*Ll]: ranks first .. first+inner-1 in `order`."""
    rows = x[first: first + inner].permute(1, 0, 2).reshape(x.shape[1], inner * x.shape[2])
    return rows if order is None else rows.index_select(1, order)


def _packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_ids: torch.Tensor, *, causal: bool,
                      scale: float | None) -> torch.Tensor:
    """Attention within each packed sequence of the whole rows (q [B, H, L, D]) by the varlen kernel."""
    from rewrite.kernels.varlen_attention import varlen_attention  # loaded on first use

    batch, heads, length, _ = q.shape
    starts = torch.ones_like(seq_ids, dtype=torch.bool)
    starts[:, 1:] = seq_ids[:, 1:] != seq_ids[:, :-1]
    offsets = torch.nonzero(starts.reshape(-1)).reshape(-1)
    cu_seqlens = torch.cat([offsets, offsets.new_tensor([batch * length])]).to(torch.int32)

    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).reshape(batch * length, x.shape[1], x.shape[-1])

    o = varlen_attention(flat(q), flat(k), flat(v), cu_seqlens, causal=causal, scale=scale)
    return o.reshape(batch, length, heads, -1).transpose(1, 2)


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
    starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ulysses: all-to-all sequence -> heads, attention over the whole sequence, all-to-all back.

    `starts` [P, B, Ll] (packed sequences: True where a sequence starts) keeps attention inside each
    sequence, computed by the varlen kernel.
    """
    batch, heads, local, dim = q.shape
    kv_heads, size = k.shape[1], group.size
    check_ulysses(heads, kv_heads, size, layer)
    hq, hk = heads // size, kv_heads_sent(kv_heads, size)
    order = _inner_order(local, 0, size, size, layout, q.device)
    k_send, v_send = _kv_to_send(k, v, size)
    qf, kf, vf = _scatter_heads(q, hq, group, order), _scatter_heads(k_send, hk, group, order), _scatter_heads(
        v_send, hk, group, order)
    length = size * local
    if starts is not None:
        o = _packed_attention(qf, kf, vf, sequence_ids(_full_rows(starts, 0, size, order)), causal=causal,
                              scale=scale)
    else:
        valid_full = None if valid is None else _full_rows(valid, 0, size, order)
        mask = _allowed(None, valid_full, causal, length, length, q.device)
        o = F.scaled_dot_product_attention(
            qf, kf, vf, attn_mask=mask, is_causal=causal and mask is None, scale=scale, enable_gqa=hq != hk
        )  # [B, hq, L, Dv]
    return _gather_heads(o, group, local, order)


def sequence_ids(starts: torch.Tensor) -> torch.Tensor:
    """[B, L] int64: the index of each token's packed sequence, from `starts` [B, L] bool in global order."""
    return torch.cumsum(starts.long(), dim=1)


# --- Ulysses x ring ------------------------------------------------------------------------------


def ulysses_ring_sizes(heads: int, kv_heads: int, size: int) -> list[int]:
    """Inner (Ulysses) sizes U for which `size` ranks split into U heads x size/U ring ranks."""
    return [u for u in ulysses_group_sizes(heads, kv_heads) if size % u == 0]


def default_inner_size(heads: int, kv_heads: int, size: int) -> int:
    """The largest valid inner size below `size` (fewest ring steps), or `size` itself when none is."""
    sizes = ulysses_ring_sizes(heads, kv_heads, size)
    below = [u for u in sizes if u < size]
    return max(below) if below and max(below) > 1 else max(sizes)


def check_ulysses_ring(heads: int, kv_heads: int, size: int, inner: int, layer: str = "") -> None:
    """Raise GroupError unless `size` ranks factor as `inner` Ulysses ranks (dividing the heads) x ring ranks."""
    valid = ulysses_ring_sizes(heads, kv_heads, size)
    if inner not in valid:
        where = f"{layer}: " if layer else ""
        choices = ", ".join(f"{u} x {size // u}" for u in valid)
        raise GroupError(
            f"{where}ulysses_ring with {size} ranks cannot use a Ulysses size of {inner}: it must divide the group "
            f"size and the {heads} query heads, and divide or be a multiple of the {kv_heads} kv heads (valid "
            f"ulysses x ring factorisations: {choices})"
        )


def split_group(group: SequenceGroup, inner: int) -> tuple[SequenceGroup, SequenceGroup]:
    """(inner, outer) subgroups: ranks i*inner .. i*inner+inner-1 form inner group i (Ulysses); ranks with the
    same index in their inner group form an outer group (ring)."""
    size = group.size
    outer = size // inner
    inner_parts = tuple(tuple(range(i * inner, (i + 1) * inner)) for i in range(outer))
    outer_parts = tuple(tuple(range(u, size, inner)) for u in range(inner))
    return group.subgroup(inner_parts), group.subgroup(outer_parts)


def ulysses_ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor | None,
    *,
    causal: bool,
    scale: float | None,
    group: SequenceGroup,
    inner: int,
    layout: str = "contiguous",
    layer: str = "",
    starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ulysses x ring: heads over `inner` ranks, then ring attention over the size/inner outer ranks.

    An inner all-to-all gives each rank H/U query heads (and its kv heads, not repeated) of the U shards
    of its inner group; those shards together are the outer (ring) rank's shard of the sequence under
    the same layout with 2R chunks (zigzag stays balanced), so the ring runs unchanged over them.
    """
    batch, heads, local, dim = q.shape
    kv_heads, size = k.shape[1], group.size
    check_ulysses_ring(heads, kv_heads, size, inner, layer)
    inner_group, outer_group = split_group(group, inner)
    ring_rank, outer = group.rank // inner, size // inner
    hq, hk = heads // inner, kv_heads_sent(kv_heads, inner)
    orders = [_inner_order(local, j * inner, inner, size, layout, q.device) for j in range(outer)]
    order = orders[ring_rank]
    k_send, v_send = _kv_to_send(k, v, inner)
    qf, kf, vf = (_scatter_heads(q, hq, inner_group, order), _scatter_heads(k_send, hk, inner_group, order),
                  _scatter_heads(v_send, hk, inner_group, order))
    valid_ring = None
    if valid is not None:
        valid_ring = torch.stack([_full_rows(valid, j * inner, inner, orders[j]) for j in range(outer)])
    seq_ids = None
    if starts is not None:
        seq_ids = sequence_ids(_global_rows(starts, layout))
    scale = dim ** -0.5 if scale is None else float(scale)
    o = _RingAttention.apply(qf, kf, vf, valid_ring, causal, scale, outer_group, layout, seq_ids)
    return _gather_heads(o, inner_group, local, order)


def _global_rows(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x [P, B, Ll] (every rank's shard) -> [B, P*Ll] in global order."""
    size, batch, local = x.shape
    rows = x.permute(1, 0, 2).reshape(batch, size * local)
    if layout == "contiguous":
        return rows
    return rows.index_select(1, gathered_order(local, size, layout, device=x.device))


# --- ring ----------------------------------------------------------------------------------------


def _pairs(q_segs: list[Segment], k_segs: list[Segment], causal: bool, seq_ids: torch.Tensor | None = None):
    """(q segment, k segment, needs a causal mask) for every pair with at least one visible key."""
    for qs in q_segs:
        for ks in k_segs:
            if causal and ks.start > qs.stop - 1:
                continue  # every key after every query
            if seq_ids is not None and not _share_a_sequence(seq_ids, qs, ks):
                continue
            yield qs, ks, causal and ks.stop - 1 > qs.start


def _share_a_sequence(seq_ids: torch.Tensor, qs: Segment, ks: Segment) -> bool:
    """Whether some row has a packed sequence holding tokens of both segments (sequence ids rise with position)."""
    q_ids, k_ids = seq_ids[:, qs.start: qs.stop], seq_ids[:, ks.start: ks.stop]
    return bool(((k_ids[:, -1] >= q_ids[:, 0]) & (k_ids[:, 0] <= q_ids[:, -1])).any())


def _block_mask(valid_k: torch.Tensor | None, qs: Segment, ks: Segment, causal: bool, device,
                seq_ids: torch.Tensor | None = None) -> torch.Tensor | None:
    mask = None
    if causal:
        qpos = torch.arange(qs.start, qs.stop, device=device)[:, None]
        kpos = torch.arange(ks.start, ks.stop, device=device)[None, :]
        mask = (kpos <= qpos)[None, None]
    if valid_k is not None:
        kv = valid_k[:, None, None, ks.local_start: ks.local_start + ks.length]
        mask = kv if mask is None else mask & kv
    if seq_ids is not None:  # packed sequences: a query sees only keys of its own sequence
        same = seq_ids[:, None, qs.start: qs.stop, None] == seq_ids[:, None, None, ks.start: ks.stop]
        mask = same if mask is None else mask & same
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
    def forward(ctx, q, k, v, valid, causal: bool, scale: float, group: SequenceGroup, layout: str, seq_ids=None):
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
            for qs, ks, diagonal in _pairs(q_segs, segments(local, src, size, layout), causal, seq_ids):
                qsl = slice(qs.local_start, qs.local_start + qs.length)
                ksl = slice(ks.local_start, ks.local_start + ks.length)
                scores = qf[:, :, qsl] @ kb[:, :, ksl].transpose(-1, -2) * scale
                mask = _block_mask(vk, qs, ks, diagonal, q.device, seq_ids)
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
        ctx.seq_ids = seq_ids
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, *rest = ctx.saved_tensors
        valid = rest[0] if ctx.has_valid else None
        group, causal, scale, layout, seq_ids = ctx.group, ctx.causal, ctx.scale, ctx.layout, ctx.seq_ids
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
            for qs, ks, diagonal in _pairs(q_segs, segments(local, src, size, layout), causal, seq_ids):
                qsl = slice(qs.local_start, qs.local_start + qs.length)
                ksl = slice(ks.local_start, ks.local_start + ks.length)
                scores = qf[:, :, qsl] @ kb[:, :, ksl].transpose(-1, -2) * scale
                mask = _block_mask(vk, qs, ks, diagonal, q.device, seq_ids)
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
        return dq.to(q.dtype), dk, dv, None, None, None, None, None, None


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
    starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ring attention: k / v blocks travel round the ring, merged by online softmax (see the module doc).

    `starts` [P, B, Ll] (packed sequences: True where a sequence starts) keeps attention inside each sequence.
    """
    if q.shape[1] % k.shape[1]:
        raise GroupError(f"{layer}: {q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    seq_ids = None if starts is None else sequence_ids(_global_rows(starts, layout))
    return _RingAttention.apply(q, k, v, valid, causal, scale, group, layout, seq_ids)
