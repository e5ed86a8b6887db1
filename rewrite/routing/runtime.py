"""What a routed graph calls at run time: the router decision and the block that runs only active rows.

A routed block `i` reads, in the graph:

    route_i = layer_skip_route(hidden, router_weight, router_bias, column=j, n_routed=n, ...)
    skip_i, order_i, count_i = route_i[0], route_i[1], route_i[2]
    hidden_out = <RoutedBlock for block i>(skip_i, order_i, count_i, hidden, *other inputs)

`skip_i` [B] is the skip weight (0 or 1 in hard mode, the probability in training modes), `order_i`
[B] lists the rows that run first and `count_i` counts them: a device tensor when the routers decide
(the block reads it, one device sync), a Python int when decisions are held. A decode program holds prefill's
decisions by passing them as `held` (see `rewrite.routing.graph` for how another pass finds and
rewires these nodes); `valid` makes the router pool over real tokens only (a left-padded prompt).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch.fx as fx
from torch.utils.weak import WeakIdKeyDictionary

from rewrite.kernels.forward_only import forward_only_applies
from rewrite.kernels.router import route
from rewrite.kernels.row_gather import gather_rows
from rewrite.kernels.row_scatter import add_rows_into_
from rewrite.routing.controls import begin_call, call_state, current_controls


def compact(skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, count) for a [B] bool skip mask: running rows first, then skipped, each ascending."""
    order = torch.argsort(skip.to(torch.int8), stable=True)
    return order, (~skip).sum()


def routes_from_mask(skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The route triple (skip weight, order, count) for given [B] bool decisions."""
    skip = skip.bool()
    order, count = compact(skip)
    return skip.float(), order, count


@dataclass(frozen=True)
class HeldDecisions:
    """A call's held [B, n_routed] decisions, prepared once so that routing a block launches no work
    and reads nothing from the device.

    Per routed block j, `column(j)` gives the skip weight (float 0 / 1, on the device), the rows in
    running-first order (on the device) and the number of running rows as a Python int, so a block
    knows on the host whether none, some or all of its rows run.
    """

    skip: torch.Tensor  # [B, n_routed] bool, on the host
    weights: torch.Tensor  # [n_routed, B] float 0 / 1, on the device
    orders: torch.Tensor  # [n_routed, B] int64, on the device: per block, running rows first, each part ascending
    counts: tuple[int, ...]  # running rows per block
    _columns: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int], ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        columns = tuple(
            (self.skip[:, j], self.weights[j], self.orders[j], count) for j, count in enumerate(self.counts)
        )
        object.__setattr__(self, "_columns", columns)  # the views every call takes, made once

    @classmethod
    def of(cls, mask: torch.Tensor, device: torch.device) -> HeldDecisions:
        """Prepare [B, n_routed] bool decisions for a call on `device` (reads `mask` on the host once;
        a mask already on the host needs no device sync)."""
        host = mask.detach().to("cpu", torch.bool, copy=True)
        orders = torch.argsort(host.to(torch.int8), dim=0, stable=True).t().contiguous()
        counts = tuple((~host).sum(0).tolist())
        weights = host.t().to(torch.float32)
        if torch.device(device).type == "cuda":  # pinned: the copies below do not wait for the device
            orders, weights = orders.pin_memory(), weights.pin_memory()
        return cls(host, weights.to(device, non_blocking=True), orders.to(device, non_blocking=True), counts)

    @classmethod
    def cached(cls, mask: torch.Tensor, device: torch.device) -> HeldDecisions:
        """`of(mask, device)`, reused while the same `mask` tensor is passed again unchanged."""
        if mask.is_inference():  # no version counter to tell an in-place change: prepared every call
            return cls.of(mask, device)
        key = (torch.device(device), mask._version)
        hit = _HELD_CACHE.get(mask)
        if hit is not None and hit[0] == key:
            return hit[1]
        held = cls.of(mask, device)
        _HELD_CACHE[mask] = (key, held)
        return held

    def column(self, j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(skip decisions on the host, skip weight, order, count) of routed block j; the last three are
        the block's route triple."""
        return self._columns[j]


_HELD_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""skip_mask tensor -> ((device, version), HeldDecisions): a mask passed call after call is prepared once."""


def _as_rows(hidden: torch.Tensor, batch_dim: int, seq_dim: int) -> torch.Tensor:
    """`hidden` as [B, L, D] (a view where it can be)."""
    if (batch_dim, seq_dim) == (0, 1):
        return hidden
    return hidden.movedim((batch_dim, seq_dim), (0, 1))


def _pool_real(rows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """rows [B, L, D] averaged over the tokens `valid` [B, L] marks, as [B, 1, D] (the router then pools
    one position, which leaves it as it is)."""
    if tuple(valid.shape) != tuple(rows.shape[:2]):
        raise ValueError(f"layer skip: valid has shape {tuple(valid.shape)} for hidden rows {tuple(rows.shape[:2])}")
    acc = torch.promote_types(rows.dtype, torch.float32)
    weight = valid.to(device=rows.device, dtype=acc)[..., None]
    total = (rows.to(acc) * weight).sum(1, keepdim=True)
    return (total / weight.sum(1, keepdim=True).clamp(min=1)).to(rows.dtype)


def layer_skip_route(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    column: int,
    n_routed: int,
    layer: str,
    batch_dim: int,
    seq_dim: int,
    threshold: float,
    budget: float | None,
    valid: torch.Tensor | None = None,
    held: torch.Tensor | HeldDecisions | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | int]:
    """Decide, for each sequence, whether the routed block `layer` runs (see the module docstring).

    `held` ([B, n_routed] bool, or those prepared as HeldDecisions) are decisions to apply instead of
    the routers and of `skip_controls(skip_mask=)`; `valid` ([B, L] bool) restricts the router's
    pooling to the tokens it marks. With decisions held (or `skip_mask`), the count is a Python int
    and routing reads nothing from the device; the routers' count is a device tensor, which the block
    reads once (one sync per block).
    """
    controls = current_controls()
    batch = hidden.shape[batch_dim]
    state = begin_call() if column == 0 else call_state()
    threshold = controls.threshold if controls.threshold is not None else threshold
    budget = controls.budget if controls.budget is not None else budget
    mask = held if held is not None else controls.skip_mask
    if mask is not None:
        shape = tuple(mask.skip.shape if isinstance(mask, HeldDecisions) else mask.shape)
        if shape != (batch, n_routed):
            what = "held decisions have" if held is not None else "skip_mask has"
            raise ValueError(
                f"layer skip: {what} shape {shape} but {layer} needs [batch, routed blocks] = [{batch}, {n_routed}]"
            )
        if state.held is None:
            state.held = mask if isinstance(mask, HeldDecisions) else HeldDecisions.cached(mask, hidden.device)
        decided, weight_out, order, active = state.held.column(column)
        if state.record is not None:
            state.record.layers.append(layer)
            state.record.skipped.append(decided)
            state.record.probabilities.append(None)
        return weight_out, order, active
    rows = _as_rows(hidden, batch_dim, seq_dim)
    if valid is not None:
        rows = _pool_real(rows, valid)
    count: torch.Tensor
    if budget is None and controls.mode == "hard":
        prob, order, count = route(rows, weight, bias, float(threshold))
        skip = prob > threshold
    else:
        prob, _, _ = route(rows, weight, bias, float(threshold))
        skip = prob.detach() > threshold
        if budget is not None:
            if state.skipped_so_far is None:
                state.skipped_so_far = torch.zeros(batch, dtype=torch.int64, device=hidden.device)
            quota = round(float(budget) * n_routed)
            remaining = quota - state.skipped_so_far
            skip = (remaining > 0) & (skip | (remaining >= n_routed - column))
            state.skipped_so_far = state.skipped_so_far + skip.to(torch.int64)
        order, count = compact(skip)
    if controls.mode == "soft":
        weight_out = prob
    elif controls.mode == "straight_through":
        weight_out = skip.to(prob.dtype) + prob - prob.detach()
    else:
        weight_out = skip.to(prob.dtype)
    if controls.mode != "hard":
        state.probabilities.append(prob)
        state.weights.append(weight_out)
        order = torch.arange(batch, device=hidden.device)
        count = torch.tensor(batch, device=hidden.device)
    if state.record is not None:
        state.record.layers.append(layer)
        state.record.skipped.append(skip.detach().cpu())
        state.record.probabilities.append(prob.detach().cpu())
    return weight_out, order, count


FUSED_ROW_GATHER = True
"""Whether a partly run block gathers its running rows of the hidden state, of every input gathered along dim 0 and
of what its decode-state view reads (`SharesRowReads`) by one `rewrite::gather_rows` call (one launch on CUDA)
instead of one `index_select` each; not under autograd or while compiling (Inductor fuses the gathers itself). On by
default since 2026-12-07: a graphed 16-layer decode step at batch 32 with half the blocks skipped per sequence took
4.745 ms against 5.280 with the per-tensor gathers on an H100 (BENCHMARKS.md)."""

FUSED_ROW_SCATTER = True
"""Whether a partly run block that writes its rows into its hidden input (`writes_hidden`: a decode program) and
whose body ends in the sum of two tensors (the residual add) hands both addends to one `rewrite::add_rows_into_`
call (one launch on CUDA, the sum rounded as PyTorch's add rounds it) instead of adding them and `index_copy_`-ing
the sum; not under autograd or while compiling. Not yet timed on a GPU: the profile of a graphed 16-layer batch-32
step put the blocks' last adds and scatters at 0.024 + 0.047 ms (BENCHMARKS.md, 2026-12-07)."""


@dataclass(frozen=True)
class InputRule:
    """How one block input follows a smaller batch: gather along `dim`, rescale a size, keep, or
    (`rows`) ask a RowSelectable value for the running rows."""

    kind: str  # "gather" | "scale" | "keep" | "rows"
    dim: int = 0


@runtime_checkable
class RowSelectable(Protocol):
    """A block input that is not a tensor but follows the batch (a decode state): `select_rows(rows)`
    returns the same kind of value for the sequences `rows` [R] (int64, ascending) only."""

    def select_rows(self, rows: torch.Tensor) -> Any: ...


@runtime_checkable
class SharesRowReads(Protocol):
    """A RowSelectable whose view reads tensors of the whole batch (batch along dim 0) that the routed block may
    gather with its own inputs in one launch: `row_view_reads()` lists them (possibly none), and
    `select_rows(rows, gathered)` takes their rows `rows`, in that order, instead of gathering them itself."""

    def row_view_reads(self) -> list[torch.Tensor]: ...

    def select_rows(self, rows: torch.Tensor, gathered: list[torch.Tensor] | None = None) -> Any: ...


class RoutedBlock:
    """A block body that runs on the active rows only; skipped rows pass their input through.

    `body` is a GraphModule holding no state: its inputs are the block's hidden state followed by
    every other value the block read (tensors, sizes, parameters), in `rules` order.
    """

    def __init__(self, body: fx.GraphModule, rules: list[InputRule], *, layer: str, batch_dim: int, gatherable: bool):
        self.body = body
        self.rules = list(rules)
        self.layer = layer
        self.batch_dim = batch_dim
        self.gatherable = gatherable
        self.writes_hidden = False
        """Set by a pass that knows nothing reads the hidden input (or a value it may alias) after the block: a
        partly run block then writes its running rows into it instead of into a copy (not under autograd)."""
        self._addends: tuple[fx.GraphModule, str, fx.GraphModule | None] | None = None  # (body, its code, addends body)
        self.__name__ = "layer_skip_block_" + layer.replace(".", "_")
        self.__qualname__ = self.__name__

    def __repr__(self) -> str:
        return f"RoutedBlock({self.layer})"

    def with_body_copy(self) -> RoutedBlock:
        """The same block over its own copy of the body's graph: rewriting one leaves the other as it was."""
        twin = copy.copy(self)
        twin.body = fx.GraphModule(self.body, copy.deepcopy(self.body.graph))
        twin.rules = list(self.rules)
        return twin

    def add_input(self, name: str, rule: InputRule) -> fx.Node:
        """Append one input to the body (after the others) that follows the running rows by `rule`;
        returns its placeholder. The caller passes the value as the call's last argument."""
        graph = self.body.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        with graph.inserting_after(placeholders[-1]):
            node = graph.placeholder(name)
        self.rules.append(rule)
        self.body.recompile()
        return node

    def __call__(
        self, skip: torch.Tensor, order: torch.Tensor, count: torch.Tensor | int, hidden: torch.Tensor, *others: Any
    ) -> torch.Tensor:
        # a Python count comes from held hard decisions (0 / 1 weights): the hard path gives the same values
        mode = "hard" if isinstance(count, int) else current_controls().mode
        batch = hidden.shape[self.batch_dim]
        if mode != "hard":
            out = self.body(hidden, *others)
            shape = [1] * hidden.dim()
            shape[self.batch_dim] = batch
            weight = skip.to(out.dtype).reshape(shape)
            return out + weight * (hidden - out)
        active = count if isinstance(count, int) else int(count)
        if active == 0:
            return hidden
        if active == batch:
            return self.body(hidden, *others)
        if not self.gatherable:
            out = self.body(hidden, *others)
            shape = [1] * hidden.dim()
            shape[self.batch_dim] = batch
            return torch.where(skip.bool().reshape(shape), hidden, out)
        rows = order[:active]
        inputs: list[Any] = [None]
        views: list[tuple[int, Any]] = []  # (position, value) of the inputs that select their own rows
        for rule, value in zip(self.rules, others, strict=True):
            if rule.kind == "gather":
                inputs.append(None)  # gathered below with the hidden state
            elif rule.kind == "scale":
                inputs.append(value // batch * active)
            elif rule.kind == "rows":
                if not isinstance(value, RowSelectable):
                    raise TypeError(f"{self.layer}: input {type(value).__name__} has no select_rows(rows)")
                inputs.append(None)  # selected below, with what it reads gathered in the same launch
                views.append((len(inputs) - 1, value))
            else:
                inputs.append(value)
        gathered = [(hidden, self.batch_dim)] + [
            (value, rule.dim) for rule, value in zip(self.rules, others, strict=True) if rule.kind == "gather"]
        fused = FUSED_ROW_GATHER and forward_only_applies(*(value for value, _ in gathered))
        reads = [value.row_view_reads() if fused and isinstance(value, SharesRowReads) else None for _, value in views]
        gathered += [(t, 0) for read in reads if read for t in read]
        rows_of = _gather_running_rows(gathered, rows, fused)
        positions = [0] + [i + 1 for i, rule in enumerate(self.rules) if rule.kind == "gather"]
        for position, value in zip(positions, rows_of[:len(positions)], strict=True):
            inputs[position] = value
        view_rows = iter(rows_of[len(positions):])  # each view's reads, in the order they were listed
        for (position, value), read in zip(views, reads, strict=True):
            inputs[position] = (value.select_rows(rows) if read is None
                                else value.select_rows(rows, [next(view_rows) for _ in read]))
        in_place = self.writes_hidden and not (torch.is_grad_enabled() and hidden.requires_grad)
        scatter_sum = FUSED_ROW_SCATTER and in_place and self.batch_dim == 0 and forward_only_applies(hidden)
        addends = self._addends_body() if scatter_sum else None
        if addends is not None:
            a, b = addends(*inputs)
            if a.shape == b.shape == (active, *hidden.shape[1:]) and a.dtype == b.dtype == hidden.dtype:
                return add_rows_into_(hidden, rows, a, b)
            out = (a + b).to(hidden.dtype)
        else:
            out = self.body(*inputs).to(hidden.dtype)
        if in_place:
            return hidden.index_copy_(self.batch_dim, rows, out)
        return hidden.index_copy(self.batch_dim, rows, out)

    def _addends_body(self) -> fx.GraphModule | None:
        """The body returning the two addends of its result when that result is `aten.add.Tensor` of two values
        (else None), made again whenever the body's code changed."""
        body, code = self.body, self.body.code
        if self._addends is None or self._addends[0] is not body or self._addends[1] != code:
            self._addends = (body, code, addends_of_result(body))
        return self._addends[2]


def addends_of_result(body: fx.GraphModule) -> fx.GraphModule | None:
    """A copy of `body` that returns (a, b) where `body` returns `aten.add.Tensor(a, b)` of two graph values with no
    alpha; None for any other result."""
    output = next(n for n in reversed(body.graph.nodes) if n.op == "output")
    result = output.args[0]
    if not (isinstance(result, fx.Node) and result.op == "call_function" and result.target is torch.ops.aten.add.Tensor
            and len(result.args) == 2 and not result.kwargs and len(result.users) == 1
            and all(isinstance(x, fx.Node) for x in result.args)):
        return None
    graph = copy.deepcopy(body.graph)
    twin_output = next(n for n in reversed(graph.nodes) if n.op == "output")
    twin_sum = twin_output.args[0]
    twin_output.args = (tuple(twin_sum.args),)
    graph.erase_node(twin_sum)
    return fx.GraphModule(body, graph)


def _gather_running_rows(gathered: list[tuple[torch.Tensor, int]], rows: torch.Tensor, fused: bool) -> list[torch.Tensor]:
    """Each (value, dim) of `gathered` at rows `rows` along its dim, in order: with `fused`, those along dim 0 by one
    `gather_rows` call."""
    together = [i for i, (_, dim) in enumerate(gathered) if fused and dim == 0]
    taken = set(together)
    out: list[Any] = [None if i in taken else value.index_select(dim, rows)
                      for i, (value, dim) in enumerate(gathered)]
    if together:
        for i, value in zip(together, gather_rows([gathered[i][0] for i in together], rows), strict=True):
            out[i] = value
    return out
