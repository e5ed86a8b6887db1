"""Fused rotary position embeddings in a decode program.

Hugging Face's `apply_rotary_pos_emb` leaves `x * cos + rotate_half(x) * sin` in the graph as separate
kernels per tensor (mul, two slices, neg, cat, mul, add). Each such expression becomes one call of
`rewrite::rotary_embedding`, and the query and key rotations by the same cos / sin one call of
`rewrite::rotary_embedding_pair` (one Triton kernel on CUDA), rounding as the separate ops do. Partial
rotary (the rotation of a slice of the head, concatenated with the rest) fuses the rotation of the slice;
other forms (GPT-J's interleaved `rotate_every_two`) are left alone. Off by default (`FUSE_ROTARY`): the
time it saves has not been measured on a GPU yet.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

import rewrite.kernels.rotary  # noqa: F401  (registers the ops)
from rewrite.analysis.graph_utils import erase_unused
from rewrite.analysis.nodes import is_op

aten = torch.ops.aten

FUSE_ROTARY = True
"""Whether a decode program built from now on fuses its rotary position embeddings (read when `DecodeProgram`
is built; `rewrite.decode.decode_program` builds the program again when this changes). On by default:
with the other decode fusions it took a graphed batch-1 8K step from 2.35 to 1.55 ms (BENCHMARKS.md, 2026-12-07)."""


@dataclass
class Rotation:
    """One `x * cos + rotate_half(x) * sin` in a graph: `add` is its result, `inner` the nodes only it reads."""

    add: fx.Node
    x: fx.Node
    cos: fx.Node
    sin: fx.Node
    inner: list[fx.Node]


def _val(node: object) -> torch.Tensor | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two meta values have the same shape, without guarding on symbolic sizes."""
    return a.dim() == b.dim() and all(x is y or str(x) == str(y) for x, y in zip(a.shape, b.shape, strict=True))


def _slice_of_last_dim(node: object) -> tuple[fx.Node, int, int] | None:
    """(input, start, end) of a step-1 `aten.slice` of its input's last dim, else None."""
    if not is_op(node, aten.slice.Tensor):
        return None
    assert isinstance(node, fx.Node)
    given = dict(zip(("source", "dim", "start", "end", "step"), node.args, strict=False))
    given.update(node.kwargs)
    source, dim, start, end = given["source"], given.get("dim", 0), given.get("start"), given.get("end")
    step = given.get("step", 1)
    value = _val(source)
    if value is None or step != 1 or not isinstance(dim, int) or dim % max(value.dim(), 1) != value.dim() - 1:
        return None
    start = 0 if start is None else start
    end = 2**63 - 1 if end is None else end
    if not isinstance(start, int) or not isinstance(end, int):
        return None
    assert isinstance(source, fx.Node)
    return source, start, end


def _rotate_half_input(cat: object) -> tuple[fx.Node, list[fx.Node]] | None:
    """(x, [cat, neg, slices]) where `cat` is `cat([-x[..., D/2:], x[..., :D/2]], -1)`, else None."""
    if not is_op(cat, aten.cat.default):
        return None
    assert isinstance(cat, fx.Node)
    parts = cat.args[0]
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    out = _val(cat)
    if out is None or not isinstance(parts, list | tuple) or len(parts) != 2 or not isinstance(dim, int):
        return None
    if dim % out.dim() != out.dim() - 1:
        return None
    neg, first = parts
    if not is_op(neg, aten.neg.default):
        return None
    second, low = _slice_of_last_dim(neg.args[0]), _slice_of_last_dim(first)
    if second is None or low is None or second[0] is not low[0]:
        return None
    x, value = low[0], _val(low[0])
    width = value.shape[-1] if value is not None and value.dim() > 0 else None
    if not isinstance(width, int) or width % 2 or low[1:] != (0, width // 2):
        return None
    if second[1] != width // 2 or second[2] < width:
        return None
    return x, [cat, neg, neg.args[0], first]


def _factors(product: object) -> tuple[fx.Node, fx.Node] | None:
    """(a, b) of `aten.mul(a, b)` of two tensors, else None."""
    if not is_op(product, aten.mul.Tensor) or len(product.args) != 2:
        return None
    a, b = product.args
    if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
        return None
    return a, b


def rotation(add: fx.Node) -> Rotation | None:
    """`add` as the result of `x * cos + rotate_half(x) * sin` (factors and terms in either order) whose
    intermediate values nothing else reads, with cos / sin of one dtype that broadcast to x, else None."""
    if not is_op(add, aten.add.Tensor) or len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1:
        return None
    for cos_term, sin_term in (add.args, add.args[::-1]):
        sin_factors, cos_factors = _factors(sin_term), _factors(cos_term)
        if sin_factors is None or cos_factors is None:
            continue
        for rotated, sin in (sin_factors, sin_factors[::-1]):
            found = _rotate_half_input(rotated)
            if found is None:
                continue
            x, rotate_nodes = found
            others = [f for f in cos_factors if f is not x]
            if len(others) != 1:  # x * cos, either order (not x * x)
                continue
            match = Rotation(add, x, others[0], sin, [cos_term, sin_term, *rotate_nodes])
            if _fusable(match):
                return match
    return None


def _fusable(r: Rotation) -> bool:
    """Whether the op computes what the matched nodes do: shapes and dtypes as it gives them, and the
    intermediate nodes read only inside the pattern."""
    x, cos, sin, out = _val(r.x), _val(r.cos), _val(r.sin), _val(r.add)
    if x is None or cos is None or sin is None or out is None or not x.is_floating_point():
        return False
    if cos.dtype != sin.dtype or cos.dim() > x.dim() or not _same_shape(out, x):
        return False
    if any(v is None or not _same_shape(v, x) or v.dtype != out.dtype for v in map(_val, r.inner[:3])):
        return False  # both products (so cos / sin broadcast to x without growing it) and the cat
    if out.dtype != torch.promote_types(x.dtype, cos.dtype) or cos.dim() == 0:
        return False
    inside = set(r.inner) | {r.add}
    return all(set(node.users) <= inside for node in r.inner)


def rotations(gm: fx.GraphModule) -> list[Rotation]:
    """The fusable rotations of `gm`'s graph, in graph order."""
    found = []
    for node in gm.graph.nodes:
        match = rotation(node)
        if match is not None:
            found.append(match)
    return found


def _fake_result(target: object, *args: fx.Node) -> object:
    """The meta value `target` gives the meta values of `args` (None if they have none or no fake mode)."""
    values = [_val(a) for a in args]
    mode = torch._guards.detect_fake_mode(values) if all(v is not None for v in values) else None
    if mode is None:
        return None
    with mode:
        return target(*values)


def _pairs(found: list[Rotation], order: dict[fx.Node, int]) -> list[tuple[Rotation, ...]]:
    """`found` as pairs (query, key) by the same cos and sin where one call can stand for both (all inputs
    of both made before either result), the rest alone."""
    by_angles: dict[tuple[fx.Node, fx.Node], list[Rotation]] = {}
    for r in found:
        by_angles.setdefault((r.cos, r.sin), []).append(r)
    groups: list[tuple[Rotation, ...]] = []
    for members in by_angles.values():
        i = 0
        while i < len(members):
            if i + 1 < len(members):
                a, b = members[i], members[i + 1]
                first_result = min(order[a.add], order[b.add])
                latest_input = max(order[n] for n in (a.x, b.x, a.cos, a.sin))
                if latest_input < first_result and _val(a.x).shape[-1] == _val(b.x).shape[-1]:
                    groups.append((a, b))
                    i += 2
                    continue
            groups.append((members[i],))
            i += 1
    return sorted(groups, key=lambda g: order[g[0].add])


def fuse_rotary_embeddings(gm: fx.GraphModule) -> int:
    """Replace every rotation of `rotations(gm)` by a `rewrite::rotary_embedding` call, and two by the same
    cos / sin (query and key) by one `rewrite::rotary_embedding_pair` call; recompiles `gm` and returns how
    many calls were inserted."""
    graph = gm.graph
    order = {node: i for i, node in enumerate(graph.nodes)}
    groups = _pairs(rotations(gm), order)
    for group in groups:
        first = min((r.add for r in group), key=order.__getitem__)  # after every input, before every use
        cos, sin = group[0].cos, group[0].sin
        with graph.inserting_before(first):
            if len(group) == 1:
                target = torch.ops.rewrite.rotary_embedding.default
                call = graph.call_function(target, (group[0].x, cos, sin))
                results = [call]
            else:
                target = torch.ops.rewrite.rotary_embedding_pair.default
                call = graph.call_function(target, (group[0].x, group[1].x, cos, sin))
                results = [graph.call_function(operator.getitem, (call, i)) for i in range(2)]
        call.meta["nn_module_stack"] = dict(group[0].add.meta.get("nn_module_stack") or {})
        value = _fake_result(target, *call.args)
        if value is not None:
            call.meta["val"] = value
        for i, (r, result) in enumerate(zip(group, results, strict=True)):
            if result is not call:
                result.meta["val"] = value[i] if isinstance(value, tuple) else r.add.meta.get("val")
            r.add.replace_all_uses_with(result)
            erase_unused(graph, [r.add, *r.inner])
    if groups:
        graph.lint()
        gm.recompile()
    return len(groups)
