"""Inputs and loss under sequence parallelism: shard a batch along the sequence, reduce the loss globally.

- `shard_inputs`: every rank keeps its share of `input_ids`, `attention_mask` (2-D key padding),
  `position_ids`, `labels` (shifted first, so each rank's last token still has its target from the
  next rank) and any other [B, L, ...] tensor, by the shard layout.
- `sequence_parallel_loss`: token cross-entropy summed over this rank's real tokens and divided by
  the number of real tokens in the whole group, so the gradients summed over ranks are those of the
  single-process mean loss; the value returned is the global mean on every rank.
- `all_reduce_gradients`: sum parameter gradients over the group (what DDP / FSDP would do).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from rewrite.distributed.collectives import gather_sequence as _gather
from rewrite.distributed.groups import SequenceGroup, get_group
from rewrite.distributed.layout import check_divisible, chunks_per_rank, gathered_order, shard

IGNORE_INDEX = -100


def _resolve(group: str | SequenceGroup) -> SequenceGroup:
    return get_group(group) if isinstance(group, str) else group


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """labels [B, L] -> targets [B, L]: position t's target is token t + 1; the last has none."""
    tail = labels.new_full((labels.shape[0], 1), ignore_index)
    return torch.cat([labels[:, 1:], tail], dim=1)


def pad_to_multiple(x: torch.Tensor, multiple: int, value: Any = 0, dim: int = 1) -> torch.Tensor:
    """x padded at the end of `dim` with `value` to a length that is a multiple of `multiple`."""
    extra = -x.shape[dim] % multiple
    if not extra:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


def shard_inputs(
    inputs: Mapping[str, Any],
    *,
    group: str | SequenceGroup = "world",
    layout: str = "contiguous",
    labels_key: str = "labels",
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, Any]:
    """This rank's share of a batch (tensors [B, L, ...]); `labels` come back pre-shifted.

    The sequence length is `input_ids`' (or the first tensor's) dim 1; tensors of another length and
    non-tensors pass through unchanged. A 4-D attention mask is refused (only [B, L] key padding splits).
    """
    sg = _resolve(group)
    tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.dim() >= 2}
    if not tensors:
        raise ValueError("shard_inputs: no [B, L, ...] tensor to split")
    length = (inputs.get("input_ids") if isinstance(inputs.get("input_ids"), torch.Tensor)
              else next(iter(tensors.values()))).shape[1]
    check_divisible(length, sg.size, layout)
    out: dict[str, Any] = {}
    for key, value in inputs.items():
        if key == "attention_mask" and isinstance(value, torch.Tensor) and value.dim() > 2:
            raise ValueError(
                f"shard_inputs: attention_mask of shape {tuple(value.shape)} cannot be split; pass a [B, L] key-padding "
                "mask (the model builds its causal mask from it)"
            )
        if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[1] != length:
            out[key] = value
            continue
        if key == labels_key:
            value = shift_labels(value, ignore_index)
        out[key] = shard(value, sg.rank, sg.size, layout, dim=1)
    return out


def sequence_parallel_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    group: str | SequenceGroup = "world",
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Mean cross-entropy over the real tokens of the whole group (targets pre-shifted, see `shard_inputs`)."""
    sg = _resolve(group)
    local_sum = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=ignore_index,
                                reduction="sum")
    count = (targets != ignore_index).sum().to(torch.float32)
    totals = sg.all_reduce(torch.stack([local_sum.detach(), count]))
    global_count = totals[1].clamp(min=1)
    local = local_sum / global_count
    return local + (totals[0] / global_count - local).detach()


def all_reduce_gradients(module: torch.nn.Module, group: str | SequenceGroup = "world") -> None:
    """Sum every parameter's gradient over the group (each rank computed its shard's share)."""
    sg = _resolve(group)
    for p in module.parameters():
        if p.grad is not None:
            p.grad.copy_(sg.all_reduce(p.grad))


def gather_sequence(x: torch.Tensor, *, group: str | SequenceGroup = "world", layout: str = "contiguous",
                    dim: int = 1) -> torch.Tensor:
    """The full-length tensor from every rank's shard of it, in global order (differentiable)."""
    sg = _resolve(group)
    order = None if chunks_per_rank(layout) == 1 else gathered_order(x.shape[dim], sg.size, layout, device=x.device)
    return _gather(x, sg, dim % x.dim(), order)
