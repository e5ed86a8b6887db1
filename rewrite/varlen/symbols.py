"""Which captured dims are batch and sequence, where they sit in a shape, and their packed sizes.

The capture keeps batch and sequence as shape symbols. A dim whose size is exactly a batch symbol
is a batch dim, exactly a sequence symbol a sequence dim, and exactly their product a merged
token dim. Packing maps batch to 1 and sequence to T (the real-token count), so any size
expression of the padded graph has a packed value found by substitution.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import sympy
import torch.fx as fx

from rewrite.analysis.nodes import tensor_meta
from rewrite.analysis.shapes import to_expr


@dataclass(frozen=True)
class TokenDims:
    """Where the token dims of one tensor are: batch (None if absent or merged), seq, and whether merged.

    `factored` marks a batch or sequence dim merged with a fixed feature size (B * heads, as
    nn.MultiheadAttention folds heads into the batch); such tensors run packed but cannot be repadded.
    """

    batch: int | None
    seq: int
    merged: bool = False
    factored: bool = False


@dataclass
class TokenSymbols:
    """The batch and sequence symbols of a capture."""

    batch: set[sympy.Symbol] = field(default_factory=set)
    seq: set[sympy.Symbol] = field(default_factory=set)

    @property
    def all(self) -> set[sympy.Symbol]:
        return self.batch | self.seq

    def kind(self, size) -> str | None:
        """'batch', 'seq', 'merged' (batch * seq), 'batch*' / 'seq*' (times a fixed size) or None for one size."""
        e = to_expr(size)
        if e in self.batch:
            return "batch"
        if e in self.seq:
            return "seq"
        if isinstance(e, sympy.Mul) and len(e.args) == 2:
            a, b = e.args
            if (a in self.batch and b in self.seq) or (b in self.batch and a in self.seq):
                return "merged"
            for sym, other in ((a, b), (b, a)):
                if other.is_Integer and other > 1:
                    if sym in self.batch:
                        return "batch*"
                    if sym in self.seq:
                        return "seq*"
        return None

    def token_factors(self, shape, seq_outer: bool = False) -> dict[str, tuple[int, sympy.Expr]]:
        """For 'batch' and 'seq': (dim holding it, product of the sizes before it in row-major order).

        In a merged batch*seq dim the batch is the outer factor, or the sequence when `seq_outer`.
        """
        out: dict[str, tuple[int, sympy.Expr]] = {}
        before = sympy.Integer(1)
        for i, d in enumerate(shape):
            k = self.kind(d)
            if k in ("batch", "batch*"):
                out["batch"] = (i, before)
            elif k in ("seq", "seq*"):
                out["seq"] = (i, before)
            elif k == "merged":
                b = next(iter(to_expr(d).free_symbols & self.batch))
                q = next(iter(to_expr(d).free_symbols & self.seq))
                out["batch"] = (i, before * q if seq_outer else before)
                out["seq"] = (i, before if seq_outer else before * b)
            before = before * to_expr(d)
        return out

    def mentions_tokens(self, size) -> bool:
        return bool(to_expr(size).free_symbols & self.all)

    def mentions_seq(self, size) -> bool:
        return bool(to_expr(size).free_symbols & self.seq)

    def dims(self, shape) -> TokenDims | None | str:
        """TokenDims of a shape; None when it has no seq dim; a reason string when its token dims are not clean."""
        kinds = [self.kind(d) for d in shape]
        for d, k in zip(shape, kinds):
            if k is None and self.mentions_tokens(d):
                return f"size {to_expr(d)} mixes the batch / sequence length with other dims"
        seqs = [i for i, k in enumerate(kinds) if k in ("seq", "seq*", "merged")]
        batches = [i for i, k in enumerate(kinds) if k in ("batch", "batch*")]
        factored = any(k in ("batch*", "seq*") for k in kinds)
        if not seqs:
            return "a batch dim but no sequence dim (it reduces or selects over the tokens)" if batches else None
        if len(seqs) > 1:
            return "more than one sequence-length dim (tokens attend to tokens)"
        if len(batches) > 1:
            return "more than one batch dim"
        if kinds[seqs[0]] == "merged":
            if batches:
                return "a batch dim beside a merged batch*seq dim"
            return TokenDims(None, seqs[0], merged=True, factored=factored)
        return TokenDims(batches[0] if batches else None, seqs[0], factored=factored)

    def node_dims(self, node: fx.Node) -> TokenDims | None | str:
        val = tensor_meta(node)
        return None if val is None else self.dims(val.shape)


def find_symbols(placeholders: list[fx.Node]) -> TokenSymbols:
    """Batch symbols from dim 0 and sequence symbols from dim 1 of [batch, seq, ...] inputs."""
    out = TokenSymbols()
    for node in placeholders:
        val = tensor_meta(node)
        if val is None or val.dim() < 2:
            continue
        for dim, bucket in ((0, out.batch), (1, out.seq)):
            e = to_expr(val.shape[dim])
            if isinstance(e, sympy.Symbol):
                bucket.add(e)
    return out


class SizeBuilder:
    """Puts nodes in the graph that compute size expressions from chosen size values (packed or padded).

    Nodes go right after the last size value (then after each other), so they precede every use.
    """

    def __init__(self, graph: fx.Graph, values: dict[sympy.Symbol, fx.Node | int], where: str):
        self.graph = graph
        self.values = values
        nodes = [v for v in values.values() if isinstance(v, fx.Node)]
        order = {n: i for i, n in enumerate(graph.nodes)}
        self.last = max(nodes, key=order.__getitem__) if nodes else None
        self.where = where
        self._cache: dict[sympy.Expr, fx.Node | int] = {}

    def build(self, expr: sympy.Expr) -> fx.Node | int:
        """A node (or int) equal to `expr` at run time."""
        expr = sympy.expand(expr.xreplace({s: sympy.Integer(v) for s, v in self.values.items() if isinstance(v, int)}))
        if expr not in self._cache:
            self._cache[expr] = self._build(expr)
        return self._cache[expr]

    def _build(self, expr: sympy.Expr) -> fx.Node | int:
        if expr.is_Integer:
            return int(expr)
        if expr.is_Symbol:
            if expr not in self.values:
                raise KeyError(f"size symbol {expr} is neither the batch size nor the sequence length ({self.where})")
            return self.values[expr]
        if expr.is_Add or expr.is_Mul:
            op = operator.add if expr.is_Add else operator.mul
            parts = [self.build(a) for a in expr.args]
            acc = parts[0]
            for part in parts[1:]:
                if self.last is None:
                    raise KeyError(f"size {expr} needs a size node ({self.where})")
                with self.graph.inserting_after(self.last):
                    acc = self.graph.call_function(op, (acc, part))
                self.last = acc
            return acc
        raise KeyError(f"size {expr} is not a sum or product of sizes ({self.where})")
