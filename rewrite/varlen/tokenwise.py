"""Rules that prove one op token-wise: running it on packed tokens gives the packed form of its padded output.

An op is token-wise when it never combines values of different tokens and keeps the batch and
sequence dims intact: element-wise ops and broadcasts whose token dims line up, linear maps over
feature dims, reductions / norms / softmax / splits / concatenations over feature dims, views that
keep batch and sequence (or merge them into one dim), transposes and permutes, embedding lookups.
`check` returns None for a proven op, else the reason it is not proven.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import sympy
import torch
import torch.fx as fx

from rewrite.analysis.nodes import is_op, tensor_meta
from rewrite.analysis.shapes import to_expr
from rewrite.varlen.symbols import TokenDims, TokenSymbols

aten = torch.ops.aten

ELEMENTWISE = (
    aten.dropout.default, aten._to_copy.default, aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten.to.other,
    aten.type_as.default, aten.contiguous.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default,
    aten.__and__.Tensor, aten.__or__.Tensor, aten.__xor__.Tensor, aten.empty_like.default, aten.zeros_like.default,
    aten.ones_like.default, aten.full_like.default, aten.expand.default, aten.expand_as.default, aten.copy_.default,
)
"""Element-wise or broadcasting ops that carry no pointwise tag (copy_ writes its broadcast source into a view)."""

NEW_LIKE = (aten.new_empty.default, aten.new_zeros.default, aten.new_ones.default, aten.new_full.default)
"""Factories that take only dtype and device from their operand (DeepSeek builds keys in such a buffer)."""

RESHAPES = (
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
    aten.unflatten.int, aten.view_as.default, aten.reshape_as.default,
)
MOVES = (aten.transpose.int, aten.permute.default, aten.t.default, aten.movedim.int, aten.unsqueeze.default,
         aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.swapaxes.default)
REDUCTIONS = (
    aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default, aten.var.correction, aten.var.dim,
    aten.std.correction, aten.std.dim, aten.var_mean.correction, aten.logsumexp.default, aten.argmax.default,
    aten.argmin.default, aten.max.dim, aten.min.dim, aten.any.dim, aten.all.dim, aten.prod.dim_int,
    aten.norm.ScalarOpt_dim, aten.linalg_vector_norm.default, aten.softmax.int, aten._softmax.default,
    aten._safe_softmax.default, aten.log_softmax.int, aten._log_softmax.default, aten.cumsum.default,
    aten.cumprod.default,
)
SPLITS = (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int,
          aten.tensor_split.sections, aten.tensor_split.indices)
PICKS = (aten.select.int, aten.narrow.default, aten.index_select.default, aten.gather.default)
NORMS = (aten.layer_norm.default, aten.rms_norm.default, aten.native_layer_norm.default)
MATMULS = (aten.matmul.default, aten.mm.default, aten.bmm.default)
NO_OUTPUT = (aten._assert_tensor_metadata.default,)

SEQ_OUTER = "rewrite_varlen_seq_outer"
"""Node metadata: in this tensor's merged batch*seq dim the sequence is the outer factor."""

KindOf = Callable[[fx.Node], str]
"""Kind of a node: 'token', 'positional', 'free', 'padded', 'sym' or 'unproven'."""


def _dims(symbols: TokenSymbols, node) -> TokenDims | str | None:
    if not isinstance(node, fx.Node):
        return None
    return symbols.node_dims(node)


def _rank(node: fx.Node) -> int:
    val = tensor_meta(node)
    return val.dim() if val is not None else 0


def _norm_dim(dim: int, rank: int) -> int:
    return dim % rank if rank else dim


def _touches(dims: TokenDims, axes: list[int], rank: int) -> bool:
    axes = [_norm_dim(a, rank) for a in axes]
    return dims.seq in axes or (dims.batch is not None and dims.batch in axes)


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _as_list(x) -> list[int] | None:
    if x is None:
        return None
    if isinstance(x, int):
        return [x]
    return [int(v) for v in x]


def _aligned(out: TokenDims, out_rank: int, inp: TokenDims, in_rank: int) -> bool:
    shift = out_rank - in_rank
    if inp.merged != out.merged or inp.seq + shift != out.seq:
        return False
    if inp.batch is not None and inp.batch + shift != out.batch:
        return False
    return True


def _stacked_aligned(out: TokenDims, inp: TokenDims, dim: int) -> bool:
    """Whether stacking at `dim` (of the result) keeps the operand's token dims where the result has them."""
    def moved(d: int | None) -> int | None:
        return None if d is None else d + (d >= dim)

    return inp.merged == out.merged and moved(inp.seq) == out.seq and moved(inp.batch) == out.batch


def _reshape_rule(node: fx.Node, symbols: TokenSymbols, inp: TokenDims) -> str | None:
    """A reshape commutes with packing when the sizes before batch and before sequence stay the same."""
    out = _dims(symbols, node)
    if not isinstance(out, TokenDims):
        return f"the reshape's result {out or 'has no sequence dim'}"
    before = symbols.token_factors(tensor_meta(node.args[0]).shape, bool(node.args[0].meta.get(SEQ_OUTER)))
    problem = "the reshape adds or removes the batch dim"
    for seq_outer in (False, True):
        after = symbols.token_factors(tensor_meta(node).shape, seq_outer)
        if before.keys() != after.keys():
            continue
        moved = [key for key, (_, prefix) in before.items() if sympy.simplify(prefix - after[key][1]) != 0]
        if not moved:
            if out.merged:
                node.meta[SEQ_OUTER] = seq_outer
            return None
        problem = f"the reshape moves sizes across the {'batch' if moved[0] == 'batch' else 'sequence'} dim"
    return problem


def _table_lookup(node: fx.Node, symbols: TokenSymbols) -> bool:
    """Whether aten.index reads its first operand at one index tensor whose token dims lead the result."""
    indices = node.args[1]
    if len(indices) != 1 or not isinstance(indices[0], fx.Node):
        return False
    index_dims, out = _dims(symbols, indices[0]), _dims(symbols, node)
    return isinstance(index_dims, TokenDims) and isinstance(out, TokenDims) and out == index_dims


def check(node: fx.Node, symbols: TokenSymbols, kind_of: KindOf) -> str | None:
    """None if `node` (with at least one token or positional input) is token-wise, else why not."""
    reason = _check(node, symbols, kind_of)
    dims = _dims(symbols, node) if reason is None and SEQ_OUTER not in node.meta else None
    if isinstance(dims, TokenDims) and dims.merged:
        order = [a.meta[SEQ_OUTER] for a in node.all_input_nodes if SEQ_OUTER in a.meta]
        if order:
            node.meta[SEQ_OUTER] = order[0]
    return reason


def _check(node: fx.Node, symbols: TokenSymbols, kind_of: KindOf) -> str | None:
    inputs = [a for a in node.all_input_nodes if kind_of(a) != "sym"]
    for a in inputs:
        if kind_of(a) in ("padded", "unproven"):
            return f"it mixes packed tokens with {a.name!r}, which is not a per-token tensor"
    if is_op(node, *NO_OUTPUT) or node.target is operator.getitem:
        return None
    out = _dims(symbols, node)
    if isinstance(out, str):
        return f"its result has {out}"
    if out is None and not isinstance(node.meta.get("val"), list | tuple):
        return "its result has no sequence dim (it reduces or selects over the tokens)"
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    first_dims = _dims(symbols, first) if first is not None else None
    tagged = isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags
    if tagged or is_op(node, *ELEMENTWISE):
        for a in inputs:
            if kind_of(a) in ("token", "positional"):
                d = _dims(symbols, a)
                if not isinstance(d, TokenDims) or not _aligned(out, _rank(node), d, _rank(a)):
                    return f"its operand {a.name!r} does not line up with the result's token dims"
        return None
    if is_op(node, aten.cat.default, aten.stack.default):
        tensors = node.args[0]
        out_rank = _rank(node)
        dim = _norm_dim(_arg(node, 1, "dim", 0), out_rank)
        stacked = is_op(node, aten.stack.default)
        for t in tensors:
            if kind_of(t) in ("token", "positional"):
                d = _dims(symbols, t)
                if not isinstance(d, TokenDims) or not (
                    _stacked_aligned(out, d, dim) if stacked else _aligned(out, out_rank, d, _rank(t))
                ):
                    return f"its operand {t.name!r} does not line up with the result's token dims"
        return "it joins along the tokens" if _touches(out, [dim], out_rank) else None
    if is_op(node, aten.addmm.default):
        x = node.args[1]
        x_dims = _dims(symbols, x)
        if kind_of(node.args[0]) != "free" or kind_of(node.args[2]) != "free" or not isinstance(x_dims, TokenDims):
            return "only its middle operand may carry tokens"
        return "the product contracts over the tokens" if _touches(x_dims, [1], 2) else None
    if not isinstance(first_dims, TokenDims):
        if is_op(node, aten.embedding.default) and kind_of(node.args[0]) == "free":
            return None
        if is_op(node, aten.gather.default, aten.index_select.default) and kind_of(node.args[0]) == "free":
            return None  # a constant table read at per-token indices
        if is_op(node, aten.index.Tensor) and kind_of(node.args[0]) == "free" and _table_lookup(node, symbols):
            return None  # table[position_ids]: a constant table read at per-token indices
        if is_op(node, *MATMULS) and kind_of(node.args[0]) == "free":
            other = _dims(symbols, node.args[1])
            if isinstance(other, TokenDims) and _rank(node.args[1]) >= 2:
                rank = _rank(node.args[1])
                return "the product contracts over the tokens" if _touches(other, [rank - 2], rank) else None
        return "its first operand is not a per-token tensor"
    rank = _rank(first)
    if is_op(node, *NEW_LIKE):
        return None  # no value comes from the operand; the result's sizes follow the packed tokens
    if is_op(node, *RESHAPES):
        return _reshape_rule(node, symbols, first_dims)
    if is_op(node, *MOVES):
        if (first_dims.batch is None) != (out.batch is None) or first_dims.merged != out.merged:
            return "it squeezes the batch dim away"
        return None
    if is_op(node, aten.linear.default):
        return None if all(kind_of(a) == "free" for a in inputs[1:]) else "its weight is not a model constant"
    if is_op(node, *MATMULS):
        if kind_of(node.args[1]) != "free":
            return "both operands carry tokens (tokens attend to tokens)"
        return "the product contracts over the tokens" if _touches(first_dims, [rank - 1], rank) else None
    if is_op(node, *NORMS):
        shape = _as_list(node.args[1]) or []
        return "it normalizes over the tokens" if _touches(first_dims, list(range(rank - len(shape), rank)), rank) else None
    if is_op(node, torch.ops.rewrite.rms_norm.default):
        return None
    if is_op(node, *REDUCTIONS):
        dims = _as_list(_arg(node, 1, "dim"))
        if dims is None or not dims:
            return "it reduces over every dim, tokens included"
        return "it reduces over the tokens" if _touches(first_dims, dims, rank) else None
    if is_op(node, *SPLITS):
        dim = _arg(node, 1, "dim", 0) if is_op(node, aten.unbind.int) else _arg(node, 2, "dim", 0)
        return "it splits along the tokens" if _touches(first_dims, [dim], rank) else None
    if is_op(node, aten.repeat_interleave.self_int):
        dim = _arg(node, 2, "dim")
        if dim is None:
            return "it repeats the flattened tensor, tokens included"
        return "it repeats along the tokens" if _touches(first_dims, [dim], rank) else None
    if is_op(node, aten.repeat.default):
        repeats = list(_arg(node, 1, "repeats") or [])
        if len(repeats) != rank:
            return "it tiles the tensor into new leading dims"
        tiled = [d for d, times in enumerate(repeats) if not (isinstance(times, int) and times == 1)]
        return "it tiles the tokens" if _touches(first_dims, tiled, rank) else None
    if is_op(node, aten.slice.Tensor):
        dim = _arg(node, 1, "dim", 0)
        if not _touches(first_dims, [dim], rank):
            return None
        start, end, step = _arg(node, 2, "start"), _arg(node, 3, "end"), _arg(node, 4, "step", 1)
        size = to_expr(tensor_meta(first).shape[dim])
        whole_end = end is None or (isinstance(end, int) and end >= 2**62) or (
            isinstance(end, fx.Node) and isinstance(end.meta.get("val"), torch.SymInt)
            and sympy.simplify(to_expr(end.meta["val"]) - size) == 0
        )
        whole_start = start in (None, 0) or (  # x[:, -seq:] (LFM2 cuts its mask to the tokens' length so)
            isinstance(start, fx.Node) and isinstance(start.meta.get("val"), torch.SymInt)
            and sympy.simplify(to_expr(start.meta["val"]) + size) == 0
        )
        if whole_start and step in (None, 1) and whole_end:
            return None
        return "it slices part of the tokens"
    if is_op(node, *PICKS):
        dim = _arg(node, 1, "dim")
        return "it picks tokens by index" if _touches(first_dims, [dim], rank) else None
    if is_op(node, aten.flip.default, aten.roll.default):
        dims = _as_list(_arg(node, 1 if is_op(node, aten.flip.default) else 2, "dims"))
        return "it reorders the tokens" if dims is None or _touches(first_dims, dims, rank) else None
    return f"the varlen pass has no rule proving {getattr(node.target, '__name__', node.target)} token-wise"
