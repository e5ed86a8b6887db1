"""The walk of the varlen pass over an unpadded graph: classify every node, rewrite sizes, positions and exits.

Every node gets a kind: `token` (a packed per-token tensor), `positional` (built from the sequence length
alone, now per packed token), `free` (no batch or sequence dim), `padded` (the padded inputs, and what
reads repadded values), `sym` (a size) or `unproven` (built from the sequence length in a way no rule
covers). A node with token inputs must pass `tokenwise.check`; one that does not, and feeds attention,
is an error; one that does not and feeds no attention reads the repadded tensor (an exit).
"""

from __future__ import annotations

from collections.abc import Callable

import sympy
import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from rewrite.analysis.graph_utils import ancestors as graph_ancestors
from rewrite.analysis.graph_utils import attribute_tensor
from rewrite.analysis.nodes import is_op, module_path, tensor_meta
from rewrite.analysis.shapes import to_expr
from rewrite.errors import PassError
from rewrite.varlen import runtime
from rewrite.varlen.causal_conv import causal_conv_over_tokens
from rewrite.varlen.module_probe import TokenwiseModules
from rewrite.varlen.symbols import SizeBuilder, TokenDims, TokenSymbols
from rewrite.varlen.tokenwise import SEQ_OUTER, check

aten = torch.ops.aten
PASS = "varlen"
FACTORIES = (
    aten.full.default, aten.zeros.default, aten.ones.default, aten.empty.memory_format, aten.new_zeros.default,
    aten.new_ones.default, aten.new_full.default, aten.new_empty.default,
)
ARANGES = (aten.arange.default, aten.arange.start, aten.arange.start_step)
ZERO_KEEPING = (aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.type_as.default,
                aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default)


SUPPORTED_OPS = (
    "Supported before attention: ops that keep each token apart (element-wise ops, linear maps, norms, reductions, "
    "splits and repeats over other dims, views and transposes that keep batch and sequence), position tables and "
    "aranges over the sequence, cumsums of values that are 0 at padding, and modules shown token-wise by running "
    "them; leave `varlen` out of the plan for a model with other token-mixing ops")


def fail(message: str, node: fx.Node | None = None) -> PassError:
    """A PassError of the varlen pass naming `node` and its module path."""
    if node is None:
        return PassError(PASS, message)
    return PassError(PASS, message, node.name, module_path(node) or "<root>")


def is_sym(node) -> bool:
    """Whether `node` computes a size (a SymInt / SymBool)."""
    return isinstance(node, fx.Node) and isinstance(node.meta.get("val"), torch.SymInt | torch.SymBool)


class PackedGraphWalk:
    """The walk that classifies every node after unpadding and rewrites sizes, positions and exits."""

    def __init__(self, gm: fx.GraphModule, symbols: TokenSymbols, layout: dict[str, fx.Node],
                 padded_sizes: tuple[fx.Node, fx.Node] | None, other_sizes: dict[sympy.Symbol, fx.Node],
                 source: torch.nn.Module | None = None, layer_of: Callable[[fx.Node], str] | None = None):
        self.gm, self.graph, self.symbols, self.layout = gm, gm.graph, symbols, layout
        self.layer_of = layer_of  # how an error names the layer holding a node (`layer 0 (model.layers.0)`)
        self.modules = TokenwiseModules(gm.graph, symbols, source)
        self.kind: dict[fx.Node, str] = {}
        total = layout["total"]
        packed = {**other_sizes, **{s: 1 for s in symbols.batch}, **{s: total for s in symbols.seq}}
        padded = {**other_sizes, **{s: padded_sizes[0] for s in symbols.batch},
                  **{s: padded_sizes[1] for s in symbols.seq}} if padded_sizes is not None else packed
        self.packed = SizeBuilder(self.graph, packed, "packed sizes")
        self.padded = SizeBuilder(self.graph, padded, "padded sizes")
        self.padded_sizes = padded_sizes
        self.repad = padded_sizes is not None  # False for already-packed inputs: nothing to pad back
        self.repadded: dict[fx.Node, fx.Node] = {}
        self.zero_at_pads: set[fx.Node] = set()  # values known to be 0 at every padded token
        self.exits: list[str] = []
        self.positions_rewritten: list[str] = []
        self.convs_per_sequence: list[str] = []  # causal convs over the tokens now restarted at each sequence
        self.restarts_positions = False  # an arange / position table now counts from each row's first real token
        self.padded_inputs: dict[fx.Node, fx.Node] = {}  # packed token input -> the padded placeholder it packs
        self.checked_at_runtime: list[str] = []
        self.cumsum_problems: dict[fx.Node, str] = {}  # cumsums over the tokens that could not restart, and why
        self.token_modules: list[str] = []  # modules shown token-wise by running them, whose nodes run packed
        self.size_built: dict[fx.Node, tuple] = {}  # padded-side nodes built from sizes alone: their original args
        self.module_reasons: list[str] = []  # why the modules enclosing the last unproven node were not

    def kind_of(self, node: fx.Node) -> str:
        return self.kind.get(node, "free")

    # sizes ---------------------------------------------------------------------------------------
    def _sizes(self, node: fx.Node, builder: SizeBuilder, keep_placeholder_sizes: bool) -> None:
        if not self.repad:
            return  # packed input: sizes already count packed tokens

        def swap(arg):
            if not is_sym(arg):
                return arg
            if keep_placeholder_sizes and is_op(arg, aten.sym_size.int) and arg.args[0].op == "placeholder":
                return arg
            try:
                return builder.build(to_expr(arg.meta["val"]))
            except KeyError as exc:
                raise fail(f"cannot rewrite size argument {arg.name!r}: {exc.args[0]}", node) from None

        node.args = fx.node.map_arg(node.args, swap)
        node.kwargs = fx.node.map_arg(node.kwargs, swap)

    # positions -----------------------------------------------------------------------------------
    def _span(self, start, end) -> int | None:
        """`start` as an int when end - start is the sequence length, else None."""
        s = to_expr(start.meta["val"]) if is_sym(start) else to_expr(start if start is not None else 0)
        e = to_expr(end.meta["val"]) if is_sym(end) else to_expr(end)
        if s.free_symbols or (e - s).free_symbols - self.symbols.seq or (e - s) not in self.symbols.seq:
            return None
        return int(s)

    def _position_source(self, node: fx.Node) -> bool:
        """Rewrite arange over the sequence / a table sliced to the sequence as per-token positions."""
        val = tensor_meta(node)
        if is_op(node, *ARANGES):
            args = list(node.args)
            if is_op(node, aten.arange.default):
                start, end, step = 0, args[0], 1
            else:
                start, end = args[0], args[1]
                step = args[2] if len(args) > 2 else node.kwargs.get("step", 1)
            begin = self._span(start, end) if step == 1 else None
            if begin is None:
                return False
            with self.graph.inserting_before(node):
                new = self.graph.call_function(
                    runtime.shifted_positions, (self.layout["positions"], begin, val.dtype))
            self.restarts_positions = True
        elif is_op(node, aten.slice.Tensor) and self.kind_of(node.args[0]) == "free":
            dim = node.args[1] if len(node.args) > 1 else 0
            start = node.args[2] if len(node.args) > 2 else 0
            end = node.args[3] if len(node.args) > 3 else None
            step = node.args[4] if len(node.args) > 4 else 1
            begin = self._span(start, end) if end is not None and step == 1 else None
            if begin is None:
                return False
            with self.graph.inserting_before(node):
                index = self.graph.call_function(
                    runtime.shifted_positions, (self.layout["positions"], begin, torch.int64))
                new = self.graph.call_function(aten.index_select.default, (node.args[0], dim, index))
            self.restarts_positions |= not self._constant_along(node.args[0], dim)
        else:
            return False
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        self.kind[new] = "positional"
        self.positions_rewritten.append(f"{node.name} ({module_path(new) or '<root>'})")
        return True

    def _constant_along(self, table: fx.Node, dim: int) -> bool:
        """Whether a model constant holds the same values at every index of `dim` (a buffer of zeros, say), so
        reading it at restarted positions changes nothing; False when unknown."""
        value = attribute_tensor(self.gm, table)
        if value is None or value.dim() == 0 or value.shape[dim] == 0:
            return False
        return bool((value == value.narrow(dim, 0, 1)).all())

    # exits ---------------------------------------------------------------------------------------
    def _repad(self, value: fx.Node, user: fx.Node) -> fx.Node:
        if value in self.repadded:
            return self.repadded[value]
        dims = self.symbols.node_dims(value)
        if (self.kind_of(value) != "token" or not isinstance(dims, TokenDims) or dims.factored
                or (dims.batch is None and not dims.merged)):
            raise fail(f"{value.name!r} leaves the packed region but is not a [batch, seq]-shaped per-token tensor, "
                        "so it cannot be repadded", user)
        args = (value, self.layout["indices"], *self.padded_sizes, dims.batch, dims.seq)
        with self.graph.inserting_after(value):
            new = self.graph.call_function(
                runtime.repad_tokens, args, {"seq_outer": True} if dims.merged and value.meta.get(SEQ_OUTER) else {})
        new.meta = dict(value.meta)
        self.kind[new] = "padded"
        self.repadded[value] = new
        return new

    def _exit(self, node: fx.Node) -> None:
        self.exits.append(f"{node.name} ({module_path(node) or '<root>'})")
        self.kind[node] = "padded"
        if not self.repad:  # packed input: the op reads the packed row, as the original model does
            return

        def swap(arg):
            if isinstance(arg, fx.Node) and self.kind_of(arg) in ("token", "positional"):
                return self._repad(arg, node)
            return arg

        node.args = fx.node.map_arg(node.args, swap)
        node.kwargs = fx.node.map_arg(node.kwargs, swap)
        self._sizes(node, self.padded, keep_placeholder_sizes=True)

    # the walk ------------------------------------------------------------------------------------
    def run(self, mixing: set[fx.Node]) -> None:
        feeds_mixing = ancestors(mixing)
        for node in list(self.graph.nodes):
            if node in self.kind or node.op in ("placeholder", "get_attr"):
                continue
            if node.op == "output":
                self._output(node)
                continue
            if is_sym(node) or node.op != "call_function":
                self.kind.setdefault(node, "sym" if is_sym(node) else "free")
                continue
            kinds = {self.kind_of(a) for a in node.all_input_nodes} - {"sym"}
            if node in mixing:
                self._attention(node)
            elif self.modules.owner(node) is not None:
                self._inside_module(node)
            elif self._restart_cumsum(node) or self._causal_conv_per_sequence(node):
                pass
            elif kinds & {"token", "positional"}:
                reason = check(node, self.symbols, self.kind_of)
                if reason is None:
                    self._sizes(node, self.packed, keep_placeholder_sizes=False)
                    self.kind[node] = "token" if "token" in kinds else "positional"
                    self._track_zero_at_pads(node)
                elif self._tokenwise_module(node):
                    pass
                elif node in feeds_mixing and node in self.cumsum_problems:
                    raise fail(
                        "a cumsum over the tokens (positions counted per row, say) restarts per sequence only when "
                        "what it sums is 0 at padding. The pass proves that for values multiplied by the padding mask "
                        "(OPT's cumsum(attention_mask)) and checks it at run time for element-wise functions of the "
                        f"token inputs (RoBERTa's input_ids != pad_token_id); here {self.cumsum_problems[node]}. It "
                        "feeds attention, so it cannot run on repadded values either. Pass the values as an input "
                        "instead (e.g. position_ids), which the pass packs", node)
                elif node in feeds_mixing:
                    modules = "; ".join(self.module_reasons)
                    layer = self.layer_of(node) if self.layer_of is not None else module_path(node) or "<root>"
                    raise fail(f"{layer}: cannot prove this op token-wise on packed tokens: {reason}; it feeds "
                                "attention, so it cannot run on repadded values either. No enclosing module was shown "
                                f"token-wise by running it ({modules or 'none'}). {SUPPORTED_OPS}", node)
                else:
                    self._exit(node)
            else:
                self._classify_source(node, kinds)

    def _tokenwise_module(self, node: fx.Node) -> bool:
        """Accept `node` as part of an enclosing module shown token-wise by running it (`module_probe`): the
        module's nodes seen so far must be per-token or constant; those built from sizes alone become packed."""
        path, self.module_reasons = self.modules.find(node, self.kind_of)
        if path is None:
            return False
        earlier = [n for n in self.modules.members(path) if n in self.kind]
        for n in earlier:
            if self.kind[n] == "padded" and n in self.size_built:  # back to its sizes, now the packed ones
                n.args, n.kwargs = self.size_built.pop(n)
            elif self.kind[n] == "padded":
                raise fail(f"module {path} was shown token-wise, but its node {n.name!r} was already placed on "
                           "the padded side (it reads repadded values or a padded input)", n)
            if self.kind[n] in ("unproven", "padded"):
                self._sizes(n, self.packed, keep_placeholder_sizes=False)
                self.kind[n] = "token"
        self.token_modules.append(path)
        self._inside_module(node)
        return True

    def _inside_module(self, node: fx.Node) -> None:
        """A node of a module shown token-wise: it runs on the packed tokens as the module ran on one packed row."""
        if any(self.kind_of(a) == "padded" for a in node.all_input_nodes):
            raise fail(f"this node of the token-wise module {self.modules.owner(node)} reads a repadded value", node)
        self._sizes(node, self.packed, keep_placeholder_sizes=False)
        kinds = {self.kind_of(a) for a in node.all_input_nodes}
        shapes = [v for v in pytree.tree_leaves(node.meta.get("val")) if isinstance(v, torch.Tensor)]
        seq_shaped = any(self.symbols.mentions_tokens(d) for t in shapes for d in t.shape)
        self.kind[node] = "token" if kinds & {"token", "positional", "unproven"} or seq_shaped else "free"

    def _restart_cumsum(self, node: fx.Node) -> bool:
        """cumsum over the tokens of a value that is 0 at every padded token -> the same cumsum per sequence.

        On the padded row such a cumsum adds only zeros at padding, so at each real token it equals the
        sum over the earlier real tokens of its own row (how OPT counts positions from the mask).
        """
        if not is_op(node, aten.cumsum.default) or self.kind_of(node.args[0]) != "token":
            return False
        x = node.args[0]
        dims = self.symbols.node_dims(x)
        if not isinstance(dims, TokenDims) or dims.merged:
            return False
        if node.args[1] % tensor_meta(x).dim() != dims.seq:
            return False
        if x not in self.zero_at_pads:
            if dims.batch is None:
                self.cumsum_problems[node] = "the summed value has no batch dim"
                return False
            checked = self._checked_zero_at_pads(x, node, dims)
            if checked is None:
                return False
            x = checked
        with self.graph.inserting_before(node):
            new = self.graph.call_function(
                runtime.segmented_cumsum, (x, node.args[1], self.layout["cu_seqlens"]), dict(node.kwargs))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        self.kind[new] = "token"
        self.positions_rewritten.append(f"{node.name} ({module_path(new) or '<root>'}): cumsum per sequence")
        return True

    def _causal_conv_per_sequence(self, node: fx.Node) -> bool:
        """A causal depthwise conv over the tokens (`causal_conv`) -> the same conv per sequence of the packed
        tokens; its slice's value is replaced, the conv and the slice left to dead-code elimination."""
        conv = causal_conv_over_tokens(node, self.symbols)
        if conv is None or self.kind_of(conv.x) != "token" or any(self.kind_of(a) not in ("free", "sym") for a in (conv.weight, conv.bias) if a):
            return False
        with self.graph.inserting_before(node):
            new = self.graph.call_function(runtime.packed_causal_conv1d,
                                           (conv.x, conv.weight, conv.bias, self.layout["cu_seqlens"]))
        new.meta = dict(conv.cut.meta)
        conv.cut.replace_all_uses_with(new)
        self.kind[node] = self.kind[conv.cut] = "free"  # dead now
        self.kind[new] = "token"
        self.convs_per_sequence.append(module_path(node) or "<root>")
        return True

    def _checked_zero_at_pads(self, x: fx.Node, cumsum: fx.Node, dims: TokenDims) -> fx.Node | None:
        """`x` behind a run-time check that it is 0 at every padded token that precedes a real token of its row.

        That is what makes the padded cumsum equal the per-sequence one at real tokens. The check needs `x` at
        padded tokens, which the packed graph never computes, so `x` must be an element-wise function of the
        token inputs (RoBERTa: `input_ids != padding_idx`); those ops are run once more on the padded inputs.
        None when it is not (the reason is kept in `cumsum_problems` for the error message).
        """
        chain, sources, problem = self._elementwise_chain(x)
        where = f"{cumsum.name} ({module_path(cumsum) or '<root>'})"
        if problem is not None:
            self.cumsum_problems[cumsum] = problem
            return None
        expr = _describe(x, chain, {packed: p.name for packed, p in self.padded_inputs.items()})
        mapping = dict(self.padded_inputs)
        with self.graph.inserting_before(cumsum):
            for n in chain:
                copy = self.graph.node_copy(n, lambda a: mapping.get(a, a))
                mapping[n] = copy
                self.kind[copy] = "padded"
            checked = self.graph.call_function(
                runtime.check_zero_at_padding,
                (x, mapping[x], self.layout["keep"], dims.batch, dims.seq, f"{where} counts {expr} over the tokens",
                 tuple(self.padded_inputs[s].name for s in sources), tuple(self.padded_inputs[s] for s in sources)))
        checked.meta = dict(x.meta)
        self.kind[checked] = "token"
        self.checked_at_runtime.append(f"{where}: {expr} is 0 at padding")
        return checked

    def _elementwise_chain(self, x: fx.Node) -> tuple[list[fx.Node], list[fx.Node], str | None]:
        """(nodes from the token inputs to `x` in graph order, the packed inputs they read, why not if they are not
        element-wise ops on the token inputs and model constants)."""
        seen: set[fx.Node] = set()
        sources: list[fx.Node] = []
        stack = [x]
        while stack:
            cur = stack.pop()
            if cur in seen:
                continue
            seen.add(cur)
            if cur in self.padded_inputs:
                sources.append(cur)
                continue
            target = cur.target
            tagged = isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags
            if cur.op != "call_function" or not (tagged or is_op(cur, *ZERO_KEEPING)):
                return [], [], f"{cur.name!r} ({getattr(target, '__name__', target)}) is not element-wise"
            if target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags:
                return [], [], f"{cur.name!r} ({target.__name__}) writes in place or draws random numbers"
            if len(seen) > 16:
                return [], [], "the value is more than 16 element-wise ops away from the token inputs"
            for arg in cur.all_input_nodes:
                if is_sym(arg) or self.kind_of(arg) not in ("token", "free"):
                    return [], [], f"{cur.name!r} reads {arg.name!r}, which is neither a token input nor a constant"
                if self.kind_of(arg) == "token":
                    stack.append(arg)
        if not sources:
            return [], [], "the value reads no token input"
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        chain = sorted(seen - set(sources), key=order.__getitem__)
        return chain, sources, None

    def _track_zero_at_pads(self, node: fx.Node) -> None:
        """A product with, or a cast of, a value that is 0 at padded tokens is 0 there too."""
        if is_op(node, aten.mul.Tensor) and any(a in self.zero_at_pads for a in node.args):
            self.zero_at_pads.add(node)
        elif is_op(node, *ZERO_KEEPING) and node.args[0] in self.zero_at_pads:
            self.zero_at_pads.add(node)

    def _classify_source(self, node: fx.Node, kinds: set[str]) -> None:
        val = node.meta.get("val")
        shapes = [val] if isinstance(val, torch.Tensor) else [v for v in val if isinstance(v, torch.Tensor)] \
            if isinstance(val, list | tuple) else []
        seq_shaped = any(any(self.symbols.mentions_seq(d) for d in t.shape) for t in shapes)
        if "padded" in kinds or "unproven" in kinds:
            padded = [a for a in node.all_input_nodes if self.kind_of(a) == "padded"]
            if all(a in self.size_built for a in padded):  # from sizes alone: a token-wise module may take it back
                self.size_built[node] = (node.args, node.kwargs)
            self._sizes(node, self.padded, keep_placeholder_sizes=True)
            self.kind[node] = "padded"
        elif not seq_shaped:
            batch_shaped = any(any(self.symbols.mentions_tokens(d) for d in t.shape) for t in shapes)
            if batch_shaped and self._broadcast_over_batch(node):
                self._sizes(node, self.packed, keep_placeholder_sizes=False)  # one row stands for all
                self.kind[node] = "free"
                return
            self.kind[node] = "padded" if batch_shaped else "free"
            if batch_shaped:
                self._sizes(node, self.padded, keep_placeholder_sizes=True)
        elif self._position_source(node):
            pass
        elif is_op(node, *FACTORIES):
            self._sizes(node, self.packed, keep_placeholder_sizes=False)
            self.kind[node] = "positional"  # the same value at every token
        else:
            self.kind[node] = "unproven"

    def _broadcast_over_batch(self, node: fx.Node) -> bool:
        """A model constant expanded over the batch (`buffer.expand(batch, -1)`): every row holds the same values,
        so one row of it (batch size 1) serves the packed tokens (RoBERTa's buffered token_type_ids)."""
        val = tensor_meta(node)
        if not is_op(node, aten.expand.default) or val is None or self.kind_of(node.args[0]) != "free":
            return False
        return all(not self.symbols.mentions_tokens(d) or self.symbols.kind(d) == "batch" for d in val.shape)

    def _attention(self, node: fx.Node) -> None:
        qkv = node.args[2:5] if node.target is runtime.packed_mixer else node.args[:3]
        for arg in qkv:
            if self.kind_of(arg) != "token":
                raise fail(f"attention input {arg.name!r} is not a per-token tensor of the packed input", node)
        self.kind[node] = "token"

    def _output(self, node: fx.Node) -> None:
        def swap(arg):
            if self.repad and isinstance(arg, fx.Node) and self.kind_of(arg) in ("token", "positional"):
                return self._repad(arg, node)
            if isinstance(arg, fx.Node) and self.kind_of(arg) == "unproven":
                raise fail(f"output {arg.name!r} is built from the sequence length alone in a way the pass "
                            "cannot rewrite", arg)
            return arg

        node.args = fx.node.map_arg(node.args, swap)


def _describe(x: fx.Node, chain: list[fx.Node], names: dict[fx.Node, str]) -> str:
    """`x` as a readable expression of the inputs it is computed from, e.g. `to(ne(input_ids, 1), torch.int32)`."""
    inside = set(chain)

    def show(arg) -> str:
        if isinstance(arg, fx.Node):
            return render(arg) if arg in inside else names.get(arg, arg.name)
        if isinstance(arg, list | tuple):
            return "[" + ", ".join(show(a) for a in arg) + "]"
        return str(arg)

    def render(node: fx.Node) -> str:
        name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        return f"{name}({', '.join(show(a) for a in node.args)})"

    return render(x) if x in inside else x.name


def ancestors(nodes: set[fx.Node]) -> set[fx.Node]:
    """Every node that `nodes` are computed from (one of `nodes` only where it feeds another)."""
    return graph_ancestors(a for n in nodes for a in n.all_input_nodes)


