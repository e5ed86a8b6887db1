"""Cost of a captured graph as sympy formulas in `batch` and `seq`: FLOPs, bytes moved, activation memory.

How each number is counted (read this before quoting one):

- **FLOPs**: matrix products (`aten.linear/addmm/mm/bmm/matmul/baddbmm`) count 2*M*N*K (bias adds
  are not counted). Attention (`aten.scaled_dot_product_attention`, `rewrite.attention`) counts
  2*B*H*Lq*Lk*(D + Dv), i.e. 4*B*H*Lq*Lk*D, halved when the site is causal (by `is_causal` or by a
  mask probed to be causal); its softmax is not counted. Element-wise ops count one FLOP per output
  element, reductions (sum, mean, softmax, norms, ...) one per input element; this is a lower bound
  for GELU, norms and softmax. Views, copies, casts, indexing and embeddings count zero.
- **bytes moved**: every op reads all its tensor inputs and writes its outputs, in their dtypes:
  the upper bound for an unfused program (a fused kernel moves less). Views (`view`, `transpose`,
  `expand`, ...) and no-op casts move nothing; `reshape` counts a copy only when it turns a
  non-contiguous input into a contiguous output (the `repeat_kv` pattern). Embedding lookups read
  the gathered rows, not the whole table. Fused attention reads q, k, v (and the mask) and writes
  its output: it never stores the Lq x Lk scores.
- **activation memory**: the tensors autograd would keep for the backward pass of a training
  step, approximated from op kinds rather than from autograd itself. A tensor counts when it is a
  non-parameter input of an op that saves its inputs (matrix products, `mul`/`div`, nonlinear
  element-wise ops, norms, softmax, attention) and that op's output needs a gradient (it depends
  on a floating-point parameter). Views are traced to the tensor they view and each tensor counts
  once; attention adds its output and a float32 log-sum-exp of B*H*Lq. Ops that save only shapes
  (`add`, `sum`, casts, views) add nothing. This is not peak inference memory.

Symbols other than `batch` and `seq` (say a mask's batch dim that export could not tie to the
ids') are mapped to `batch` or `seq` when their example value equals exactly one of theirs, and
otherwise replaced by their example value.

Later passes register the cost of their own ops with `register_cost(op)`; see `COSTS`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx

from rewrite.analysis import BATCH, SEQ, GraphAnalysis, analyze
from rewrite.analysis.nodes import value
from rewrite.ir_ops import SDPA, attention

aten = torch.ops.aten
Expr = sympy.Expr
ZERO = sympy.Integer(0)


@dataclass
class NodeCost:
    """What one node costs; `bytes=None` means the generic rule (inputs read + outputs written)."""

    flops: Expr = ZERO
    bytes: Expr | None = None


@dataclass
class Cost:
    """FLOPs, bytes moved and activation bytes, each a sympy expression in `batch` and `seq`."""

    flops: Expr = ZERO
    bytes: Expr = ZERO
    activations: Expr = ZERO

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes, self.activations + other.activations)

    def simplified(self) -> Cost:
        return Cost(sympy.expand(self.flops), sympy.expand(self.bytes), sympy.expand(self.activations))

    def evaluate(self, seq: int, batch: int = 1) -> dict[str, float]:
        """The three numbers at one batch size and sequence length."""
        subs = {SEQ: seq, BATCH: batch}
        return {k: float(getattr(self, k).subs(subs)) for k in ("flops", "bytes", "activations")}


@dataclass
class BlockCost:
    """The cost of one block (a decoder/encoder layer), or of the nodes outside every block."""

    path: str  # module path of the block; "" for the nodes outside blocks
    cls: str
    cost: Cost
    nodes: int

    @property
    def label(self) -> str:
        return self.path or "(outside blocks)"


@dataclass
class CostReport:
    """Per-block and total cost of one graph."""

    blocks: list[BlockCost]
    total: Cost
    node_costs: dict[str, Cost] = field(default_factory=dict)

    def evaluate(self, seq: int, batch: int = 1) -> dict[str, dict[str, float]]:
        """{block label or 'total': {flops, bytes, activations}} at one size."""
        out = {b.label: b.cost.evaluate(seq, batch) for b in self.blocks}
        out["total"] = self.total.evaluate(seq, batch)
        return out


CostFn = Callable[[fx.Node, "Shapes"], NodeCost]
COSTS: dict[Any, CostFn] = {}
"""Op (OpOverload or OpOverloadPacket) -> function(node, shapes) -> NodeCost. Passes add their ops here."""

SAVES_INPUTS: set[Any] = set()
"""Ops whose backward needs their inputs (activation memory counts them); passes may add theirs."""


def register_cost(*ops: Any, saves_inputs: bool = False) -> Callable[[CostFn], CostFn]:
    """Decorator: `fn(node, shapes) -> NodeCost` is the cost of every op in `ops`."""

    def wrap(fn: CostFn) -> CostFn:
        for op in ops:
            COSTS[op] = fn
            if saves_inputs:
                SAVES_INPUTS.add(op)
        return fn

    return wrap


class Shapes:
    """Sizes of node values as sympy expressions in `batch` and `seq`."""

    def __init__(self, analysis: GraphAnalysis, graph: fx.Graph):
        self.dims = analysis.dims
        self.extra = _tie_symbols(graph, analysis)

    def expr(self, x: Any) -> Expr:
        e = self.dims.expr(x)
        return e.xreplace(self.extra) if self.extra else e

    def numel(self, t: torch.Tensor) -> Expr:
        out = sympy.Integer(1)
        for d in t.shape:
            out *= self.expr(d)
        return out

    def nbytes(self, t: torch.Tensor) -> Expr:
        return self.numel(t) * t.element_size()


def _tie_symbols(graph: fx.Graph, analysis: GraphAnalysis) -> dict[sympy.Symbol, Expr]:
    """Map symbols other than batch/seq to batch/seq by example value, else to the value itself."""
    named = {v: k for k, v in analysis.dims.roles.items()}  # batch/seq -> capture symbol
    var_to_val: dict[sympy.Symbol, int] = {}
    for node in graph.nodes:
        for t in _tensors(value(node)):
            for d in t.shape:
                env = d.node.shape_env if isinstance(d, torch.SymInt) else None
                if env is not None:
                    table = getattr(env, "backed_var_to_val", None) or env.var_to_val
                    var_to_val = {k: int(v) for k, v in table.items()}
                    break
            if var_to_val:
                break
        if var_to_val:
            break
    hints = {role: var_to_val.get(sym) for role, sym in named.items()}
    out: dict[sympy.Symbol, Expr] = {}
    for sym, val in var_to_val.items():
        if sym in analysis.dims.roles:
            continue
        same = [role for role, hint in hints.items() if hint == val]
        out[sym] = same[0] if len(same) == 1 else sympy.Integer(val)
    return out


def _tensors(val: Any) -> list[torch.Tensor]:
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, list | tuple):
        return [t for v in val for t in _tensors(v)]
    return []


def _meta(x: Any) -> torch.Tensor | None:
    val = value(x) if isinstance(x, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


# --- op classes -------------------------------------------------------------------------------

VIEWS = {
    aten.view, aten._unsafe_view, aten.transpose, aten.t, aten.permute, aten.expand, aten.unsqueeze,
    aten.squeeze, aten.slice, aten.select, aten.split, aten.split_with_sizes, aten.chunk, aten.unbind,
    aten.alias, aten.detach, aten.unflatten, aten.flatten, aten.numpy_T, aten.view_as, aten.as_strided,
    aten.sym_size, aten._assert_tensor_metadata, aten.lift_fresh_copy, aten.expand_as,
}
MOVES = {
    aten.cat, aten.stack, aten.clone, aten.contiguous, aten.copy, aten.index, aten.index_select,
    aten.gather, aten.repeat, aten._to_copy, aten.constant_pad_nd, aten.pad, aten.masked_fill, aten.where,
    aten.roll, aten.tril, aten.triu, aten.scatter, aten.index_put, aten.new_ones, aten.new_zeros,
    aten.new_full, aten.new_empty, aten.ones, aten.zeros, aten.full, aten.empty, aten.arange,
    aten.ones_like, aten.zeros_like, aten.full_like, aten.empty_like, aten.scalar_tensor, aten.fill,
}
REDUCTIONS = {
    aten.sum, aten.mean, aten.amax, aten.amin, aten.max, aten.min, aten.var, aten.std, aten.var_mean,
    aten.norm, aten.linalg_vector_norm, aten.logsumexp, aten.argmax, aten.argmin, aten.cumsum, aten.prod,
    aten.softmax, aten._softmax, aten._safe_softmax, aten.log_softmax, aten._log_softmax, aten.layer_norm,
    aten.native_layer_norm, aten.rms_norm, aten.group_norm, aten.batch_norm,
}
MATMULS = {aten.linear, aten.addmm, aten.mm, aten.bmm, aten.matmul, aten.baddbmm}
SAVES_INPUTS |= MATMULS | {
    aten.mul, aten.div, aten.pow, aten.rsqrt, aten.sqrt, aten.exp, aten.log, aten.sin, aten.cos, aten.tanh,
    aten.sigmoid, aten.silu, aten.gelu, aten.relu, aten.softmax, aten._softmax, aten._safe_softmax,
    aten.log_softmax, aten.layer_norm, aten.native_layer_norm, aten.rms_norm, aten.group_norm,
    aten.embedding, SDPA.overloadpacket, attention.overloadpacket,
}


def _packet(node: fx.Node) -> Any:
    return getattr(node.target, "overloadpacket", node.target)


def _lookup(table: dict | set, node: fx.Node) -> Any:
    if node.target in table:
        return node.target if isinstance(table, set) else table[node.target]
    packet = _packet(node)
    if packet in table:
        return packet if isinstance(table, set) else table[packet]
    if not isinstance(table, set) and type(node.target) in table:  # callables registered by their class
        return table[type(node.target)]
    return None


# --- built-in costs ---------------------------------------------------------------------------


@register_cost(*MATMULS)
def _matmul_cost(node: fx.Node, shapes: Shapes) -> NodeCost:
    """2 * (output elements) * K, K the contracted dim of the left operand."""
    left = node.args[1] if _packet(node) in (aten.addmm, aten.baddbmm) else node.args[0]
    a, out = _meta(left), _meta(node)
    if a is None or out is None or a.dim() == 0:
        return NodeCost()
    return NodeCost(flops=2 * shapes.numel(out) * shapes.expr(a.shape[-1]))


def _attention_arg(node: fx.Node, index: int, name: str) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name)


def attention_is_causal(node: fx.Node) -> bool:
    """Causal by flag, or by a mask that capture probed to be causal."""
    if _attention_arg(node, 5, "is_causal"):
        return True
    mask = _attention_arg(node, 3, "attn_mask")
    return isinstance(mask, fx.Node) and bool(mask.meta.get("rewrite_mask_causal"))


@register_cost(SDPA.overloadpacket, attention.overloadpacket)
def _attention_cost(node: fx.Node, shapes: Shapes) -> NodeCost:
    """2*B*H*Lq*Lk*(D + Dv): scores and weighted sum; halved when causal."""
    q, k, v = (_meta(a) for a in node.args[:3])
    if q is None or k is None or v is None:
        return NodeCost()
    batch_heads = shapes.numel(q) / shapes.expr(q.shape[-1]) / shapes.expr(q.shape[-2])
    lq, lk = shapes.expr(q.shape[-2]), shapes.expr(k.shape[-2])
    flops = 2 * batch_heads * lq * lk * (shapes.expr(q.shape[-1]) + shapes.expr(v.shape[-1]))
    if attention_is_causal(node):
        flops = flops / 2
    return NodeCost(flops=flops)


@register_cost(aten.embedding)
def _embedding_cost(node: fx.Node, shapes: Shapes) -> NodeCost:
    """No FLOPs; reads the indices and the gathered rows, writes the rows."""
    out, idx = _meta(node), _meta(node.args[1])
    if out is None:
        return NodeCost()
    read_idx = shapes.nbytes(idx) if idx is not None else ZERO
    return NodeCost(bytes=2 * shapes.nbytes(out) + read_idx)


def _is_noop(node: fx.Node) -> bool:
    """Casts to the same dtype, inference dropout and reshapes that are views move nothing."""
    packet = _packet(node)
    src, out = _meta(node.args[0]) if node.args else None, _meta(node)
    if packet is aten.to:
        return src is not None and out is not None and src.dtype == out.dtype and src.device == out.device
    if packet is aten.dropout:
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        return not train
    if packet is aten.reshape:
        try:
            return not (src is not None and out is not None and not src.is_contiguous() and out.is_contiguous())
        except Exception:  # symbolic strides it cannot decide: call it a view
            return True
    return False


def node_cost(node: fx.Node, shapes: Shapes) -> NodeCost:
    """FLOPs and bytes of one node: registered cost functions first, then the generic rules."""
    if node.op != "call_function" or node.target is operator.getitem:
        return NodeCost(bytes=ZERO)
    outs = _tensors(value(node))
    if not outs:
        return NodeCost(bytes=ZERO)
    if _lookup(VIEWS, node) is not None or _is_noop(node):
        return NodeCost(bytes=ZERO)
    fn = _lookup(COSTS, node)
    if fn is not None:
        return fn(node, shapes)
    if _packet(node) in (aten.to, aten.dropout, aten.reshape) or _lookup(MOVES, node) is not None:
        return NodeCost()
    if _lookup(REDUCTIONS, node) is not None:
        first = _meta(node.args[0]) if node.args else None
        return NodeCost(flops=shapes.numel(first if first is not None else outs[0]))
    return NodeCost(flops=sum((shapes.numel(t) for t in outs), ZERO))


def _generic_bytes(node: fx.Node, shapes: Shapes) -> Expr:
    read = sum((shapes.nbytes(t) for a in node.all_input_nodes for t in _tensors(value(a))), ZERO)
    written = sum((shapes.nbytes(t) for t in _tensors(value(node))), ZERO)
    return read + written


# --- activation memory ------------------------------------------------------------------------


def _is_parameter(node: fx.Node, root: torch.nn.Module | None) -> bool:
    """A floating-point model parameter (get_attr, or a placeholder tagged with a state name)."""
    t = _meta(node)
    if t is None or not t.is_floating_point():
        return False
    if node.op == "placeholder":
        return bool(node.meta.get("state_name"))
    if node.op != "get_attr":
        return False
    if root is None:
        return True
    try:
        return isinstance(root.get_parameter(str(node.target)), torch.nn.Parameter)
    except AttributeError:
        return False


def _view_base(node: fx.Node) -> fx.Node:
    while node.op == "call_function" and node.args and isinstance(node.args[0], fx.Node):
        if _lookup(VIEWS, node) is None and not _is_noop(node) and node.target is not operator.getitem:
            break
        node = node.args[0]
    return node


def _saved_tensors(graph: fx.Graph, root: torch.nn.Module | None) -> dict[fx.Node, list[fx.Node]]:
    """{op node: the graph values it keeps for backward (view bases, parameters excluded)}."""
    needs_grad: set[fx.Node] = set()
    params: set[fx.Node] = set()
    saved: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:
        if _is_parameter(node, root):
            params.add(node)
            needs_grad.add(node)
            continue
        if node.op != "call_function":
            continue
        outs = _tensors(value(node))
        if any(a in needs_grad for a in node.all_input_nodes) and any(t.is_floating_point() for t in outs):
            needs_grad.add(node)
        if node not in needs_grad or _lookup(SAVES_INPUTS, node) is None:
            continue
        bases = []
        for a in node.all_input_nodes:
            base = _view_base(a)
            if base not in params and _tensors(value(base)):
                bases.append(base)
        if _lookup({SDPA.overloadpacket, attention.overloadpacket}, node) is not None:
            bases.append(node)
        saved[node] = bases
    return saved


def _lse_bytes(node: fx.Node, shapes: Shapes) -> Expr:
    q = _meta(node.args[0])
    if q is None:
        return ZERO
    return 4 * shapes.numel(q) / shapes.expr(q.shape[-1])


# --- the estimate -----------------------------------------------------------------------------


def estimate(
    gm: fx.GraphModule | fx.Graph,
    analysis: GraphAnalysis | None = None,
    *,
    root: torch.nn.Module | None = None,
) -> CostReport:
    """Per-block and total cost of `gm` (a GraphModule, or a Graph whose state lives in `root`)."""
    if isinstance(gm, fx.GraphModule):
        graph, root = gm.graph, root if root is not None else gm
    else:
        graph = gm
    if analysis is None:
        analysis = analyze(GraphHolder(graph))
    shapes = Shapes(analysis, graph)
    saved = _saved_tensors(graph, root)
    counted: set[fx.Node] = set()
    node_costs: dict[str, Cost] = {}
    for node in graph.nodes:
        nc = node_cost(node, shapes)
        moved = nc.bytes if nc.bytes is not None else _generic_bytes(node, shapes)
        act = ZERO
        for base in saved.get(node, []):
            if base not in counted:
                counted.add(base)
                act += sum((shapes.nbytes(t) for t in _tensors(value(base))), ZERO)
        if _lookup({SDPA.overloadpacket, attention.overloadpacket}, node) is not None and node in saved:
            act += _lse_bytes(node, shapes)
        node_costs[node.name] = Cost(nc.flops, moved, act)
    blocks = _block_costs(graph, analysis, node_costs)
    total = sum((b.cost for b in blocks), Cost()).simplified()
    return CostReport(blocks=blocks, total=total, node_costs=node_costs)


def _block_costs(graph: fx.Graph, analysis: GraphAnalysis, node_costs: dict[str, Cost]) -> list[BlockCost]:
    owner: dict[str, int] = {}
    for i, block in enumerate(analysis.blocks):
        for n in block.nodes:
            owner.setdefault(n.name, i)
    sums = [Cost() for _ in analysis.blocks]
    counts = [0 for _ in analysis.blocks]
    rest, rest_count = Cost(), 0
    for node in graph.nodes:
        c = node_costs[node.name]
        i = owner.get(node.name)
        if i is None:
            rest, rest_count = rest + c, rest_count + 1
        else:
            sums[i], counts[i] = sums[i] + c, counts[i] + 1
    out = [
        BlockCost(b.path, b.cls, s.simplified(), n) for b, s, n in zip(analysis.blocks, sums, counts)
    ]
    rest = rest.simplified()
    if rest_count and any(x != 0 for x in (rest.flops, rest.bytes, rest.activations)):
        out.append(BlockCost("", "", rest, rest_count))
    return out


class GraphHolder:
    """The `.graph` attribute the analysis reads, for a bare fx.Graph."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph


def summed(costs: Iterable[Cost]) -> Cost:
    """The sum of several costs, simplified."""
    return sum(costs, Cost()).simplified()


__all__ = [
    "COSTS",
    "SAVES_INPUTS",
    "BlockCost",
    "Cost",
    "CostReport",
    "GraphHolder",
    "NodeCost",
    "Shapes",
    "attention_is_causal",
    "estimate",
    "node_cost",
    "register_cost",
    "summed",
]
