"""The functions the `sequence_parallel` pass puts in the graph; each runs on one rank's shard.

The graph names its sequence group, strategy and layout as plain values (so `.code` stays readable
and plans stay data); the group is resolved when the function runs (`groups.get_group`).

- `sp_positions(local)`: an `arange` over the local length becomes the global positions of the
  rank's tokens (RoPE, absolute position embeddings, the positions a mask is built from);
- `sp_take(table, dim, length)`: a slice [0, length) of a model buffer (a position-id or rotary
  table) becomes the rank's rows of the global slice;
- `sp_attention(q, k, v, mask)`: softmax attention by `ulysses` or `ring`;
- `sp_mixer(q, k, v, *params, kind=...)`: a linear mixer kind with its kernels made sequence-parallel.
"""

from __future__ import annotations

from typing import Any

import torch

from rewrite.distributed.groups import GroupError, get_group
from rewrite.distributed.layout import LAYOUTS, global_positions
from rewrite.distributed.recurrent_kernels import SequenceParallelKernels
from rewrite.distributed.softmax_attention import gather_key_validity, ring_attention, ulysses_attention
from rewrite.errors import PassError

SOFTMAX_STRATEGIES = ("ulysses", "ring")


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
            check_mask_form(mask, valid, causal, layer, negated)
        except PassError as error:
            raise PassError("sequence_parallel", str(error).split(": ", 1)[-1]) from None
    return valid


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
) -> torch.Tensor:
    """Softmax attention of this rank's shard over the whole sequence. q [B, H, Ll, D], k / v [B, Hkv, Ll, D]."""
    sg = get_group(group)
    if layout not in LAYOUTS:
        raise GroupError(f"unknown shard layout {layout!r} (supported: {', '.join(LAYOUTS)})")
    valid = None
    if mask is not None:
        local = key_validity(mask, q.shape[0], causal=causal, negated=mask_negated, check=check_mask, layer=layer)
        valid = gather_key_validity(local, sg)  # None without padding anywhere: the unmasked (faster) path
    if strategy == "ulysses":
        return ulysses_attention(q, k, v, valid, causal=causal, scale=scale, group=sg, layout=layout, layer=layer)
    if strategy == "ring":
        return ring_attention(q, k, v, valid, causal=causal, scale=scale, group=sg, layout=layout, layer=layer)
    raise GroupError(f"unknown softmax strategy {strategy!r} (supported: {', '.join(SOFTMAX_STRATEGIES)})")


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
    **mixer_kwargs: Any,
) -> torch.Tensor:
    """The mixer `kind` on this rank's shard, its token-mixing kernels run over the whole sequence."""
    from rewrite.mixers import KINDS  # loaded on first use

    if kind not in KINDS:
        raise GroupError(f"unknown mixer kind {kind!r} (known: {', '.join(KINDS)})")
    mode = SequenceParallelKernels(get_group(group), layout=layout, strategy=strategy, scan_blocks=scan_blocks,
                                   layer=str(mixer_kwargs.get("layer", "")))
    with mode:
        return KINDS[kind].fn(q, k, v, *params, **mixer_kwargs)
