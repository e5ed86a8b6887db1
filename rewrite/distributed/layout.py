"""Shard layouts: which global positions of a sequence each rank holds.

- `contiguous`: rank r holds positions [r L/P, (r+1) L/P).
- `zigzag`: the sequence is cut into 2P equal chunks and rank r holds chunks r and 2P-1-r, so under
  a causal mask every rank has the same amount of work (ring attention's load balance).

A rank's share is one or two *segments* (runs of consecutive global positions), in increasing
order of position, so causal order holds inside the local shard too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rewrite.errors import RewriteError

LAYOUTS = ("contiguous", "zigzag")


class LayoutError(RewriteError):
    """A sequence does not split evenly under a layout."""


@dataclass(frozen=True)
class Segment:
    """`length` consecutive global positions from `start`, at `local_start` of the rank's shard."""

    start: int
    length: int
    local_start: int
    chunk: int  # index of this segment among every rank's segments in global order

    @property
    def stop(self) -> int:
        return self.start + self.length


def chunks_per_rank(layout: str) -> int:
    """Segments each rank holds under `layout`."""
    if layout not in LAYOUTS:
        raise LayoutError(f"unknown shard layout {layout!r} (supported: {', '.join(LAYOUTS)})")
    return 1 if layout == "contiguous" else 2


def segments(local_length: int, rank: int, size: int, layout: str) -> list[Segment]:
    """The segments rank `rank` of `size` holds when its shard is `local_length` tokens long."""
    if chunks_per_rank(layout) == 1:
        return [Segment(rank * local_length, local_length, 0, rank)]
    if local_length % 2:
        raise LayoutError(f"zigzag needs an even shard length (2 chunks per rank), got {local_length}")
    c = local_length // 2
    late = 2 * size - 1 - rank
    return [Segment(rank * c, c, 0, rank), Segment(late * c, c, c, late)]


def global_positions(local_length: int, rank: int, size: int, layout: str, device=None) -> torch.Tensor:
    """[local_length] int64: the global position of each token of rank `rank`'s shard."""
    parts = [torch.arange(s.start, s.stop, device=device) for s in segments(local_length, rank, size, layout)]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def check_divisible(length: int, size: int, layout: str) -> None:
    """Raise LayoutError unless `length` splits into `size` equal shards under `layout`."""
    parts = size * chunks_per_rank(layout)
    if length % parts:
        raise LayoutError(
            f"a sequence of {length} tokens does not split into {parts} equal chunks ({size} ranks, {layout} "
            f"layout); pad it to a multiple of {parts} (rewrite.distributed.pad_to_multiple)"
        )


def shard(x: torch.Tensor, rank: int, size: int, layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """Rank `rank`'s share of the full-length tensor `x` along `dim`."""
    length = x.shape[dim]
    check_divisible(length, size, layout)
    index = global_positions(length // size, rank, size, layout, device=x.device)
    return x.index_select(dim, index)


def unshard(parts: list[torch.Tensor], layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """The full-length tensor from every rank's share (the inverse of `shard`)."""
    size = len(parts)
    local = parts[0].shape[dim]
    order = torch.cat([global_positions(local, r, size, layout) for r in range(size)])
    stacked = torch.cat(parts, dim=dim)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return stacked.index_select(dim, inverse.to(stacked.device))


def gathered_order(local_length: int, size: int, layout: str, device=None) -> torch.Tensor:
    """Index that puts the ranks' shards, concatenated in rank order, into global order."""
    order = torch.cat([global_positions(local_length, r, size, layout) for r in range(size)])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return inverse.to(device) if device is not None else inverse
