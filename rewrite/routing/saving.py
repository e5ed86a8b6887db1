"""Routed blocks in a saved program: what `om.save` exports in their place and how `rewrite.load` puts them back.

A routed block runs a data-dependent number of rows (`order[:count]`), which torch.export cannot trace
as one program: the row count is read on the host and the block takes one of three paths on it. So a
routed program is saved in two parts:

- the outer program, exported with every `layer_skip_route` node replaced by `rewrite::saved_route`
  and every `RoutedBlock` call by `rewrite::saved_routed_block`: opaque ops with the same inputs and
  output shapes, which export keeps as single nodes (they only stand in for the runtime; calling one
  raises);
- each block's body (a stateless graph: the block's hidden state, then every other value it reads,
  its weights included), exported on its own with every activation dim dynamic.

Loading replaces the stand-ins by `layer_skip_route` and `RoutedBlock` calls over the loaded bodies,
so a loaded program routes, gathers and scatters with the same Python runtime as the module that was
saved: `skip_controls`, `record_skips` and held decisions act on it as before.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from rewrite.errors import RewriteError
from rewrite.routing.controls import skip_controls
from rewrite.routing.graph import routed_calls
from rewrite.routing.runtime import InputRule, RoutedBlock, layer_skip_route

ROUTE_KWARGS = ("column", "n_routed", "layer", "batch_dim", "seq_dim", "threshold", "budget")


@torch.library.custom_op("rewrite::saved_route", mutates_args=())
def saved_route(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    valid: torch.Tensor | None,
    column: int,
    n_routed: int,
    layer: str,
    batch_dim: int,
    seq_dim: int,
    threshold: float,
    budget: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stands for `layer_skip_route` in a saved program (see the module docstring); never runs."""
    raise RuntimeError(f"{layer}: rewrite::saved_route only stands for the router in a saved program; "
                       "load the folder with rewrite.load, which puts the router back")


@saved_route.register_fake
def _(hidden, weight, bias, valid, column, n_routed, layer, batch_dim, seq_dim, threshold, budget):
    batch = hidden.shape[batch_dim]
    return (hidden.new_empty(batch, dtype=torch.float32), hidden.new_empty(batch, dtype=torch.int64),
            hidden.new_empty((), dtype=torch.int64))


@torch.library.custom_op("rewrite::saved_routed_block", mutates_args=())
def saved_routed_block(
    skip: torch.Tensor,
    order: torch.Tensor,
    count: torch.Tensor,
    hidden: torch.Tensor,
    tensors: list[torch.Tensor],
    sizes: list[int],
    layer: str,
) -> torch.Tensor:
    """Stands for a `RoutedBlock` call in a saved program (see the module docstring); never runs."""
    raise RuntimeError(f"{layer}: rewrite::saved_routed_block only stands for a routed block in a saved program; "
                       "load the folder with rewrite.load, which puts the block back")


@saved_routed_block.register_fake
def _(skip, order, count, hidden, tensors, sizes, layer):
    return torch.empty_like(hidden)


@dataclass(frozen=True)
class SavedBlock:
    """What `rewrite.load` needs to rebuild one routed block around its exported body.

    `inputs` tells, for each body input after the hidden state, where the stand-in op holds it:
    `["tensor", i]` (its i-th tensor), `["size", j]` (its j-th size) or `["value", v]` (a constant).
    """

    layer: str
    file: str
    rules: list[list[Any]]  # [kind, dim] per body input after the hidden state
    inputs: list[list[Any]]
    batch_dim: int
    gatherable: bool
    writes_hidden: bool

    def to_json(self) -> dict[str, Any]:
        """The block as meta.json stores it."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SavedBlock:
        """The block meta.json stored."""
        return cls(**data)


def has_routed_blocks(program: fx.GraphModule) -> bool:
    """Whether `program` calls any routed block."""
    return any(node.op == "call_function" and isinstance(node.target, RoutedBlock) for node in program.graph.nodes)


def _is_size(value: Any) -> bool:
    return isinstance(value, int | torch.SymInt) and not isinstance(value, bool)


def program_for_export(program: fx.GraphModule) -> tuple[fx.GraphModule, list[tuple[RoutedBlock, SavedBlock]]]:
    """A copy of `program` whose routers and routed blocks are the stand-in ops, and each block with its
    description; `program` itself is left as it is. RewriteError naming the layer for a block that cannot
    be saved (a decision not made by the router, or an input that is not a tensor, a size or a constant)."""
    graph = copy.deepcopy(program.graph)  # new nodes, the same targets (the RoutedBlocks themselves)
    copied = fx.GraphModule(program, graph)
    blocks = []
    for call in routed_calls(copied):
        block, route = call.block, call.route
        if route.target is not layer_skip_route:
            raise RewriteError(f"layer_skip: {block.layer}'s decision is made by {getattr(route.target, '__name__', route.target)}, "
                               "not by its router; only a forward program's routed blocks can be saved")
        if route.kwargs.get("held") is not None:
            raise RewriteError(f"layer_skip: {block.layer} applies held decisions; only a forward program's routed "
                               "blocks can be saved")
        kwargs = {name: route.kwargs[name] for name in ROUTE_KWARGS}
        kwargs["threshold"] = float(kwargs["threshold"])
        kwargs["budget"] = None if kwargs["budget"] is None else float(kwargs["budget"])
        with graph.inserting_before(route):
            stand_in = graph.call_function(
                torch.ops.rewrite.saved_route.default, (*route.args[:3], route.kwargs.get("valid")), kwargs)
        stand_in.meta = dict(route.meta)
        route.replace_all_uses_with(stand_in)
        graph.erase_node(route)

        skip, order, count, hidden, *others = call.node.args
        tensors: list[Any] = []
        sizes: list[Any] = []
        inputs: list[list[Any]] = []
        for position, value in enumerate(others):
            val = value.meta.get("val") if isinstance(value, fx.Node) else value
            if isinstance(val, torch.Tensor):
                inputs.append(["tensor", len(tensors)])
                tensors.append(value)
            elif _is_size(val):
                inputs.append(["size", len(sizes)])
                sizes.append(value)
            elif not isinstance(value, fx.Node) and (value is None or isinstance(value, bool | int | float | str)):
                inputs.append(["value", value])
            else:
                raise RewriteError(f"layer_skip: {block.layer}'s input {position + 1} "
                                   f"({getattr(value, 'name', value)}) is a {type(val).__name__}; a saved routed "
                                   "block takes tensors, sizes and constants only")
        with graph.inserting_before(call.node):
            stand_in = graph.call_function(torch.ops.rewrite.saved_routed_block.default,
                                           (skip, order, count, hidden, tensors, sizes, block.layer))
        stand_in.meta = dict(call.node.meta)
        call.node.replace_all_uses_with(stand_in)
        graph.erase_node(call.node)
        blocks.append((block, SavedBlock(
            layer=block.layer, file=f"{block.layer}.pt2", rules=[[r.kind, r.dim] for r in block.rules],
            inputs=inputs, batch_dim=block.batch_dim, gatherable=block.gatherable, writes_hidden=block.writes_hidden)))
    copied.recompile()
    return copied, blocks


def body_examples(program: fx.GraphModule, args: tuple, kwargs: dict[str, Any]) -> dict[str, tuple[Any, ...]]:
    """Per routed block's layer, the inputs its body reads when `program` runs (args, kwargs) with every row
    running (soft mode calls each body on all rows)."""
    seen: dict[str, tuple[Any, ...]] = {}
    handles = []
    for call in routed_calls(program):
        def keep(module: torch.nn.Module, inputs: tuple, layer: str = call.layer) -> None:
            seen[layer] = tuple(inputs)
        handles.append(call.block.body.register_forward_pre_hook(keep))
    try:
        with torch.no_grad(), skip_controls(mode="soft"):
            program(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _symbolic(size: Any) -> bool:
    return isinstance(size, torch.SymInt) and not is_concrete_int(size)


def export_body(program: fx.GraphModule, block: RoutedBlock, example: tuple[Any, ...]) -> torch.export.ExportedProgram:
    """`block`'s body of `program` exported on `example`, dynamic where the program is: a tensor's dim or a size
    is dynamic when the value the program hands the block has it symbolic."""
    call = next(c for c in routed_calls(program) if c.block is block)
    dynamic: list[Any] = []
    for node, value in zip(call.node.args[3:], example, strict=True):
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        if isinstance(value, torch.Tensor):
            shape = val.shape if isinstance(val, torch.Tensor) else ()
            dynamic.append({d: Dim.AUTO for d, size in enumerate(shape) if _symbolic(size)} or None)
        elif _is_size(value):
            dynamic.append(Dim.AUTO if _symbolic(val) else None)
        else:
            dynamic.append(None)
    with torch.no_grad():
        return torch.export.export(block.body, example, dynamic_shapes=tuple(dynamic), strict=False)


def restore_routed_blocks(gm: fx.GraphModule, blocks: dict[str, tuple[SavedBlock, fx.GraphModule]]) -> None:
    """Put `layer_skip_route` and the routed blocks back in a loaded program in place of the stand-in ops;
    `blocks` maps each layer to its description and loaded body. RewriteError naming the layer when the
    program and the descriptions disagree."""
    graph = gm.graph
    found = set()
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is torch.ops.rewrite.saved_route.default:
            hidden, weight, bias, valid, *rest = node.args
            kwargs = dict(zip(ROUTE_KWARGS, rest, strict=True)) | dict(node.kwargs)
            if valid is not None:
                kwargs["valid"] = valid
            with graph.inserting_before(node):
                new = graph.call_function(layer_skip_route, (hidden, weight, bias), kwargs)
        elif node.target is torch.ops.rewrite.saved_routed_block.default:
            skip, order, count, hidden, tensors, sizes, layer = node.args
            if layer not in blocks:
                raise RewriteError(f"layer_skip: the saved program routes {layer}, which meta.json does not describe")
            saved, body = blocks[layer]
            found.add(layer)
            picked = {"tensor": list(tensors), "size": list(sizes)}
            others = [picked[kind][where] if kind != "value" else where for kind, where in saved.inputs]
            block = RoutedBlock(body, [InputRule(kind, dim) for kind, dim in saved.rules], layer=layer,
                                batch_dim=saved.batch_dim, gatherable=saved.gatherable)
            block.writes_hidden = saved.writes_hidden
            with graph.inserting_before(node):
                new = graph.call_function(block, (skip, order, count, hidden, *others))
        else:
            continue
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    missing = sorted(set(blocks) - found)
    if missing:
        raise RewriteError(f"layer_skip: meta.json describes routed blocks the saved program lacks: {missing}")
    gm.recompile()
