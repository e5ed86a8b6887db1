"""Rotary position embeddings (RoPE) on an attention input, found from the graph's structure.

The form matched is Hugging Face's `x * cos + rotate_half(x) * sin`, with
`rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])` (halves by slice, split or chunk), in either
operand order, and its partial form `cat(rope(x[..., :r]), x[..., r:])` (Phi-3, GPT-NeoX). Between
the rotation and the attention input only layout ops, casts and scalings by a number may stand (views,
transposes, full or partial slices, contiguous copies, dtype casts, `* scale`); they are recorded so the
input can be rebuilt without the rotation. Anything else (complex multiplication, interleaved pairs, a rotation matrix) is not
matched; `rotary_traces` tells whether such an input still looks rotated.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from rewrite.analysis.graph_utils import ancestors
from rewrite.analysis.nodes import is_op, op_name, tensor_meta
from rewrite.analysis.projections import Projection, looks_like_rope

aten = torch.ops.aten

_LAYOUT = (
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int, aten.permute.default,
    aten.slice.Tensor, aten.clone.default, aten.contiguous.default, aten.alias.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.expand.default, aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout,
)
"""Single-tensor ops that may stand between a rotation and the attention input (replayed on the unrotated input)."""
_BY_NUMBER = (aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar)
"""Ops that may stand there too when they scale by a number (a softmax scale folded into q)."""
_SPLITS = (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default)
_TRIG = ("aten.sin", "aten.cos", "aten.polar", "aten.view_as_complex", "aten.view_as_real")
MAX_LAYOUT_OPS = 8
"""Layout ops followed back from an attention input before giving up on finding its rotation."""


@dataclass
class Rotary:
    """A rotary embedding on one attention input: `site input = after(rotation(input))`."""

    input: fx.Node  # the tensor that enters the rotation (q or k before RoPE)
    rotation: fx.Node  # the rotated tensor (the add, or the concatenation of a partial rotary)
    cos: fx.Node
    sin: fx.Node
    rotary_dim: int | None = None  # leading dims of the head rotated (partial rotary); None: all
    after: list[fx.Node] = field(default_factory=list)  # layout ops / casts from the rotation to the site input


def _int(x) -> int | None:
    try:
        return int(x)
    except (TypeError, ValueError):
        return None


def _is_last_dim(node: fx.Node, dim) -> bool:
    val = tensor_meta(node)
    d = _int(dim)
    return val is not None and d is not None and val.dim() > 0 and d % val.dim() == val.dim() - 1


def _slice_of(node) -> tuple[fx.Node, int, int | None] | None:
    """(x, start, end) when `node` is x[..., start:end] (last dim, step 1); end None: to the end."""
    if not is_op(node, aten.slice.Tensor):
        return None
    x = node.args[0]
    dim, start, end, step = (list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1 :])[:4]
    dim = node.kwargs.get("dim", dim)
    start, end, step = node.kwargs.get("start", start), node.kwargs.get("end", end), node.kwargs.get("step", step)
    if not isinstance(x, fx.Node) or not _is_last_dim(x, dim) or _int(step) != 1:
        return None
    size = _int(tensor_meta(x).shape[-1])
    start = 0 if start is None else _int(start)
    end = None if end is None or (size is not None and _int(end) is not None and _int(end) >= size) else _int(end)
    if start is None or (end is None and size is None):
        return None
    return x, start, end


def _half(node, which: int) -> fx.Node | None:
    """x when `node` is the first (which=0) or second (which=1) half of x's last dim."""
    sliced = _slice_of(node)
    if sliced is not None:
        x, start, end = sliced
        size = _int(tensor_meta(x).shape[-1])
        if size is None or size % 2:
            return None
        want = (0, size // 2) if which == 0 else (size // 2, None)
        return x if (start, end) == want else None
    if node is not None and isinstance(node, fx.Node) and node.target is operator.getitem:
        src, index = node.args
        if not is_op(src, *_SPLITS) or index != which or not isinstance(src.args[0], fx.Node):
            return None
        x = src.args[0]
        size = _int(tensor_meta(x).shape[-1]) if tensor_meta(x) is not None else None
        parts = src.meta.get("val")
        dim = src.args[2] if len(src.args) > 2 else src.kwargs.get("dim", 0)
        if size is None or not _is_last_dim(x, dim) or not isinstance(parts, list | tuple) or len(parts) != 2:
            return None
        if all(_int(p.shape[-1]) == size // 2 for p in parts) and size % 2 == 0:
            return x
    return None


def _last_dim_cat_of_two(node) -> tuple[Any, Any] | None:
    """The two parts when `node` concatenates two tensors along its last dim."""
    if not is_op(node, aten.cat.default):
        return None
    parts = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(parts, list | tuple) or len(parts) != 2 or not _is_last_dim(node, dim):
        return None
    return parts[0], parts[1]


def _rotate_half_input(node) -> fx.Node | None:
    """x when `node` is cat(-x2, x1) of x's two halves along the last dim."""
    parts = _last_dim_cat_of_two(node)
    if parts is None:
        return None
    neg, first = parts
    if not is_op(neg, aten.neg.default):
        return None
    x = _half(first, 0)
    return x if x is not None and _half(neg.args[0], 1) is x else None


def _full_rotation(node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(x, cos, sin) when `node` is x * cos + rotate_half(x) * sin (operands in any order)."""
    if not is_op(node, aten.add.Tensor) or node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2:
        return None
    for a, b in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
        if not (is_op(a, aten.mul.Tensor) and is_op(b, aten.mul.Tensor)):
            continue
        for rotated, sin in ((b.args[0], b.args[1]), (b.args[1], b.args[0])):
            x = _rotate_half_input(rotated)
            if x is None or x not in a.args[:2] or not isinstance(sin, fx.Node):
                continue
            cos = a.args[1] if a.args[0] is x else a.args[0]
            if not isinstance(cos, fx.Node) or x in ancestors([cos, sin], _value_inputs):
                continue
            if tensor_meta(x) is None or tensor_meta(node) is None or tensor_meta(x).shape != tensor_meta(node).shape:
                continue
            return x, cos, sin
    return None


def _rotation(node) -> Rotary | None:
    """The rotation producing `node` (full, or partial: cat(rope(x[..., :r]), x[..., r:]))."""
    full = _full_rotation(node)
    if full is not None:
        return Rotary(input=full[0], rotation=node, cos=full[1], sin=full[2])
    parts = _last_dim_cat_of_two(node)
    if parts is None:
        return None
    rotated, rest = _full_rotation(parts[0]), _slice_of(parts[1])
    if rotated is None or rest is None:
        return None
    head = rotated[0]
    while is_op(head, aten.alias.default):  # x[..., :D] of a full rotary is captured as an alias
        head = head.args[0]
    sliced = _slice_of(head)
    x, r_start, r_end = sliced if sliced is not None else (head, 0, None)
    size = _int(tensor_meta(x).shape[-1]) if tensor_meta(x) is not None else None
    width = size if r_end is None else r_end
    if rest[0] is not x or r_start != 0 or width is None or rest[1:] != (width, None):
        return None
    return Rotary(input=x, rotation=node, cos=rotated[1], sin=rotated[2],
                  rotary_dim=width if size is None or width < size else None)


def _layout_op(node: fx.Node) -> bool:
    """Whether `node` computes from one tensor, its first argument, by an op that can be replayed on another."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if is_op(node, *_BY_NUMBER):
        return len(node.args) == 2 and isinstance(node.args[1], int | float) and not node.kwargs
    if not is_op(node, *_LAYOUT):
        return False
    return all(tensor_meta(n) is None for n in node.all_input_nodes if n is not node.args[0])


def _value_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs of `node` it reads values from (not only a size)."""
    return [n for n in node.all_input_nodes if not is_op(n, aten.sym_size.int)]


def find_rotary(node: fx.Node) -> Rotary | None:
    """The rotary embedding `node` (an attention's q or k) is computed by, or None if none is matched."""
    after: list[fx.Node] = []
    cur = node
    for _ in range(MAX_LAYOUT_OPS + 1):
        found = _rotation(cur)
        if found is not None:
            found.after = after[::-1]
            return found
        if not _layout_op(cur):
            return None
        after.append(cur)
        cur = cur.args[0]
    return None


def rotary_traces(node: fx.Node, projection: Projection | None, max_nodes: int = 64) -> bool:
    """Whether `node` looks rotated between its projection and its use: rotate-half ops (a negation and
    a concatenation or stack), complex multiplication, or any op reading something computed by sin / cos."""
    if projection is not None and projection.has_rope:
        return True
    stop = projection.node if projection is not None else None
    seen: list[fx.Node] = []
    stack = [node]
    while stack and len(seen) < max_nodes:
        cur = stack.pop()
        if cur in seen or cur is stop or cur.op != "call_function":
            continue
        seen.append(cur)
        stack.extend(cur.all_input_nodes)
    if looks_like_rope({op_name(n) for n in seen}):
        return True
    for cur in seen:  # a product (elementwise or by a matrix) with something computed by sin / cos
        for operand in cur.all_input_nodes:
            if operand in seen:
                continue
            near = _bounded_ancestors(operand, max_nodes)
            if any(op_name(n) in _TRIG for n in near):
                return True
    return False


def _bounded_ancestors(node: fx.Node, max_nodes: int) -> list[fx.Node]:
    out: list[fx.Node] = []
    stack = [node]
    while stack and len(out) < max_nodes:
        cur = stack.pop()
        if cur in out:
            continue
        out.append(cur)
        stack.extend(cur.all_input_nodes)
    return out


def unrotated(graph: fx.Graph, rotary: Rotary) -> fx.Node:
    """The attention input as it would be without the rotation (`after` applied to `rotary.input`),
    built at the graph's insertion point; the rotation's own nodes are left as they are."""
    cur = rotary.input
    rotated_val, input_val = tensor_meta(rotary.rotation), tensor_meta(rotary.input)
    if rotated_val is not None and input_val is not None and rotated_val.dtype != input_val.dtype:
        cur = graph.call_function(aten.to.dtype, (cur, rotated_val.dtype))
        cur.meta = dict(rotary.rotation.meta)
    for node in rotary.after:
        new = graph.call_function(node.target, (cur, *node.args[1:]), dict(node.kwargs))
        new.meta = dict(node.meta)
        cur = new
    return cur


__all__ = ["MAX_LAYOUT_OPS", "Rotary", "find_rotary", "rotary_traces", "unrotated"]
