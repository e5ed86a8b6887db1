"""Linear attention (plain, decayed, gated) over a sequence split across ranks.

Each rank computes, for each of its segments (one, or two under zigzag), the segment's own final
state S (from zero) and its decay product a in one pass of plain tensor ops, the starting state of
the segment from every earlier segment's (S, a) (`state_prefix`: LASP-2 or all-scan), and then its
outputs with one call to `rewrite.kernels.linear_attention` from that starting state. Non-causal
attention needs only the sum of every segment's state.

Kernel layout: q [B, T, H, K] (feature map already applied), k [B, T, Hkv, K], v [B, T, Hkv, V],
g log-decays as the kernel takes them (none, constant [Hkv], scalar [B, T, Hkv], vector [B, T, Hkv, K]).
"""

from __future__ import annotations

import torch

from rewrite.distributed.groups import GroupError, SequenceGroup
from rewrite.distributed.layout import segments
from rewrite.distributed.state_prefix import LINEAR_STRATEGIES, allscan_prefix, lasp2_prefix, total_state


def _segment_gate(g: torch.Tensor | None, decay: str, start: int, length: int) -> torch.Tensor | None:
    if g is None or decay == "constant":
        return g
    return g[:, start: start + length]


def chunk_state(
    k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, decay: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(S [B, Hkv, K, V], a [B, Hkv, K]) of one chunk: its final state from zero, and its decay product.

    S = sum_t exp(G_T - G_t) k_t^T v_t with G the cumulative log-decay, a = exp(G_T) (float32).
    """
    kf, vf = k.float(), v.float()
    batch, length, kv_heads, dim = k.shape
    if decay == "none" or g is None:
        weight, total = None, kf.new_zeros(batch, kv_heads, dim)
    elif decay == "constant":
        steps = torch.arange(length - 1, -1, -1, device=k.device, dtype=torch.float32)
        weight = torch.exp(steps[None, :, None, None] * g.float()[None, None, :, None])
        total = (g.float() * length)[None, :, None].expand(batch, kv_heads, dim)
    else:
        cum = torch.cumsum(g.float(), dim=1)
        last = cum[:, -1:]
        weight = torch.exp(last - cum)
        total = last[:, 0]
        if decay == "scalar":
            weight, total = weight[..., None], total[..., None].expand(batch, kv_heads, dim)
    keys = kf if weight is None else kf * weight
    state = torch.einsum("bthk,bthv->bhkv", keys, vf)
    return state, torch.exp(total)


def sp_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    *,
    decay: str,
    scale: float,
    causal: bool,
    group: SequenceGroup,
    layout: str = "contiguous",
    strategy: str = "lasp2",
    scan_blocks: int = 4,
) -> torch.Tensor:
    """This rank's outputs [B, T, H, V] of linear attention over the whole split sequence."""
    from rewrite.kernels.linear_attention import linear_attention  # loaded on first use

    if strategy not in LINEAR_STRATEGIES:
        raise GroupError(f"unknown linear-mixer strategy {strategy!r} (supported: {', '.join(LINEAR_STRATEGIES)})")
    batch, length, heads, dim = q.shape
    kv_heads = k.shape[2]
    if not causal:
        if decay != "none":
            raise GroupError(f"non-causal linear attention has no decay, got {decay!r}")
        state, _ = chunk_state(k, v, None, "none")
        total = total_state(state[None], group)  # [B, Hkv, K, V]
        qg = q.float().view(batch, length, kv_heads, heads // kv_heads, dim)
        o = torch.einsum("btngk,bnkv->btngv", qg, total) * scale
        return o.reshape(batch, length, heads, -1).to(q.dtype)
    segs = segments(length, group.rank, group.size, layout)
    parts = [chunk_state(k[:, s.local_start: s.local_start + s.length], v[:, s.local_start: s.local_start + s.length],
                         _segment_gate(g, decay, s.local_start, s.length), decay) for s in segs]
    if strategy == "allscan":
        starts = [allscan_prefix(parts[0][0], parts[0][1], group, scan_blocks, layout)]
    else:
        states = torch.stack([p[0] for p in parts])
        decays = torch.stack([p[1] for p in parts])
        starts = lasp2_prefix(states, decays, [s.chunk for s in segs], group)
    outs = []
    for seg, start in zip(segs, starts):
        sl = slice(seg.local_start, seg.local_start + seg.length)
        o, _ = linear_attention(
            q[:, sl], k[:, sl], v[:, sl], _segment_gate(g, decay, seg.local_start, seg.length),
            decay=decay, scale=scale, initial_state=start,
        )
        outs.append(o)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def sp_packed_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    *,
    decay: str,
    scale: float,
    starts: torch.Tensor,
    group: SequenceGroup,
    layout: str = "contiguous",
    strategy: str = "lasp2",
    scan_blocks: int = 4,
) -> torch.Tensor:
    """Causal linear attention of packed sequences (one row, `starts` [1, Ll] True at each sequence start)
    split contiguously over the ranks, a sequence possibly crossing rank boundaries.

    A rank's chunk summary is the state of its last sequence piece (from that piece's start) and a decay
    product that is 0 when a sequence starts inside the rank (the state resets there), so the usual prefix
    (`lasp2` / `allscan`) gives each rank the state its first piece continues from; it flows only into
    that piece (none when the rank's first token starts a sequence). One kernel call with the rank's
    local `cu_seqlens` then computes every piece.
    """
    from rewrite.kernels.linear_attention import linear_attention  # loaded on first use

    if layout != "contiguous":
        raise GroupError(f"packed sequences under sequence parallelism need the contiguous layout, not {layout!r}")
    if q.shape[0] != 1 or starts.shape[0] != 1:
        raise GroupError(f"packed sequences come in one row (batch 1), got batch {q.shape[0]}")
    if strategy not in LINEAR_STRATEGIES:
        raise GroupError(f"unknown linear-mixer strategy {strategy!r} (supported: {', '.join(LINEAR_STRATEGIES)})")
    length = q.shape[1]
    begins = [int(i) for i in torch.nonzero(starts[0]).reshape(-1).tolist()]
    last = begins[-1] if begins else 0
    state, decay_product = chunk_state(k[:, last:], v[:, last:], _segment_gate(g, decay, last, length - last), decay)
    decay_product = decay_product * (0.0 if begins else 1.0)  # a start inside the rank cuts every earlier state
    if strategy == "allscan":
        incoming = allscan_prefix(state, decay_product, group, scan_blocks, layout)
    else:
        incoming = lasp2_prefix(state[None], decay_product[None], [group.rank], group)[0]
    continues = not (begins and begins[0] == 0)
    bounds = [0, *(i for i in begins if i > 0), length]
    # zero-weight use when the first token starts a sequence: every rank joins the prefix's backward
    initial = torch.cat([incoming * (1.0 if continues else 0.0),
                         incoming.new_zeros(len(bounds) - 2, *incoming.shape[1:])])
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=q.device)
    o, _ = linear_attention(q, k, v, g, decay=decay, scale=scale, initial_state=initial, cu_seqlens=cu_seqlens)
    return o
