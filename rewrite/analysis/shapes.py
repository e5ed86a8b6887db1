"""Symbolic shapes: which captured dims are batch, sequence and heads, as sympy expressions."""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy
import torch
import torch.fx as fx

from rewrite.analysis.attention_sites import AttentionSite
from rewrite.analysis.nodes import tensor_meta

BATCH = sympy.Symbol("batch", positive=True, integer=True)
SEQ = sympy.Symbol("seq", positive=True, integer=True)


def to_expr(x) -> sympy.Expr:
    """A sympy expression for an int or SymInt."""
    if isinstance(x, torch.SymInt):
        return sympy.sympify(x.node.expr)
    return sympy.Integer(int(x))


@dataclass
class SymbolicDims:
    """Maps the capture's shape symbols to named roles (`batch`, `seq`)."""

    roles: dict[sympy.Symbol, sympy.Symbol] = field(default_factory=dict)

    def expr(self, x) -> sympy.Expr:
        """`x` (int / SymInt) as a sympy expression in `batch` and `seq`."""
        e = to_expr(x)
        return e.xreplace(self.roles) if self.roles else e

    def shape(self, node: fx.Node) -> list[sympy.Expr] | None:
        val = tensor_meta(node)
        if val is None:
            return None
        return [self.expr(d) for d in val.shape]

    def role_of(self, x) -> str | None:
        e = self.expr(x)
        if e == BATCH:
            return "batch"
        if e == SEQ:
            return "seq"
        return None

    def mentions_seq(self, x) -> bool:
        """Whether size `x` (int / SymInt) depends on the sequence length."""
        return SEQ in self.expr(x).free_symbols

    @property
    def free_symbols(self) -> set[sympy.Symbol]:
        return set(self.roles.values())


def infer_dims(gm: fx.GraphModule, sites: list[AttentionSite]) -> SymbolicDims:
    """Name batch and sequence symbols from attention q shapes ([B, H, L, D]) or, failing that, inputs."""
    roles: dict[sympy.Symbol, sympy.Symbol] = {}

    def claim(x, role: sympy.Symbol) -> None:
        if isinstance(x, torch.SymInt):
            e = sympy.sympify(x.node.expr)
            if isinstance(e, sympy.Symbol) and e not in roles:
                roles[e] = role

    for site in sites:
        for n in (site.q, site.k):
            val = tensor_meta(n)
            if val is not None and val.dim() >= 3:
                if val.dim() >= 4:
                    claim(val.shape[0], BATCH)
                claim(val.shape[-2], SEQ)
    if not roles:
        for node in gm.graph.nodes:
            if node.op == "placeholder" and not node.meta.get("state_name"):
                val = tensor_meta(node)
                if val is not None and val.dim() >= 2:
                    claim(val.shape[0], BATCH)
                    claim(val.shape[1], SEQ)
                    break
    # other symbols equal to a named one (a mask's length, say) are tied by the shape env's replacements
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            val = tensor_meta(node)
            if val is None:
                continue
            for d in val.shape:
                if isinstance(d, torch.SymInt):
                    shape_env = d.node.shape_env
                    e = sympy.sympify(d.node.expr)
                    simplified = shape_env.replace(e) if shape_env is not None else e
                    if isinstance(e, sympy.Symbol) and e not in roles and simplified in roles:
                        roles[e] = roles[simplified]
            break
    return SymbolicDims(roles)
