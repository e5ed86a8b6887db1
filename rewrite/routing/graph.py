"""Routed blocks as other passes see them in a graph: find them, hand a block one more input, and
change how a block's decision is made.

This is the public face of what the `layer_skip` pass leaves in a graph, so that a later pass (the
`stateful` pass threads decode state into routed blocks) never depends on how the pass builds it:

    for call in routed_calls(gm):
        inner = add_block_input(call, state_node, "decode_state", InputRule("rows"))
        ...  # use `inner` inside call.block.body
        replace_route(call, my_decision, state_node)

A routed block in the graph is one `layer_skip_route(hidden, weight, bias, column=, n_routed=, ...)`
node, three `getitem`s of it, and the call of a `RoutedBlock` on `(skip, order, count, hidden,
*inputs)`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.fx as fx

from rewrite.analysis.graph_utils import returns_new_tensor
from rewrite.routing.runtime import InputRule, RoutedBlock, layer_skip_route


@dataclass(frozen=True)
class RoutedCall:
    """One routed block in a graph: the node that decides (`route`) and the node that runs it (`node`)."""

    route: fx.Node
    node: fx.Node

    @property
    def block(self) -> RoutedBlock:
        """The RoutedBlock the graph calls (its `body` is the block as a stateless GraphModule)."""
        target = self.node.target
        assert isinstance(target, RoutedBlock)
        return target

    @property
    def layer(self) -> str:
        """The block's module path (e.g. `model.layers.3`)."""
        return self.block.layer

    @property
    def column(self) -> int:
        """The block's column in the [batch, routed blocks] decisions."""
        return int(self.route.kwargs["column"])

    @property
    def n_routed(self) -> int:
        """How many blocks of the graph are routed."""
        return int(self.route.kwargs["n_routed"])


def _route_of(node: fx.Node) -> fx.Node | None:
    parts = node.args[:3]
    if len(parts) != 3 or not all(isinstance(p, fx.Node) and p.target is operator.getitem for p in parts):
        return None
    routes = {p.args[0] for p in parts}  # type: ignore[union-attr]
    route = routes.pop() if len(routes) == 1 else None
    return route if isinstance(route, fx.Node) and route.op == "call_function" else None


def routed_calls(gm: fx.GraphModule) -> list[RoutedCall]:
    """Every routed block of `gm`, in graph order.

    A block whose decision was already replaced (`replace_route`) is listed with its new decision
    node as `route`.
    """
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, RoutedBlock):
            continue
        route = _route_of(node)
        if route is None or "column" not in route.kwargs:
            raise ValueError(f"{node.name}: a routed block whose decision is not a layer_skip_route node")
        out.append(RoutedCall(route, node))
    return out


def is_routed_block(node: fx.Node) -> bool:
    """Whether `node` calls a routed block."""
    return node.op == "call_function" and isinstance(node.target, RoutedBlock)


def hidden_free_after(call: RoutedCall) -> bool:
    """Whether the block's hidden input, and every value it may alias, is read by no node after the block.

    A routed block's result may be its hidden input itself (no row ran it), so the chain of routed blocks
    feeding one another is followed back to a value an aten op made anew; anything else is not known free.
    """
    graph = call.node.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    after = order[call.node]
    node = call.node.args[3]
    while isinstance(node, fx.Node):
        if any(order[user] > after for user in node.users):
            return False
        if not is_routed_block(node):
            return returns_new_tensor(node)
        output = next(n for n in node.target.body.graph.nodes if n.op == "output")  # type: ignore[union-attr]
        result = output.args[0]
        if not (isinstance(result, fx.Node) and returns_new_tensor(result)):  # what a block running every row returns
            return False
        node = node.args[3]
    return False


def outer_value(call: RoutedCall, placeholder: fx.Node) -> fx.Node | Any:
    """The value of the outer graph that a placeholder of the block's body reads."""
    placeholders = [n for n in call.block.body.graph.nodes if n.op == "placeholder"]
    return call.node.args[3 + placeholders.index(placeholder)]


def add_block_input(call: RoutedCall, value: fx.Node, name: str, rule: InputRule) -> fx.Node:
    """Hand `value` (a node of the outer graph computed before the block) to the block as one more
    input following the running rows by `rule`; returns the placeholder that reads it in the body."""
    placeholder = call.block.add_input(name, rule)
    call.node.args = (*call.node.args, value)
    return placeholder


def replace_route(call: RoutedCall, decide: Callable[..., Any], *leading: fx.Node | Any) -> fx.Node:
    """Make the block's decision with `decide(*leading, hidden, weight, bias, **route keyword arguments)`
    instead of the node there now; `decide` returns the same `(skip, order, count)` triple as
    `layer_skip_route`. Returns the new node."""
    graph = call.route.graph
    if call.route.target is not layer_skip_route:
        raise ValueError(f"{call.layer}: its decision is already made by {call.route.target}")
    with graph.inserting_before(call.route):
        new = graph.call_function(decide, (*leading, *call.route.args), dict(call.route.kwargs))
    new.meta = dict(call.route.meta)
    call.route.replace_all_uses_with(new)
    graph.erase_node(call.route)
    return new
