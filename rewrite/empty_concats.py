"""Drop the empty operands that a Hugging Face cache created inside a forward concatenates to the keys.

Some models build their KV cache in every forward, also when nothing is cached (XLM and FlauBERT create an
`EncoderDecoderCache` unconditionally): each layer's first update concatenates an empty 1-D tensor (shape (0,))
with the new keys and values. `torch.cat` skips such tensors, so the concatenation is the keys themselves, but the
graph shows keys joined "to keys from elsewhere", which the attention analysis takes for a filled KV cache. This
step rewrites `cat([empty, x], dim)` as `x` where nothing mutates either and the program does not return the
concatenation (a cache returned to the caller, as a Hugging Face decoder does with use_cache under torch.compile,
stays visible to the passes, which refuse it), leaving what the program computes unchanged.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from rewrite.analysis.nodes import is_op

aten = torch.ops.aten


def _skipped_by_cat(node: object) -> bool:
    """A tensor `torch.cat` ignores: 1-D with no elements."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() != 1:
        return False
    size = val.shape[0]
    return type(size) is int and size == 0  # a symbolic size (even one known to be 0 only at run time) is kept


_PASS_THROUGH = (aten.view, aten.reshape, aten.transpose, aten.permute, aten.contiguous, aten.detach, aten.alias,
                 aten.clone, aten.unsqueeze, aten.squeeze, aten.expand, aten.slice)


def _returned(node: fx.Node) -> bool:
    """Whether the program returns `node` (or a view of it): a cache the caller keeps, not only attention's keys."""
    seen, todo = set(), [node]
    while todo:
        current = todo.pop()
        for user in current.users:
            if user.op == "output":
                return True
            if user not in seen and is_op(user, *_PASS_THROUGH) and user.args and user.args[0] is current:
                seen.add(user)
                todo.append(user)
    return False


def _mutated(node: fx.Node) -> bool:
    """Whether an in-place op (its schema name ending in `_`, as `detach_`) takes `node`."""
    return any(isinstance(u.target, torch._ops.OpOverload) and u.target._schema.name.endswith("_") for u in node.users)


def drop_empty_concats(gm: fx.GraphModule) -> int:
    """Replace each `cat` of one tensor and 1-D empty ones by that tensor; returns how many were replaced."""
    changed = 0
    for node in list(gm.graph.nodes):
        if not is_op(node, aten.cat) or not node.args or not isinstance(node.args[0], list | tuple):
            continue
        kept = [t for t in node.args[0] if not _skipped_by_cat(t)]
        if len(kept) != 1 or len(kept) == len(node.args[0]) or not isinstance(kept[0], fx.Node):
            continue
        val, out = kept[0].meta.get("val"), node.meta.get("val")
        if not (isinstance(val, torch.Tensor) and isinstance(out, torch.Tensor) and val.dtype == out.dtype):
            continue
        if _mutated(node) or _mutated(kept[0]):
            continue  # the concatenation is a copy: sharing it would let a mutation reach the other
        if _returned(node):
            continue  # a cache the program returns (use_cache under torch.compile): the passes must see it
        node.replace_all_uses_with(kept[0])
        gm.graph.erase_node(node)
        changed += 1
    if changed:
        gm.recompile()
    return changed


__all__ = ["drop_empty_concats"]
