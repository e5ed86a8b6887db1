"""Which values of an optimized module hold real tokens: the description `rewrite.verify` reads.

A pass that changes what a module returns at padded positions publishes a `RealTokens` on its
`PassResult` (`result.real_tokens`); the pipeline report and `OptimizedModule.real_tokens` hand the
latest one on. The `varlen` pass is the one that does: its module writes 0 at padded tokens where
the original writes whatever its padded rows compute, so only real tokens can be compared.

A `RealTokens` says, in terms of the module's flat inputs and outputs only:

- which input is the padding mask (`mask_index` among the flat inputs, `mask_input` its name) and
  its polarity (`pads_are_true`), so `keep(flat_inputs)` gives the [batch, seq] real-token mask;
- for each flat output that differs at padding by design, where its batch and sequence dims are
  (`OutputTokens`); outputs not listed are compared in full;
- the capture's batch and sequence size symbols, so a captured graph's values can be packed to
  their real tokens too (`token_dims`, used to find the first diverging node);
- whether positions restart per row (`restarts_positions`): the module counts each row's positions
  from its first real token, where the original counts them from the row's first slot, so a
  row with padding before a real token matches the original only when the original is given those
  positions (`positions(keep)`, as Hugging Face's `position_ids`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx._pytree import tree_flatten_spec


@dataclass(frozen=True)
class OutputTokens:
    """Where one output's batch and sequence dims are, and which of its values are comparable.

    kind "tokens": a per-token tensor; its real-token values are comparable, its padded ones are not.
    `batch_dim` None means batch and sequence are merged into one dim at `seq_dim` (batch outer, or
    sequence outer when `seq_outer`).
    kind "rows": a value computed from the repadded tensor (a pooler reading the first slot, say); only
    rows whose `slots` (the sequence slots it reads, negative from the end) are real tokens are comparable,
    every slot of the row when `slots` is None. `batch_dim` None means no row is separate: it is comparable
    only when every row is.
    """

    kind: Literal["tokens", "rows"]
    batch_dim: int | None
    seq_dim: int | None = None
    seq_outer: bool = False
    slots: tuple[int, ...] | None = None


@dataclass
class RealTokens:
    """How to tell real tokens from padding in a module's inputs and outputs (see the module docstring)."""

    mask_input: str
    mask_index: int
    pads_are_true: bool
    outputs: dict[int, OutputTokens] = field(default_factory=dict)
    batch_symbols: frozenset[str] = frozenset()
    seq_symbols: frozenset[str] = frozenset()
    restarts_positions: bool = False

    def to_json(self) -> dict[str, Any]:
        """This description as JSON data (`from_json` reads it back), for a saved module."""
        return {
            "mask_input": self.mask_input, "mask_index": self.mask_index, "pads_are_true": self.pads_are_true,
            "outputs": {str(i): vars(layout) | {"slots": None if layout.slots is None else list(layout.slots)}
                        for i, layout in self.outputs.items()},
            "batch_symbols": sorted(self.batch_symbols), "seq_symbols": sorted(self.seq_symbols),
            "restarts_positions": self.restarts_positions,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RealTokens:
        """The description `to_json` wrote."""
        outputs = {int(i): OutputTokens(**{**layout, "slots": None if layout["slots"] is None else tuple(layout["slots"])})
                   for i, layout in data["outputs"].items()}
        return cls(data["mask_input"], int(data["mask_index"]), bool(data["pads_are_true"]), outputs,
                   frozenset(data["batch_symbols"]), frozenset(data["seq_symbols"]), bool(data["restarts_positions"]))

    def keep(self, flat_inputs: Sequence[Any]) -> torch.Tensor:
        """[batch, seq] bool, True at real tokens, from the module's flat inputs."""
        mask = flat_inputs[self.mask_index]
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise ValueError(f"the padding mask {self.mask_input!r} must be a [batch, seq] tensor")
        return mask == 0 if self.pads_are_true else mask != 0

    @staticmethod
    def positions(keep: torch.Tensor) -> torch.Tensor:
        """[batch, seq] int64: each real token's position counted from its row's first real token (0 at padding
        before it)."""
        return (keep.long().cumsum(1) - 1).clamp(min=0)

    @staticmethod
    def rows_where_positions_agree(keep: torch.Tensor) -> torch.Tensor:
        """[batch] bool: rows whose real tokens come first (right-padded or full), where restarted positions
        equal the slot index."""
        return ~(~keep[:, :-1] & keep[:, 1:]).any(dim=1) if keep.shape[1] > 1 else keep.new_ones(keep.shape[0])

    def output_selector(self, index: int, shape: Sequence[int], keep: torch.Tensor) -> torch.Tensor | None:
        """Bool tensor of `shape`, True at the comparable values of flat output `index`; None: compare all."""
        layout = self.outputs.get(index)
        if layout is None:
            return None
        return select(layout, shape, keep)

    def token_dims(self, shape: Sequence[Any]) -> tuple[int | None, int | None] | None:
        """(batch dim, seq dim) of a captured value whose sizes are the capture's symbols (SymInts).

        None when the shape has no such dims, or they are not one plain batch dim and at most one plain
        sequence dim (merged or repeated token dims are not described).
        """
        names = [str(s.node.expr) if isinstance(s, torch.SymInt) else None for s in shape]
        batch = [i for i, n in enumerate(names) if n in self.batch_symbols]
        seq = [i for i, n in enumerate(names) if n in self.seq_symbols]
        if len(batch) != 1 or len(seq) > 1:
            return None
        return batch[0], (seq[0] if seq else None)


def program_inputs(graph: fx.Graph, args: tuple, kwargs: dict[str, Any]) -> list[Any]:
    """The flat inputs (placeholder order) a program with `graph` receives for a call with `args` and `kwargs`."""
    info = getattr(graph._codegen, "pytree_info", None)
    if info is not None and info.in_spec is not None:
        return list(tree_flatten_spec((tuple(args), kwargs), info.in_spec))
    return pytree.tree_leaves((tuple(args), kwargs))


def select(layout: OutputTokens, shape: Sequence[int], keep: torch.Tensor) -> torch.Tensor:
    """The comparable values of a tensor of `shape` laid out as `layout`, given the real-token mask `keep`."""
    rank = len(shape)
    view = [1] * rank
    if layout.kind == "rows":
        full_rows = keep.all(dim=1) if layout.slots is None else keep[:, list(layout.slots)].all(dim=1)
        if layout.batch_dim is None:
            return full_rows.all().expand(*shape)
        view[layout.batch_dim] = keep.shape[0]
        return full_rows.view(view).expand(*shape)
    assert layout.seq_dim is not None
    if layout.batch_dim is None:
        flat = (keep.t() if layout.seq_outer else keep).reshape(-1)
        view[layout.seq_dim] = flat.numel()
        return flat.view(view).expand(*shape)
    first, second = sorted((layout.batch_dim, layout.seq_dim))
    ordered = keep if layout.batch_dim < layout.seq_dim else keep.t()
    view[first], view[second] = ordered.shape
    return ordered.reshape(view).expand(*shape)


__all__ = ["OutputTokens", "RealTokens", "program_inputs", "select"]
