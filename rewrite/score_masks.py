"""Bring the ways hand-written attention hides scores into the one form the attention analysis matches.

The analysis reads an unfused attention whose scores are hidden by one `masked_fill(scores, mask, -inf)`
(`rewrite.analysis.attention_sites`). Hand-written modules and some Hugging Face models reach the same result
in two other ways, which this step rewrites before any pass runs, leaving what the program computes unchanged:

- in place: `scores.masked_fill_(mask, -inf)` and later uses of `scores` (XLM, many hand-written modules).
  The captured graph keeps the mutation as its own node, with the later ops reading `scores`; the mutation
  becomes an out-of-place `masked_fill` whose later users read it instead. Only where `scores` is a fresh
  tensor (a matmul or an elementwise op on one) that no view aliases, and where nothing reads `scores` between
  its computation and the mutation except the mutation itself.
- chained: `masked_fill(masked_fill(scores, causal, -inf), padding, -inf)` (a causal buffer and a padding mask
  applied one after the other) becomes one `masked_fill(scores, causal | padding, -inf)`.
- selected: `where(keep, scores, lowest)` (GPT-Neo's eager attention, the lowest value a constant tensor) becomes
  `masked_fill(scores, ~keep, lowest)`; followed by an additive mask, `where(keep, scores, lowest) + mask` becomes
  `scores + where(keep, mask, lowest + mask)`. Where `keep` hides a key that is `scores + (lowest + mask)` against
  `lowest + mask`: equal, since `lowest + mask` is the lowest float or -inf, which absorb any score below 1e31 in
  float32 and bfloat16 (the only score dtypes this form is rewritten for).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from rewrite.analysis.attention_sites import hides_score
from rewrite.analysis.graph_utils import attribute_tensor
from rewrite.analysis.nodes import is_op

aten = torch.ops.aten
_VIEW_OPS = (aten.view, aten.reshape, aten.transpose, aten.permute, aten.expand, aten.slice, aten.select,
             aten.unsqueeze, aten.squeeze, aten.t, aten.as_strided, aten.alias, aten.unflatten, aten.flatten,
             aten.split, aten.chunk, aten.unbind, aten.narrow, aten.diagonal, aten.view_as, aten.expand_as)
_FRESH_OPS = (aten.matmul, aten.bmm, aten.mm, aten.einsum, aten.baddbmm, aten.mul, aten.div, aten.add, aten.sub)


def _shape_only(user: fx.Node, scores: fx.Node) -> bool:
    """Whether `user` reads only the shape of `scores` (its size, or as the shape to expand / view to)."""
    if is_op(user, aten.sym_size, aten.sym_numel, aten.sym_stride):
        return True
    return is_op(user, aten.expand_as, aten.view_as) and user.args[0] is not scores


def _functional_in_place_fills(graph: fx.Graph) -> int:
    """Rewrite `scores.masked_fill_(mask, -inf)` on fresh, unaliased scores as an out-of-place fill."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    changed = 0
    for node in list(graph.nodes):
        if not is_op(node, aten.masked_fill_) or len(node.args) < 3 or not hides_score(node.args[2]):
            continue
        scores = node.args[0]
        readers = [u for u in scores.users if u is not node and not _shape_only(u, scores)]
        if not is_op(scores, *_FRESH_OPS) or any(is_op(u, *_VIEW_OPS) for u in readers):
            continue  # a view would alias the mutated values
        if any(order[u] < order[node] for u in readers):
            continue  # read before the mutation too: the two readings see different values
        later = [u for u in readers if order[u] > order[node]]
        with graph.inserting_after(node):
            fill = graph.call_function(aten.masked_fill.Scalar, (scores, node.args[1], node.args[2]))
        fill.meta = dict(node.meta)
        for user in later:
            user.replace_input_with(scores, fill)
        node.replace_all_uses_with(fill)
        graph.erase_node(node)
        changed += 1
    return changed


def _merged_chained_fills(graph: fx.Graph) -> int:
    """Rewrite `masked_fill(masked_fill(s, a, x), b, x)` with x hiding the score (the inner fill used only there)
    as one fill with the mask `a | b`."""
    changed = 0
    for node in list(graph.nodes):
        if not is_op(node, aten.masked_fill.Scalar) or not hides_score(node.args[2]):
            continue
        inner = node.args[0]
        if not is_op(inner, aten.masked_fill.Scalar) or inner.args[2] != node.args[2] or len(inner.users) != 1:
            continue  # one fill value for both (a row hidden by both -inf and the lowest float softmaxes differently)
        with graph.inserting_before(node):
            either = graph.call_function(aten.logical_or.default, (inner.args[1], node.args[1]))
            a, b = inner.args[1].meta.get("val"), node.args[1].meta.get("val")
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                either.meta["val"] = torch.logical_or(a, b)
        node.args = (inner.args[0], either, node.args[2])
        graph.erase_node(inner)
        changed += 1
    return changed


_CONSTANT_PATH = (aten.detach_, aten.detach, aten.lift_fresh_copy, aten.clone, aten.alias)


def _constant_value(gm: fx.GraphModule, value: object) -> float | None:
    """The number `value` holds: a Python number, or a one-element constant tensor of the module (reached through
    detach / lift_fresh_copy / clone), else None."""
    if isinstance(value, int | float):
        return float(value)
    node = value
    while is_op(node, *_CONSTANT_PATH):
        node = node.args[0]
    if is_op(node, aten.scalar_tensor) and isinstance(node.args[0], int | float):
        return float(node.args[0])  # torch.tensor(number) as a retrace records it
    if is_op(node, aten.full) and list(node.args[0]) == [] and isinstance(node.args[1], int | float):
        return float(node.args[1])
    tensor = attribute_tensor(gm, node)
    if tensor is None or tensor.numel() != 1 or not tensor.is_floating_point():
        return None
    try:
        return float(tensor.item())
    except Exception:  # a fake or meta tensor holds no value
        return None


def _where_fills(gm: fx.GraphModule) -> int:
    """Rewrite `where(keep, scores, lowest)` of matmul scores as a masked_fill, or, followed by an additive mask, as
    the scores plus `where(keep, mask, lowest + mask)` (see the module docstring)."""
    graph = gm.graph
    changed = 0
    for node in list(graph.nodes):
        if not is_op(node, aten.where.self, aten.where.ScalarOther) or len(node.args) != 3:
            continue
        keep, scores, fill = node.args
        lowest = _constant_value(gm, fill)
        if lowest is None or not hides_score(lowest) or not is_op(scores, *_FRESH_OPS):
            continue
        users = list(node.users)
        add = users[0] if len(users) == 1 and is_op(users[0], aten.add.Tensor) and not users[0].kwargs else None
        if add is not None:
            mask = add.args[1] if add.args[0] is node else add.args[0]
            val = scores.meta.get("val")
            if not isinstance(mask, fx.Node) or mask is node or not isinstance(val, torch.Tensor):
                continue
            if val.dtype not in (torch.float32, torch.bfloat16):
                continue  # float16's lowest value does not absorb a score
            with graph.inserting_before(add):
                shifted = graph.call_function(aten.add.Tensor if isinstance(fill, fx.Node) else aten.add.Scalar,
                                              (mask, fill))
                moved = graph.call_function(aten.where.self, (keep, mask, shifted))
            vals = [a.meta.get("val") if isinstance(a, fx.Node) else a for a in (keep, mask, fill)]
            if all(isinstance(v, torch.Tensor) for v in vals[:2]):
                shifted.meta["val"] = vals[1] + vals[2]
                moved.meta["val"] = torch.where(vals[0], vals[1], shifted.meta["val"])
            add.args = (scores, moved)
        else:
            with graph.inserting_before(node):
                hidden = graph.call_function(aten.logical_not.default, (keep,))
                fill_node = graph.call_function(aten.masked_fill.Scalar, (scores, hidden, lowest))
            if isinstance(keep.meta.get("val"), torch.Tensor):
                hidden.meta["val"] = keep.meta["val"].logical_not()
            fill_node.meta = dict(node.meta)
            node.replace_all_uses_with(fill_node)
        graph.erase_node(node)
        changed += 1
    return changed


def canonicalize_score_masks(gm: fx.GraphModule) -> int:
    """Rewrite in-place, chained and where-selected fills of attention scores into the forms the analysis reads (see
    the module docstring); returns how many changed. The program computes the same values."""
    changed = _functional_in_place_fills(gm.graph)
    changed += _where_fills(gm)
    changed += _merged_chained_fills(gm.graph)
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


__all__ = ["canonicalize_score_masks"]
