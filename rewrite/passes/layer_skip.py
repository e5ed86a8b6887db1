"""Pass `layer_skip`: a router per selected block decides, per sequence, whether the block runs.

Each selected block (a decoder / encoder layer found by the block analysis) is lifted out of the
graph into a body that reads its hidden state and every other value it used (masks, position
embeddings, sizes, parameters). In its place the graph calls:

- `layer_skip_route` with the block's input and two new parameters `<block>.router.weight` [D] and
  `<block>.router.bias` [1]: the fused `rewrite::route` op pools the input over the sequence, scores
  it and lists the rows that run. The per-call knobs (threshold, budget, a decision mask held from
  prefill) live in `rewrite.routing.controls`.
- a `RoutedBlock` that gathers the running rows (and the rows of every input with a batch dim),
  runs the body on them and scatters the result back; skipped rows pass their input through; when
  no row runs the body is not called, when all rows run it is called on the inputs as they are.

Sizes the block read from outside are re-derived for the smaller batch: a size equal to the batch
(or a multiple of it) is rescaled, any other size is kept. A block whose inputs or outputs do not fit
this scheme (more than one value leaving the block, a tensor whose batch is folded into another dim,
an in-place write to a value from outside) is refused with an error naming the layer.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx as fx

from rewrite.analysis import BATCH, SEQ, Block, SymbolicDims
from rewrite.analysis.graph_utils import returns_new_tensor
from rewrite.analysis.nodes import is_op, module_path, tensor_meta
from rewrite.cost_model import NodeCost, Shapes, estimate, register_cost
from rewrite.errors import PassError, PlanError
from rewrite.passes import register_pass
from rewrite.passes.base import CACHE_CALL, GraphPass, PassContext, PassResult
from rewrite.routing.runtime import InputRule, RoutedBlock, layer_skip_route
from rewrite.selectors import Selector, describe_selector_syntax, select_layers_for, validate_selector

ROUTER = "router"
"""Name of the module holding a block's router parameters (`<block path>.router.weight`)."""


@dataclass
class LayerSkipOptions:
    """Options of the `layer_skip` pass."""

    layers: Selector = field(
        default="all",
        metadata={"help": f"blocks that get a router ({describe_selector_syntax()}); the rest always run"},
    )
    threshold: float = field(
        default=0.5,
        metadata={"help": "skip a block for a sequence when its router's probability exceeds this (1.0: never skip)"},
    )
    budget: float | None = field(
        default=None,
        metadata={"help": "if set, skip exactly round(budget * routed blocks) blocks per sequence (0..1)"},
    )
    init_bias: float = field(
        default=-2.0,
        metadata={"help": "initial router bias (weights start at 0): sigmoid(-2) = 0.12, so nothing skips at 0.5"},
    )

    def validate(self, where: str = "layer_skip") -> None:
        """Raise PlanError naming the first bad field."""
        validate_selector(self.layers, f"{where}.layers")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int | float):
            raise PlanError(f"{where}.threshold", f"must be a number, got {self.threshold!r}")
        if self.budget is not None and (
            isinstance(self.budget, bool) or not isinstance(self.budget, int | float) or not 0 <= self.budget <= 1
        ):
            raise PlanError(f"{where}.budget", f"must be a fraction in [0, 1] or null, got {self.budget!r}")
        if isinstance(self.init_bias, bool) or not isinstance(self.init_bias, int | float):
            raise PlanError(f"{where}.init_bias", f"must be a number, got {self.init_bias!r}")


@dataclass
class _Region:
    """A block as a region of the graph: its nodes, the value leaving it and the values entering it."""

    block: Block
    nodes: list[fx.Node]
    output: fx.Node
    hidden: fx.Node
    others: list[fx.Node]
    rules: list[InputRule]
    batch_dim: int
    seq_dim: int
    gatherable: bool

    @property
    def layer(self) -> str:
        return f"layer {self.block.index} ({self.block.path})"


def _fail(block: Block, message: str, node: fx.Node | None = None) -> PassError:
    return PassError("layer_skip", f"layer {block.index} ({block.path}): {message}", node.name if node else None, block.path)


def _shape(dims: SymbolicDims, node: fx.Node) -> list[sympy.Expr] | None:
    val = tensor_meta(node)
    return None if val is None else [dims.expr(d) for d in val.shape]


def _written_bases(node: fx.Node, inside: set[fx.Node]) -> list[fx.Node]:
    """The values an in-place op writes into, each followed back through views (a view writes through to its
    base) to the first value outside the block or the first value that is not a view; [] for other ops."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return []
    written = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = node.args[i] if i < len(node.args) and not arg.kwarg_only else node.kwargs.get(arg.name)
        while isinstance(value, fx.Node) and value in inside and not returns_new_tensor(value) and value.args:
            value = value.args[0]  # a view (or a getitem of a tuple): the tensor it aliases
        if isinstance(value, fx.Node):
            written.append(value)
    return written


def _hidden_dims(block: Block, dims: SymbolicDims, hidden: fx.Node) -> tuple[int, int, bool]:
    """(batch dim, sequence dim, whether the batch is symbolic) of the block's hidden state."""
    shape = _shape(dims, hidden)
    assert shape is not None
    if len(shape) != 3:
        raise _fail(block, f"the block's hidden state has {len(shape)} dims {shape}; routing needs [batch, seq, dim]", hidden)
    batch = [i for i, e in enumerate(shape[:2]) if e == BATCH]
    seq = [i for i, e in enumerate(shape[:2]) if e == SEQ]
    batch_dim = batch[0] if batch else (1 - seq[0] if seq else 0)
    seq_dim = 1 - batch_dim
    return batch_dim, seq_dim, bool(batch)


def _input_rule(block: Block, dims: SymbolicDims, node: fx.Node, gatherable: bool) -> InputRule:
    if node.op == "get_attr":
        return InputRule("keep")
    val = node.meta.get("val")
    if isinstance(val, torch.SymInt | int) and not isinstance(val, bool):
        expr = dims.expr(val)
        if BATCH not in expr.free_symbols or not gatherable:
            return InputRule("keep")
        if BATCH not in sympy.simplify(expr / BATCH).free_symbols:
            return InputRule("scale")
        raise _fail(block, f"the block reads the size {expr}, which depends on the batch in a way it cannot rescale", node)
    if isinstance(val, torch.Tensor):
        shape = [dims.expr(d) for d in val.shape]
        if not gatherable:
            return InputRule("keep")
        for i, e in enumerate(shape):
            if e == BATCH:
                return InputRule("gather", i)
        if any(BATCH in e.free_symbols for e in shape):
            raise _fail(
                block,
                f"the block reads {node.name} of shape {shape}, whose batch is folded into another dim; "
                "rows of it cannot be gathered per sequence",
                node,
            )
        return InputRule("keep")
    raise _fail(block, f"the block reads {node.name}, a {type(val).__name__} value; only tensors and sizes are supported", node)


def _movable(block: Block) -> list[fx.Node]:
    """The block's nodes that move into its body: all but sizes computed only from outside values.

    Such sizes (`batch * heads`) may be shared with later blocks, so they stay in the outer graph and
    the body reads them.
    """
    nodes = [n for n in block.nodes if n.op not in ("placeholder", "get_attr", "output")]
    inside = set(nodes)
    outer_sizes: set[fx.Node] = set()
    for n in nodes:
        val = n.meta.get("val")
        is_size = isinstance(val, torch.SymInt | int) and not isinstance(val, bool)
        if is_size and all(a not in inside or a in outer_sizes for a in n.all_input_nodes):
            if all(not isinstance(tensor_meta(a), torch.Tensor) or a not in inside for a in n.all_input_nodes):
                outer_sizes.add(n)
    return [n for n in nodes if n not in outer_sizes]


def _residual_glue(nodes: list[fx.Node], in_any_block: set[fx.Node]) -> list[fx.Node]:
    """Residual adds the parent module makes around a block it only indexes (`x = x + block["mlp"](x)`).

    An `add` outside every block joins the region when one operand comes from the block and the
    other is a value the block reads, or another such add.
    """
    block_nodes = set(nodes)
    inside = set(nodes)
    reads = {a for n in nodes for a in n.all_input_nodes if a not in inside}
    glue: list[fx.Node] = []
    frontier = list(nodes)
    while frontier:
        found = []
        for node in frontier:
            for user in node.users:
                if user in inside or user in in_any_block or not is_op(user, torch.ops.aten.add.Tensor):
                    continue
                operands = [a for a in user.args[:2] if isinstance(a, fx.Node)]
                if (
                    len(operands) == 2
                    and any(a in block_nodes for a in operands)
                    and all(a in inside or a in reads for a in operands)
                ):
                    inside.add(user)
                    glue.append(user)
                    found.append(user)
                    reads.update(a for a in user.all_input_nodes if a not in inside)
        frontier = found
    return glue


_RESIDUAL_PATH = (torch.ops.aten.add.Tensor, torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default,
                  torch.ops.aten.to.dtype_layout, torch.ops.aten.clone.default, torch.ops.aten.alias.default,
                  torch.ops.aten.dropout.default, torch.ops.aten.contiguous.default, torch.ops.aten.layer_norm.default,
                  torch.ops.aten.native_layer_norm.default, torch.ops.aten.rms_norm.default, operator.getitem)
"""Ops a residual stream passes through (sums, casts, copies, dropout, and the norms of post-norm blocks)."""


def _residual_sources(output: fx.Node, inside: set[fx.Node]) -> set[fx.Node]:
    """Values from outside the block that reach `output` through residual ops only (sums, casts, copies, norms):
    the block's hidden state, not the tensors it multiplies or projects on the way."""
    found: set[fx.Node] = set()
    stack, seen = [output], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node not in inside:
            found.add(node)
        elif is_op(node, *_RESIDUAL_PATH):
            stack.extend(node.all_input_nodes)
    return found


def _leaving(node: fx.Node, inside: set[fx.Node]) -> str:
    """`node`'s name and where its first reader outside the block is (a module path, or the model's code)."""
    reader = next(u for u in node.users if u not in inside)
    where = module_path(reader) if reader.op != "output" else ""
    return f"{node.name}, read by {where or 'the model outside its layers'}" + (" (output)" if reader.op == "output" else "")


def _region(block: Block, dims: SymbolicDims, order: dict[fx.Node, int], in_any_block: set[fx.Node]) -> _Region:
    """The block's region with every check made; raises PassError naming the layer when it does not fit."""
    if not block.path.rsplit(".", 1)[-1].isdigit():
        raise _fail(
            block,
            "the model has no numbered layers (a ModuleList of blocks such as model.layers.3); layer_skip routes "
            "repeated layers whose input passes through when skipped",
        )
    nodes = _movable(block)
    nodes = sorted([*nodes, *_residual_glue(nodes, in_any_block)], key=order.__getitem__)
    inside = set(nodes)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    if len(outputs) != 1:
        names = [_leaving(n, inside) for n in outputs] or ["nothing"]
        cache = any(site.key_concat in outputs for site in block.sites)
        raise _fail(
            block,
            f"{len(outputs)} values leave the block ({'; '.join(names)}); routing needs exactly one (its hidden "
            "state). Blocks that also return attention weights or caches, or make a value later blocks read (such "
            "as a position bias computed once in the first block), are not supported"
            + (f" ({CACHE_CALL}: call the model with use_cache=False)" if cache else ""),
            outputs[0] if outputs else None,
        )
    output = outputs[0]
    external: list[fx.Node] = []
    for n in nodes:
        outside = [a for a in _written_bases(n, inside) if a not in inside]
        if outside:
            raise _fail(block, f"{n.name} writes in place into a value from outside the block ({outside[0].name})", n)
        for a in n.all_input_nodes:
            if a not in inside and a not in external:
                external.append(a)
    out_shape = _shape(dims, output)
    out_val = tensor_meta(output)
    if out_shape is None or out_val is None:
        raise _fail(block, f"the value leaving the block ({output.name}) is not a tensor", output)
    candidates = [
        a
        for a in external
        if a.op != "get_attr" and _shape(dims, a) == out_shape and tensor_meta(a).dtype == out_val.dtype  # type: ignore[union-attr]
    ]
    if len(candidates) > 1:  # e.g. rotary cos / sin as wide as the hidden state (one head): keep the residual's
        on_residual = _residual_sources(output, inside)
        candidates = [a for a in candidates if a in on_residual] or candidates
    if len(candidates) != 1:
        names = ", ".join(a.name for a in candidates) or "none"
        raise _fail(
            block,
            f"cannot tell the block's hidden state: inputs of the output's shape {out_shape} are {names}; "
            "exactly one is needed (skipping passes it through)",
            output,
        )
    hidden = candidates[0]
    late = [a for a in external if order[a] > order[output]]
    if late:
        raise _fail(block, f"{late[0].name} is computed outside the block after the block's output", late[0])
    batch_dim, seq_dim, gatherable = _hidden_dims(block, dims, hidden)
    others = [a for a in external if a is not hidden]
    rules = [_input_rule(block, dims, a, gatherable) for a in others]
    return _Region(block, nodes, output, hidden, others, rules, batch_dim, seq_dim, gatherable)


def _body(region: _Region) -> fx.GraphModule:
    """The block as a stateless GraphModule of (hidden, *others)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in (region.hidden, *region.others):
        placeholder = graph.placeholder(node.name)
        placeholder.meta = dict(node.meta)
        env[node] = placeholder
    for node in region.nodes:
        env[node] = graph.node_copy(node, lambda a: env[a])
    graph.output(env[region.output])
    graph.eliminate_dead_code()
    return fx.GraphModule(torch.nn.Module(), graph, class_name="Block" + str(region.block.index))


def _rewrite(gm: fx.GraphModule, ctx: PassContext, region: _Region, column: int, n_routed: int, options: LayerSkipOptions) -> list[str]:
    """Put the router and the routed block in place of the block's nodes; returns the new parameters."""
    hidden_val = tensor_meta(region.hidden)
    assert hidden_val is not None
    dim = int(hidden_val.shape[-1])
    owner = f"{region.block.path}.{ROUTER}" if region.block.path else ROUTER
    make = {"dtype": hidden_val.dtype, "device": hidden_val.device}
    added = [
        ctx.add_parameter(owner, "weight", torch.zeros(dim, **make)),
        ctx.add_parameter(owner, "bias", torch.full((1,), float(options.init_bias), **make)),
    ]
    block = RoutedBlock(
        _body(region), region.rules, layer=region.block.path, batch_dim=region.batch_dim, gatherable=region.gatherable
    )
    graph = gm.graph
    with graph.inserting_before(region.output):
        weight, bias = (graph.get_attr(name) for name in added)
        kwargs = {
            "column": column,
            "n_routed": n_routed,
            "layer": region.block.path,
            "batch_dim": region.batch_dim,
            "seq_dim": region.seq_dim,
            "threshold": float(options.threshold),
            "budget": None if options.budget is None else float(options.budget),
        }
        route = graph.call_function(layer_skip_route, (region.hidden, weight, bias), kwargs)
        batch = hidden_val.shape[region.batch_dim]
        route.meta["val"] = (
            hidden_val.new_empty((batch,), dtype=torch.float32),
            hidden_val.new_empty((batch,), dtype=torch.int64),
            hidden_val.new_empty((), dtype=torch.int64),
        )
        parts = [graph.call_function(operator.getitem, (route, i)) for i in range(3)]
        for i, part in enumerate(parts):
            part.meta["val"] = route.meta["val"][i]
        new = graph.call_function(block, (*parts, region.hidden, *region.others))
    new.meta = dict(region.output.meta)
    new.meta["rewrite_layer_skip"] = region.block.path
    region.output.replace_all_uses_with(new)
    for node in reversed(region.nodes):
        if not node.users:
            graph.erase_node(node)
    leftover = [n.name for n in region.nodes if n.graph is graph and n in set(graph.nodes)]
    if leftover:
        raise _fail(region.block, f"nodes {leftover[:3]} of the block are still used outside it")
    return added


@register_cost(RoutedBlock)
def _routed_block_cost(node: fx.Node, shapes: Shapes) -> NodeCost:
    """The body's cost with every row running (the upper bound; a skip rate x saves x of it)."""
    body = estimate(node.target.body).total  # type: ignore[union-attr]
    return NodeCost(flops=body.flops.xreplace(shapes.extra), bytes=body.bytes.xreplace(shapes.extra))


@register_cost(layer_skip_route)
def _route_cost(node: fx.Node, shapes: Shapes) -> NodeCost:
    """Pooling reads the block input once: one multiply-add per element."""
    hidden = tensor_meta(node.args[0])  # type: ignore[arg-type]
    if hidden is None:
        return NodeCost()
    return NodeCost(flops=2 * shapes.numel(hidden), bytes=shapes.nbytes(hidden))


@register_pass
class LayerSkip(GraphPass):
    """Insert per-sequence routers that skip whole blocks (see the module docstring)."""

    name = "layer_skip"
    summary = "per-sequence routers that skip whole blocks; skipped rows are not computed"
    Options = LayerSkipOptions

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        options: LayerSkipOptions = self.options
        options.validate(self.where(ctx))
        result = PassResult(self.name)
        analysis = ctx.analysis()
        paths = [b.path for b in analysis.blocks]
        selected = [analysis.blocks[i] for i in select_layers_for(options.layers, paths, f"{self.where(ctx)}.layers")]
        selected.sort(key=lambda b: b.index)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        in_any_block = {n for b in analysis.blocks for n in b.nodes}
        regions = [_region(b, analysis.dims, order, in_any_block) for b in selected]  # all checked first
        result.matched = len(regions)
        for region in regions:
            if not region.gatherable:
                result.messages.append(
                    f"{region.layer}: the batch size is fixed in this capture, so a partly skipped batch runs "
                    "the block on every row and keeps the skipped rows' input (no saving)"
                )
        for column, block in enumerate(selected):
            order = {n: i for i, n in enumerate(gm.graph.nodes)}
            fresh = _region(block, analysis.dims, order, in_any_block)
            result.added_parameters.extend(_rewrite(gm, ctx, fresh, column, len(selected), options))
            result.changed.append(f"{fresh.layer}: routed (column {column})")
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        ctx.invalidate()
        return result
