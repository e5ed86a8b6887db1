"""Trace q/k/v back to the linear projections that produce them (fused or not, through RoPE/norms)."""

from __future__ import annotations

import operator
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from rewrite.analysis.nodes import is_op, op_name, state_name, tensor_meta

aten = torch.ops.aten

_LINEAR = (aten.linear.default, aten.addmm.default, aten.matmul.default, aten.mm.default)
_SPLITS = (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int)
_NORM_HINTS = ("aten.rsqrt", "aten.layer_norm", "aten.rms_norm", "aten.pow")


def looks_like_rope(ops: set[str]) -> bool:
    """Whether ops (`op_name`s) computed between a projection and its use look like a rotary embedding:
    rotate-half or rotate-every-two (a negation and a concatenation or stack) or complex multiplication."""
    rotate_half = "aten.neg" in ops and bool(ops & {"aten.cat", "aten.stack"})
    return rotate_half or bool(ops & {"aten.view_as_complex", "aten.view_as_real", "aten.polar"})


@dataclass
class Projection:
    """The linear layer a q/k/v tensor comes from."""

    node: fx.Node
    weight: str | None
    bias: str | None
    input: fx.Node | None
    part: tuple[int, int] | None = None  # (index, parts) when one fused projection feeds q, k and v
    through: list[str] = field(default_factory=list)  # ops computed from the projection on the way to use

    @property
    def has_rope(self) -> bool:
        """Rotary embedding between projection and use (see `looks_like_rope`)."""
        return looks_like_rope(set(self.through))

    @property
    def has_norm(self) -> bool:
        """A normalization (QK-norm) between projection and use."""
        return any(op.startswith(h) for op in self.through for h in _NORM_HINTS)


def _weight_of(node: fx.Node) -> tuple[str | None, str | None, fx.Node | None] | None:
    """(weight, bias, input) if `node` is a linear map by a model parameter."""
    if is_op(node, aten.linear.default):
        w = node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return state_name(w), state_name(b) if isinstance(b, fx.Node) else None, node.args[0]
    if is_op(node, aten.addmm.default):
        b, x, w = node.args[:3]
        if isinstance(w, fx.Node) and state_name(w):
            return state_name(w), state_name(b), x
    if is_op(node, aten.matmul.default, aten.mm.default):
        x, w = node.args[:2]
        if isinstance(w, fx.Node) and state_name(w):
            return state_name(w), None, x
    return None


def _part_of(path: list[fx.Node]) -> tuple[int, int] | None:
    """If the path from a fused projection selects one of its parts, which one."""
    for node in path:
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node) and is_op(node.args[0], *_SPLITS):
            src = node.args[0]
            val = src.meta.get("val")
            parts = len(val) if isinstance(val, list | tuple) else None
            return int(node.args[1]), parts or 0
        if is_op(node, aten.select.int):
            val = tensor_meta(node.args[0])
            dim = node.args[1]
            if val is not None:
                return int(node.args[2]), int(val.shape[dim])
    return None


def find_projection(node: fx.Node, max_nodes: int = 64) -> Projection | None:
    """Nearest linear-by-parameter ancestor of `node` (breadth first), with the ops walked through."""
    child: dict[fx.Node, fx.Node | None] = {node: None}
    queue = deque([node])
    visited = 0
    while queue and visited < max_nodes:
        cur = queue.popleft()
        visited += 1
        found = _weight_of(cur)
        if found is not None and found[0] is not None:
            between: list[fx.Node] = []  # from just after the projection up to `node`
            step = child[cur]
            while step is not None:
                between.append(step)
                step = child[step]
            weight, bias, x = found
            cone = _cone(cur, node)
            return Projection(
                node=cur,
                weight=weight,
                bias=bias,
                input=x,
                part=_part_of(between),
                through=sorted({op_name(n) for n in cone}),
            )
        for arg in cur.all_input_nodes:
            if arg not in child and arg.op == "call_function":
                child[arg] = cur
                queue.append(arg)
    return None


def _cone(source: fx.Node, sink: fx.Node) -> list[fx.Node]:
    """Nodes computed from `source` that `sink` depends on (sink included, source excluded)."""
    order = {n: i for i, n in enumerate(sink.graph.nodes)}
    lo, hi = order[source], order[sink]
    ancestors: set[fx.Node] = set()
    stack = [sink]
    while stack:
        cur = stack.pop()
        for arg in cur.all_input_nodes:
            if lo < order[arg] < hi and arg not in ancestors:
                ancestors.add(arg)
                stack.append(arg)
    ancestors.add(sink)
    reached = {source}
    cone = []
    for n in sorted(ancestors, key=order.__getitem__):
        if any(a in reached for a in n.all_input_nodes):
            reached.add(n)
            cone.append(n)
    return cone


def strip_kv_repeat(node: fx.Node) -> tuple[fx.Node, int]:
    """Undo Hugging Face `repeat_kv` (unsqueeze/expand/reshape); returns (source, groups)."""
    if not is_op(node, aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        return node, 1
    cur = node.args[0]
    while is_op(cur, aten.slice.Tensor, aten.clone.default, aten.contiguous.default):
        cur = cur.args[0]
    if not is_op(cur, aten.expand.default):
        return node, 1
    expanded = tensor_meta(cur)
    src = cur.args[0]
    while is_op(src, aten.slice.Tensor):
        src = src.args[0]
    if not is_op(src, aten.unsqueeze.default) or expanded is None or expanded.dim() != 5:
        return node, 1
    try:
        groups = int(expanded.shape[2])
    except (TypeError, ValueError):
        return node, 1
    return src.args[0], groups
