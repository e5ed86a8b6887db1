"""The functions the `sequence_parallel` pass puts in the graph; each runs on one rank's shard.

The graph names its sequence group, strategy and layout as plain values (so `.code` stays readable
and plans stay data); the group is resolved when the function runs (`groups.get_group`).

- `sp_positions(local)`: an `arange` over the local length becomes the global positions of the
  rank's tokens (RoPE, absolute position embeddings, the positions a mask is built from);
- `sp_take(table, dim, length)`: a slice [0, length) of a model buffer (a position-id or rotary
  table) becomes the rank's rows of the global slice;
- `sp_attention(q, k, v, mask)`: softmax attention by `ulysses`, `ring` or `ulysses_ring`;
- `sp_mixer(q, k, v, *params, kind=...)`: a linear mixer kind with its kernels made sequence-parallel.
"""

from __future__ import annotations

from typing import Any

import torch

from rewrite.distributed.groups import GroupError, get_group
from rewrite.distributed.layout import LAYOUTS, global_positions, segments
from rewrite.distributed.recurrent_kernels import SequenceParallelKernels, sp_short_conv
from rewrite.distributed.softmax_attention import (
    default_inner_size,
    gather_key_validity,
    ring_attention,
    ulysses_attention,
    ulysses_ring_attention,
)
from rewrite.errors import PassError

SOFTMAX_STRATEGIES = ("ulysses", "ring", "ulysses_ring")


def sp_positions(local: torch.Tensor, *, group: str = "world", layout: str = "contiguous") -> torch.Tensor:
    """The global positions of this rank's tokens, for `local` = arange(local length)."""
    sg = get_group(group)
    return global_positions(local.shape[0], sg.rank, sg.size, layout, device=local.device).to(local.dtype)


def sp_take(table: torch.Tensor, dim: int, length: int, *, group: str = "world",
            layout: str = "contiguous") -> torch.Tensor:
    """Rows of `table[..., 0:global length]` along `dim` that belong to this rank's `length` tokens."""
    sg = get_group(group)
    if length * sg.size > table.shape[dim]:
        raise GroupError(
            f"a position table of {table.shape[dim]} entries is shorter than the global sequence of "
            f"{length * sg.size} tokens ({sg.size} ranks x {length})"
        )
    return table.index_select(dim, global_positions(length, sg.rank, sg.size, layout, device=table.device))


def key_validity(mask: torch.Tensor, batch: int, *, causal: bool, negated: bool, check: bool,
                 layer: str) -> torch.Tensor:
    """[B, Ll] bool: real keys of the local shard, from the local mask (causal / key padding only)."""
    from rewrite.mixers.masks import check_mask_form  # loaded on first use
    from rewrite.mixers.masks import key_validity as reduce_mask

    valid = reduce_mask(mask, batch, negated)
    if check:
        try:
            check_mask_form(mask, valid, causal, layer, negated, limit=(
                "sequence parallelism keeps only which keys are real, so it carries only causal and key-padding "
                "masks"))
        except PassError as error:
            raise PassError("sequence_parallel", str(error).split(": ", 1)[-1]) from None
    return valid


def packed_starts(positions: torch.Tensor, batch: int) -> torch.Tensor:
    """[B, Ll] bool: where packed sequences start in this rank's shard (their positions restart at 0)."""
    starts = positions == 0
    if starts.dim() == 1:
        starts = starts[None]
    return starts.expand(batch, starts.shape[-1])


def check_packed_mask(mask: torch.Tensor, starts: torch.Tensor, *, causal: bool, negated: bool, layer: str,
                      segment_starts: list[int] | None = None) -> None:
    """Raise PassError unless the local mask keeps each packed sequence to itself (causal or not), or is the
    plain causal (or all-visible) mask of a model that does not see the packing; skipped while tracing.

    Only query / key pairs inside one segment of the shard (`segment_starts`; zigzag has two) are compared:
    across a zigzag shard's segments the model sees an adjacency that is not there.
    """
    from rewrite.mixers.masks import visible  # loaded on first use

    if type(mask) is not torch.Tensor or torch.compiler.is_compiling():
        return
    vis = visible(mask, negated)
    while vis.dim() < 4:
        vis = vis.unsqueeze(0)
    length = starts.shape[-1]
    plain = torch.ones(length, length, dtype=torch.bool, device=mask.device)
    if causal:
        plain = plain.tril()
    ids = torch.cumsum(starts.long(), dim=1)
    packed = (ids[:, None, :, None] == ids[:, None, None, :]) & plain
    segment = torch.zeros(length, dtype=torch.long, device=mask.device)
    for begin in segment_starts or [0]:
        segment[begin:] += 1
    compared = segment[:, None] == segment[None, :]

    def agrees(expected: torch.Tensor) -> bool:
        return not bool(((vis != expected) & compared).any())

    if vis.shape[-2:] != (length, length) or not (agrees(packed) or agrees(plain)):
        raise PassError("sequence_parallel", f"at {layer}: with packed sequences the attention mask must keep each "
                        "sequence to itself (as Hugging Face builds it from restarting position_ids) or be the plain "
                        f"{'causal ' if causal else ''}mask; this one is neither (padding or another pattern)")


def sp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    causal: bool,
    scale: float | None = None,
    mask_negated: bool = False,
    check_mask: bool = True,
    strategy: str = "ulysses",
    group: str = "world",
    layout: str = "contiguous",
    layer: str = "",
    inner: int | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of this rank's shard over the whole sequence. q [B, H, Ll, D], k / v [B, Hkv, Ll, D].

    `inner`: the Ulysses size of `ulysses_ring` (default: `default_inner_size`). `positions` (packed rows): each
    token's position in its own sequence, restarting at 0; attention then stays inside each sequence.
    """
    sg = get_group(group)
    if layout not in LAYOUTS:
        raise GroupError(f"unknown shard layout {layout!r} (supported: {', '.join(LAYOUTS)})")
    valid = starts = None
    if positions is not None:
        local_starts = packed_starts(positions, q.shape[0])
        if mask is not None and check_mask:
            check_packed_mask(mask, local_starts, causal=causal, negated=mask_negated, layer=layer,
                              segment_starts=[seg.local_start for seg in segments(q.shape[2], sg.rank, sg.size, layout)])
        starts = sg.all_gather(local_starts.to(torch.uint8)).bool()  # [P, B, Ll]
    elif mask is not None:
        local = key_validity(mask, q.shape[0], causal=causal, negated=mask_negated, check=check_mask, layer=layer)
        valid = gather_key_validity(local, sg)  # None without padding anywhere: the unmasked (faster) path
    common = {"causal": causal, "scale": scale, "group": sg, "layout": layout, "layer": layer, "starts": starts}
    if strategy == "ulysses":
        return ulysses_attention(q, k, v, valid, **common)
    if strategy == "ring":
        return ring_attention(q, k, v, valid, **common)
    if strategy == "ulysses_ring":
        if inner is None:
            inner = default_inner_size(q.shape[1], k.shape[1], sg.size)
        return ulysses_ring_attention(q, k, v, valid, inner=inner, **common)
    raise GroupError(f"unknown softmax strategy {strategy!r} (supported: {', '.join(SOFTMAX_STRATEGIES)})")


def sp_causal_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    group: str = "world",
    layout: str = "contiguous",
) -> torch.Tensor:
    """A causal depthwise conv over the tokens of this rank's shard x [B, C, T] (weight [C, 1, K]): what
    `conv1d(x, weight, bias, padding=K-1, groups=C)[..., :T]` of the whole sequence gives this shard, each segment
    reading the K-1 inputs before it from the rank holding them."""
    y, _ = sp_short_conv(x.transpose(1, 2), weight[:, 0], bias, False, group=get_group(group), layout=layout)
    return y.transpose(1, 2)


def sp_mixer(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *params: torch.Tensor,
    kind: str,
    strategy: str = "lasp2",
    group: str = "world",
    layout: str = "contiguous",
    scan_blocks: int = 4,
    positions: torch.Tensor | None = None,
    **mixer_kwargs: Any,
) -> torch.Tensor:
    """The mixer `kind` on this rank's shard, its token-mixing kernels run over the whole sequence.

    `positions` (packed rows): each token's position in its own sequence; states then restart at each
    sequence start, and the mixer gets no mask (a packed row has no padding; its mask is checked instead).
    """
    from rewrite.mixers import KINDS  # loaded on first use

    if kind not in KINDS:
        raise GroupError(f"unknown mixer kind {kind!r} (known: {', '.join(KINDS)})")
    layer = str(mixer_kwargs.get("layer", ""))
    starts = None
    if positions is not None:
        starts = packed_starts(positions, q.shape[0])
        mask = mixer_kwargs.pop("mask", None)
        if mask is not None and mixer_kwargs.get("check_mask", True):
            check_packed_mask(mask, starts, causal=KINDS[kind].causal, negated=bool(mixer_kwargs.get("mask_negated")),
                              layer=layer)
    mode = SequenceParallelKernels(get_group(group), layout=layout, strategy=strategy, scan_blocks=scan_blocks,
                                   layer=layer, starts=starts)
    with mode:
        return KINDS[kind].fn(q, k, v, *params, **mixer_kwargs)
