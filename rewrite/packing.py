"""Prepacking for data loaders: bin-pack variable-length sequences into fixed token budgets.

`pack_lengths` groups sequence indices into bins whose total length fits a token budget (best fit,
longest first), `TokenBudgetSampler` yields those bins as a DataLoader batch sampler, and
`PackedCollator` turns one bin of examples into a single packed row: tokens back to back, with
`position_ids` restarting at 0 per sequence and `cu_seqlens` marking the boundaries. A module
optimized with the `varlen` pass on such a row runs every sequence on its own, with no padding.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch


def pack_lengths(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of at most `budget` tokens each (best fit decreasing).

    Every index appears in exactly one bin; within a bin indices keep ascending order. A sequence
    longer than the budget is an error (split or truncate it first).
    """
    if budget < 1:
        raise ValueError(f"pack_lengths: budget must be >= 1 token, got {budget}")
    for i, n in enumerate(lengths):
        if n < 0 or n > budget:
            raise ValueError(f"pack_lengths: sequence {i} has {n} tokens, outside 0..budget ({budget})")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin number), sorted
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, b = free.pop(at)
        else:
            room, b = budget, len(bins)
            bins.append([])
        bins[b].append(i)
        bisect.insort(free, (room - n, b))
    return [sorted(b) for b in bins]


class TokenBudgetSampler:
    """DataLoader batch sampler: each batch is one bin of `pack_lengths(lengths, budget)`.

    shuffle=True shuffles the order of the bins each epoch (seeded by `seed` and the epoch count).
    """

    def __init__(self, lengths: Sequence[int], budget: int, *, shuffle: bool = False, seed: int = 0):
        self.bins = pack_lengths(lengths, budget)
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def __iter__(self) -> Iterator[list[int]]:
        bins = list(self.bins)
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(bins)
            self.epoch += 1
        return iter(bins)

    def __len__(self) -> int:
        return len(self.bins)


class PackedCollator:
    """Collate examples (mappings of 1-D per-token fields) into one packed row.

    Returns every per-token field concatenated as [1, T] (e.g. input_ids, labels), plus
    `position_ids` [1, T] restarting at 0 per example and `cu_seqlens` [N + 1] int32. Fields named
    in `label_fields` get `label_pad` at each sequence's first token, so a next-token loss never
    reads across a boundary. `pad_to_multiple_of` appends one filler sequence of `pad_token_id`
    tokens (a sequence of its own, so it changes no real token) to keep T on a fixed grid.
    """

    def __init__(self, *, label_fields: Sequence[str] = ("labels",), label_pad: int = -100,
                 pad_to_multiple_of: int | None = None, pad_token_id: int = 0):
        self.label_fields = tuple(label_fields)
        self.label_pad = label_pad
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_token_id = pad_token_id

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("PackedCollator: got no examples")
        fields = list(examples[0])
        columns: dict[str, list[torch.Tensor]] = {f: [] for f in fields}
        lengths = []
        for i, example in enumerate(examples):
            if list(example) != fields:
                raise ValueError(f"PackedCollator: example {i} has fields {list(example)}, expected {fields}")
            values = {f: torch.as_tensor(example[f]) for f in fields}
            sizes = {f: v.shape[0] for f, v in values.items() if v.dim() == 1}
            if len(sizes) != len(values) or len(set(sizes.values())) != 1:
                raise ValueError(f"PackedCollator: example {i} needs 1-D fields of one length, got "
                                 f"{ {f: tuple(v.shape) for f, v in values.items()} }")
            lengths.append(next(iter(sizes.values())))
            for f, v in values.items():
                if f in self.label_fields and v.numel():
                    v = v.clone()
                    v[0] = self.label_pad
                columns[f].append(v)
        total = sum(lengths)
        if self.pad_to_multiple_of:
            filler = -total % self.pad_to_multiple_of
            if filler:
                lengths.append(filler)
                for f in fields:
                    fill = self.label_pad if f in self.label_fields else self.pad_token_id
                    columns[f].append(torch.full((filler,), fill, dtype=columns[f][0].dtype))
        out = {f: torch.cat(columns[f])[None] for f in fields}
        out["position_ids"] = torch.cat([torch.arange(n) for n in lengths])[None]
        out["cu_seqlens"] = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        return out


__all__ = ["PackedCollator", "TokenBudgetSampler", "pack_lengths"]
