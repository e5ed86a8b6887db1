"""Walking and editing FX graphs: what every pass shares instead of keeping its own copy.

- `walk_inputs` / `ancestors` / `ancestor_placeholders`: the nodes a value is computed from;
- `descendants`: the nodes computed from a node;
- `subgraph_module`: a module that computes some nodes of a graph from the graph's inputs;
- `erase_unused`: erase the nodes a rewrite replaced once nothing reads them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.fx as fx

from rewrite.analysis.nodes import is_op

aten = torch.ops.aten

Inputs = Callable[[fx.Node], Iterable[fx.Node]]
"""Which inputs of a node a walk follows (default: all of them, `node.all_input_nodes`)."""


def _all_inputs(node: fx.Node) -> Iterable[fx.Node]:
    return node.all_input_nodes


def walk_inputs(nodes: Iterable[Any], inputs: Inputs | None = None) -> Iterator[fx.Node]:
    """Every node that `nodes` are computed from, `nodes` included, each once, depth first.

    `inputs(node)` names the inputs followed from `node` (all of them by default). Items of `nodes`
    that are not graph nodes (None, constants) are skipped.
    """
    follow = inputs or _all_inputs
    seen: set[fx.Node] = set()
    stack = [n for n in nodes if isinstance(n, fx.Node)]
    while stack:
        cur = stack.pop()
        if cur in seen:
            continue
        seen.add(cur)
        yield cur
        stack.extend(follow(cur))


def ancestors(nodes: Iterable[Any], inputs: Inputs | None = None) -> set[fx.Node]:
    """The set of nodes that `nodes` are computed from, `nodes` included (see `walk_inputs`)."""
    return set(walk_inputs(nodes, inputs))


def ancestor_placeholders(node: fx.Node, inputs: Inputs | None = None) -> list[fx.Node]:
    """The graph inputs (placeholders) that `node` is computed from, in walk order (see `walk_inputs`)."""
    return [n for n in walk_inputs([node], inputs) if n.op == "placeholder"]


def descendants(node: fx.Node) -> set[fx.Node]:
    """Every node computed from `node`, `node` itself excluded."""
    seen: set[fx.Node] = set()
    stack = list(node.users)
    while stack:
        cur = stack.pop()
        if cur not in seen:
            seen.add(cur)
            stack.extend(cur.users)
    return seen


def subgraph_module(
    gm: fx.GraphModule, outputs: list[fx.Node], *, every_input: bool = False
) -> tuple[fx.GraphModule, list[fx.Node]]:
    """A module computing the tuple of `outputs` (nodes of `gm`), sharing gm's state, and its inputs.

    The module takes the placeholders of `gm` that `outputs` are computed from, in graph order (every
    placeholder of `gm` with `every_input`, so it takes gm's own flat inputs); they are returned with it.
    """
    keep = ancestors(outputs)
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    placeholders = []
    for node in gm.graph.nodes:
        if node in keep or (every_input and node.op == "placeholder"):
            env[node] = sub.node_copy(node, lambda n: env[n])
            if node.op == "placeholder":
                placeholders.append(node)
    sub.output(tuple(env[m] for m in outputs))
    return fx.GraphModule(gm, sub), placeholders


def erase_unused(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """Erase `nodes` of `graph` (a replaced chain) and the metadata asserts on them once nothing else reads them.

    Nodes that still have other users stay; nodes no longer in `graph` are ignored.
    """
    pending = list(dict.fromkeys(n for n in nodes if n.graph is graph))
    changed = True
    while changed:
        changed = False
        for node in list(pending):
            for user in list(node.users):
                if is_op(user, aten._assert_tensor_metadata.default):
                    graph.erase_node(user)
            if not node.users:
                graph.erase_node(node)
                pending.remove(node)
                changed = True


def erase_unused_computation(graph: fx.Graph, roots: list[fx.Node]) -> None:
    """Erase what `roots` were computed from (graph inputs and state excepted) where nothing but metadata
    asserts reads it any more, e.g. a mask builder once every attention that read the mask is gone."""
    computed = [n for n in ancestors(roots) if n.op in ("call_function", "call_method")]
    erase_unused(graph, computed)


def _writes_unread(node: fx.Node) -> bool:
    """An in-place op whose result and whose target nothing else reads (dead, though impure): the target is a
    value the graph computed itself, read by this op alone, and not a view of another value."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or node.users:
        return False
    if not target._schema.name.endswith("_") or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if torch.Tag.nondeterministic_seeded in target.tags:  # a random draw: erasing it would shift the stream
        return False
    if any(a.alias_info is not None and a.alias_info.is_write for a in target._schema.arguments[1:]):
        return False  # it writes another argument too
    written = node.args[0]
    return set(written.users) == {node} and returns_new_tensor(written)  # a view writes through to its base


def returns_new_tensor(node: fx.Node) -> bool:
    """Whether `node` is an aten op whose results are new tensors (none a view or alias of an argument)."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    return not any(r.alias_info is not None for r in target._schema.returns)


def eliminate_dead_code(graph: fx.Graph) -> None:
    """`graph.eliminate_dead_code()`, also erasing values whose only readers are metadata asserts and in-place
    writes into values nothing reads.

    torch.export asserts the dtype and device of some values (`aten._assert_tensor_metadata`); such an
    assert counts as a side effect, so a computation nothing else reads any more (a mask builder no
    attention uses) would stay in the graph and still run, and may fail on inputs of another shape.
    """
    while True:
        graph.eliminate_dead_code()
        dead = [n for n in graph.nodes if is_op(n, aten._assert_tensor_metadata.default)
                and all(is_op(u, aten._assert_tensor_metadata.default) for u in n.args[0].users)]
        dead += [n for n in graph.nodes if _writes_unread(n)]
        if not dead:
            return
        for node in dead:
            graph.erase_node(node)


__all__ = [
    "Inputs",
    "eliminate_dead_code",
    "ancestor_placeholders",
    "ancestors",
    "descendants",
    "erase_unused_computation",
    "erase_unused",
    "subgraph_module",
    "walk_inputs",
]


def attribute_tensor(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    """The tensor (parameter, buffer or constant of `gm`) a `get_attr` node reads, None for anything else."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value: object = gm
    for part in str(node.target).split("."):
        value = getattr(value, part, None)
    return value if isinstance(value, torch.Tensor) else None
