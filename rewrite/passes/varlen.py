"""Pass `varlen`: padding-free execution of a padded batch.

The emitted module takes the same padded inputs and returns the same padded outputs, but it
unpads once at the start (every [batch, seq, ...] input is packed to its real tokens), runs every
token-wise op on packed tokens, runs attention per sequence with the varlen kernel
(`rewrite.kernels.varlen_attention`, cu_seqlens), restarts positions per sequence (arange and
position-table slices over the sequence become per-token positions), and repads once where
packed values leave the graph.

What the pass proves before it changes anything:
- each attention mask is key padding of one padding-mask input, optionally causal or within a
  sliding window, causal or bidirectional (the mask graph is run on a probe with right, left, full,
  one-token and holed rows, and rows longer than a window constant of the mask graph);
- every op that touches packed tokens is token-wise (`rewrite.varlen.tokenwise`); an op that is
  not, and that feeds attention, is an error naming the node and module; one that only reads the
  final states (a pooler taking the first token) reads the repadded tensor instead.

- a cumsum over the tokens restarts per sequence when what it sums is 0 at padding: proven for values
  multiplied by the padding mask (OPT), checked at run time for element-wise functions of the token
  inputs (RoBERTa's `input_ids != pad_id`; a clear ValueError when a padded position holds another token).

Packed layout: a packed tensor keeps its padded rank and dim order with batch size 1 and sequence
size T, so the model's own views and transposes run unchanged once their sizes are rewritten.
Padded positions of repadded outputs hold 0; a row with no real token is an empty sequence whose
outputs are all 0. The pass result carries a `RealTokens` description (`result.real_tokens`) of the
padding mask and of each output's token dims, so `rewrite.verify` compares real tokens only.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx as fx

from rewrite.analysis import AttentionSite, GraphAnalysis
from rewrite.analysis.causal_conv import kernel_over_tokens
from rewrite.analysis.graph_utils import ancestor_placeholders, eliminate_dead_code
from rewrite.analysis.graph_utils import ancestors as graph_ancestors
from rewrite.analysis.nodes import is_op, module_path, tensor_meta
from rewrite.analysis.shapes import to_expr
from rewrite.errors import PlanError
from rewrite.kernels.varlen_attention.api import BACKENDS
from rewrite.passes import register_pass
from rewrite.passes.base import (
    GraphPass,
    PassContext,
    PassResult,
    refuse_cached_keys,
    refuse_chunked_attention,
    refuse_mask_bias,
    refuse_unrecognized_attention,
)
from rewrite.real_tokens import OutputTokens, RealTokens
from rewrite.varlen import runtime
from rewrite.varlen.causal_conv import causal_conv_over_tokens
from rewrite.varlen.graph_replay import MODES as REPLAY_MODES
from rewrite.varlen.graph_replay import TokenBuckets
from rewrite.varlen.mask_check import MaskUse, prove_packed_masks, prove_padding_masks
from rewrite.varlen.symbols import TokenDims, TokenSymbols, find_symbols
from rewrite.varlen.walk import PackedGraphWalk, fail, is_sym

aten = torch.ops.aten
PASS = "varlen"
MASK_NAMES = ("attention_mask", "src_key_padding_mask", "key_padding_mask", "padding_mask", "mask")
CU_SEQLENS_NAMES = ("cu_seqlens", "cu_seq_lens_q", "cu_seq_lens")
POSITION_NAMES = ("position_ids", "positions")


@dataclass
class VarlenOptions:
    """Options of the `varlen` pass."""

    mask_input: str = field(
        default="auto",
        metadata={"help": "name of the [batch, seq] padding-mask input; auto: the one the attention masks read "
                          f"(or the first of {', '.join(MASK_NAMES)})"},
    )
    attention_backend: str = field(
        default="auto",
        metadata={"help": "varlen attention kernel: auto (ours without gradients; with gradients PyTorch's flash "
                          "varlen where it runs, else ours), kernel (Triton on CUDA, reference on CPU), torch, "
                          "reference", "choices": list(BACKENDS)},
    )

    cuda_graphs: str = field(
        default="auto",
        metadata={"help": "replay the module from CUDA graphs (calls without autograd, inputs on CUDA), one per "
                          "input shape and bucket of real tokens: auto (a shape's second call captures; eager where "
                          "capture fails), always (raise where it fails), never", "choices": list(REPLAY_MODES)},
    )
    token_bucket: int = field(
        default=256, metadata={"help": "CUDA graphs: real-token counts round up to a multiple of this"})
    max_graphs: int = field(default=8, metadata={"help": "CUDA graphs kept (least recently used dropped)"})

    def validate(self, where: str = PASS) -> None:
        """Raise PlanError naming the first bad field."""
        if self.cuda_graphs not in REPLAY_MODES:
            raise PlanError(f"{where}.cuda_graphs", f"unknown mode {self.cuda_graphs!r}", list(REPLAY_MODES))
        for name in ("token_bucket", "max_graphs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PlanError(f"{where}.{name}", f"must be a positive integer, got {value!r}")
        if not isinstance(self.mask_input, str) or not self.mask_input:
            raise PlanError(f"{where}.mask_input", f"must be an input name or 'auto', got {self.mask_input!r}")
        if self.attention_backend not in BACKENDS:
            raise PlanError(f"{where}.attention_backend", f"unknown backend {self.attention_backend!r}", list(BACKENDS))


def _choose_padding(option: str, token_inputs: list[fx.Node], sites: list[MaskUse], where: str = PASS) -> fx.Node:
    """The padding-mask input: the one `option` (the plan field `where`.mask_input) names, else the one the masks read."""
    by_name = {p.name: p for p in token_inputs}
    if option != "auto":
        if option not in by_name:
            raise PlanError(f"{where}.mask_input", f"no [batch, seq] input named {option!r}", sorted(by_name))
        return by_name[option]
    read: list[fx.Node] = []
    for site in sites:
        if isinstance(site.mask, fx.Node):
            for p in _ancestor_placeholders(site.mask):
                if p in by_name.values() and p not in read:
                    read.append(p)
    if len(read) == 1:
        return read[0]
    if len(read) > 1:
        raise fail(
            f"the attention masks read several [batch, seq] inputs ({', '.join(p.name for p in read)}); "
            f"name the padding mask with the plan field '{where}.mask_input'")
    for name in MASK_NAMES:
        if name in by_name:
            return by_name[name]
    raise fail(
        "no padding-mask input found: the model takes no [batch, seq] mask that its attention reads "
        f"(inputs: {', '.join(by_name) or 'none'}); pass the padding mask (e.g. attention_mask) in the example "
        f"inputs or name it with '{where}.mask_input'")


def _ancestor_placeholders(node: fx.Node) -> list[fx.Node]:
    # a size read does not read values
    return ancestor_placeholders(node, lambda n: () if is_sym(n) else n.all_input_nodes)


def _refuse_cross_attention(site: AttentionSite) -> None:
    """Raise PassError for a site whose queries and keys come from sequences of different (symbolic) lengths."""
    q, k = tensor_meta(site.q), tensor_meta(site.k)
    if q is None or k is None or q.dim() < 2 or k.dim() < 2 or to_expr(q.shape[-2]) == to_expr(k.shape[-2]):
        return
    raise fail(f"attention at {site.module_path or '<root>'}: cross-attention (queries and keys from sequences of "
               "different lengths, as in an encoder-decoder model) is not supported: padding-free execution packs "
               "one sequence's tokens per row, for self-attention", site.node)


def _check_site(site: AttentionSite, symbols: TokenSymbols, masked_causal: dict[str, bool], padded: bool) -> bool:
    """Whether the site is causal; raises PassError for sites the varlen kernel cannot run."""
    where = f"attention at {site.module_path or '<root>'}"
    if site.problem is not None:
        raise fail(f"{where}: {site.problem}", site.node)
    q, k = tensor_meta(site.q), tensor_meta(site.k)
    if q is None or k is None or q.dim() != 4 or k.dim() != 4:
        raise fail(f"{where}: q and k must be [batch, heads, seq, dim] tensors", site.node)
    if {symbols.dims(q.shape), symbols.dims(k.shape)} - {TokenDims(0, 2), TokenDims(None, 2)}:
        raise fail(f"{where}: q / k are not [batch, heads, seq, dim] in the input's batch and sequence "
                    "(cross-attention or a fixed length is not supported)", site.node)
    if site.mask is None and padded:
        raise fail(f"{where} reads no attention mask, so on padded rows it attends to padding; the padded model's "
                    "outputs then depend on the padding and a padding-free module cannot match them", site.node)
    return masked_causal[site.name]


UNSUPPORTED_REMEDY = (
    "The varlen pass runs per sequence (cu_seqlens) softmax attention, sliding-window attention, the `mixer` "
    "pass's mixers and causal depthwise convs; every other op must keep each token apart. Leave `varlen` out of "
    "the plan for this model (the pass has no `layers` selector: it packs every layer or none)")


def _refuse_token_convolutions(graph: fx.Graph, analysis: GraphAnalysis, symbols: TokenSymbols,
                               mixing: list[fx.Node]) -> None:
    """Raise PassError naming the layer and module of a convolution over the tokens that feeds attention and that the
    walk cannot run per sequence (`causal_conv`): on packed sequences it would mix the end of one sequence into the
    start of the next."""
    feeds_mixing = graph_ancestors(a for n in mixing for a in n.all_input_nodes)
    for node in graph.nodes:
        if node not in feeds_mixing or causal_conv_over_tokens(node, symbols):
            continue
        kernel = kernel_over_tokens(node, symbols.mentions_seq)
        if kernel is None:
            continue
        path = module_path(node) or "<root>"
        raise fail(
            f"{analysis.block_label(node)}: a convolution over the tokens (kernel {kernel}, module {path}, as a "
            "short-conv layer) mixes each token with its neighbours, so on packed sequences it would read the end of "
            "one sequence into the start of the next; it feeds attention, so it cannot run on repadded values either. "
            "The pass runs per sequence only a causal depthwise conv1d (weight [C, 1, K] with K from 2 to 8, "
            "groups = C, padding K-1 and the first seq outputs kept: a short-conv layer as LFM2 writes it); this "
            "one is not of that form. " + UNSUPPORTED_REMEDY, node)


def _windowed_mixers(mixers: list[fx.Node], windows: dict[str, int], result: PassResult) -> None:
    """Packed mixers take key-padding masks only: refuse a mixer whose mask the probe found to be a sliding window,
    unless the mixer was placed with `check_masks: false` (it then mixes over each sequence's whole prefix, its
    window dropped, in the padded module too, and so does the packed mixer: say so)."""
    for node in mixers:
        if node.name not in windows:
            continue
        if node.kwargs.get("check_mask", True) is False:
            result.messages.append(f"{node.kwargs.get('layer') or module_path(node)}: its sliding window of "
                                   f"{windows[node.name]} keys dropped, as the mixer's `check_masks: false` asked "
                                   "(the packed mixer mixes over each sequence's whole prefix, as the padded one does)")
            continue
        raise fail(f"this mixer reads a sliding-window mask ({windows[node.name]} keys); packed mixers carry "
                   "causal and key-padding masks only. Leave this layer out with the mixer's `layers` selector, or "
                   "set the mixer's `check_masks: false` to mix over each sequence's whole prefix (its window "
                   "dropped, in the padded module too)", node)


def _replace_site(graph: fx.Graph, site: AttentionSite, causal: bool, layout: dict[str, fx.Node], backend: str,
                  window: int | None = None, lookahead: int = 0) -> fx.Node:
    """Varlen attention in place of the site: `packed_attention`, or `packed_window_attention` for a sliding window
    of `window` keys up to the query and `lookahead` after it (0: causal)."""
    k, v = site.kv_repeat_source if site.kv_repeat_source is not None else (site.k, site.v)
    dropout = {"dropout_p": site.dropout_p} if site.dropout_p else {}
    with graph.inserting_before(site.node):
        ahead = {"lookahead": lookahead} if lookahead else {}
        target, form = ((runtime.packed_attention, {"causal": causal}) if window is None
                        else (runtime.packed_window_attention, {"window": window, **ahead}))
        new = graph.call_function(target, (site.q, k, v, layout["cu_seqlens"], layout["max_seqlen"]),
                                  {**form, "scale": site.scale, "backend": backend, **dropout})
    new.meta = dict(site.node.meta)
    site.node.replace_all_uses_with(new)
    for node in dict.fromkeys([site.node, *reversed(site.chain)]):
        for user in list(node.users):
            if is_op(user, aten._assert_tensor_metadata.default):
                graph.erase_node(user)
        if not node.users:
            graph.erase_node(node)
    return new


MIXER_MASK_KWARGS = ("mask", "mask_negated", "check_mask")


def _mixer_nodes(graph: fx.Graph) -> list[fx.Node]:
    """Linear mixers the `mixer` pass placed (tagged `rewrite_mixer` in their metadata)."""
    return [n for n in graph.nodes if n.op == "call_function" and n.meta.get("rewrite_mixer")]


def _mixer_use(node: fx.Node) -> MaskUse:
    mask = node.kwargs.get("mask")
    return MaskUse(node.name, module_path(node), mask if isinstance(mask, fx.Node) else None,
                   bool(node.kwargs.get("mask_negated", False)), False)


def _replace_mixer(graph: fx.Graph, node: fx.Node, layout: dict[str, fx.Node]) -> fx.Node:
    kwargs = {k: v for k, v in node.kwargs.items() if k not in MIXER_MASK_KWARGS}
    with graph.inserting_before(node):
        new = graph.call_function(
            runtime.packed_mixer, (node.meta["rewrite_mixer"], layout["cu_seqlens"], *node.args), kwargs)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def _other_sizes(graph: fx.Graph, inputs: list[fx.Node], symbols: TokenSymbols) -> dict[sympy.Symbol, fx.Node]:
    """A size node for every dynamic input dim that is neither batch nor sequence (a feature size, say)."""
    out: dict[sympy.Symbol, fx.Node] = {}
    for node in inputs:
        for dim, size in enumerate(tensor_meta(node).shape):
            e = to_expr(size)
            if isinstance(e, sympy.Symbol) and e not in symbols.all and e not in out:
                out[e] = graph.call_function(aten.sym_size.int, (node, dim))
    return out


@register_pass
class Varlen(GraphPass):
    """Run a padded batch padding-free: unpad once, varlen attention, repad once (see the module docstring)."""

    name = PASS
    summary = "padding-free execution: packed tokens, varlen attention with cu_seqlens, per-sequence positions"
    Options = VarlenOptions
    plan_kernels = "auto"  # the plan's `kernels` field, read at run time

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        options: VarlenOptions = self.options
        options.validate(self.where(ctx))
        self.plan_kernels = ctx.kernels
        result = PassResult(self.name)
        graph = gm.graph
        analysis = ctx.analysis()
        refuse_unrecognized_attention(self.name, analysis, action="unpad")
        sites = analysis.sites
        for site in sites:
            refuse_mask_bias(self.name, site, site.module_path or "<root>", action="unpad")
            refuse_chunked_attention(self.name, site, site.module_path or "<root>", action="unpad",
                                     remedy=". Leave `varlen` out of the plan for this model")
            refuse_cached_keys(self.name, site, site.module_path or "<root>", action="unpad",
                               remedy=": a padding-free program returns no cache")
        for site in sites:
            _refuse_cross_attention(site)
        user_inputs = [p for p in graph.nodes if p.op == "placeholder" and not p.meta.get("state_name")
                       and tensor_meta(p) is not None]
        symbols = find_symbols(user_inputs)
        if not symbols.seq:
            shown = ", ".join(f"{p.name} {list(tensor_meta(p).shape)}" for p in user_inputs) or "none"
            raise fail("no input has a dynamic sequence dim (dim 1 of a [batch, seq, ...] input): the example had "
                        "fewer than two tokens, or the model fixed the length while being captured (Python code "
                        "sized by the tokens, such as a loop over them in a reference selective scan), so the graph "
                        "holds for that length only, or the model takes no token sequences (an image model's "
                        "patches are never padded). Padding-free execution needs token inputs such as input_ids "
                        f"[batch, seq] with a padding mask or packed positions; the captured inputs: {shown}")
        mixers = _mixer_nodes(graph)
        if not sites and not mixers:
            raise fail("the model has no attention the pass can find, so nothing tells tokens apart by sequence; "
                        "padding-free execution needs varlen attention sites")
        _refuse_token_convolutions(graph, analysis, symbols, [s.node for s in sites] + mixers)
        uses = [MaskUse.of_site(s) for s in sites] + [_mixer_use(n) for n in mixers]
        token_inputs = [p for p in user_inputs if symbols.node_dims(p) == TokenDims(0, 1)]
        packed_source = _packed_source(user_inputs)
        if packed_source is not None and (options.mask_input == "auto" or not token_inputs):
            return self._run_packed(gm, ctx, result, analysis, mixers, uses, user_inputs, symbols, packed_source)
        if not token_inputs:
            raise fail("no input is [batch, seq, ...] with both dims dynamic and no packed input (cu_seqlens or "
                        "restarting position_ids) was given; capture with a padded batch of two or more rows")
        padding = _choose_padding(options.mask_input, token_inputs, uses, self.where(ctx))
        facts = prove_padding_masks(gm, uses, padding, symbols)
        causal = {site.name: _check_site(site, symbols, facts.causal, True) for site in sites}
        for node in mixers:
            if node.kwargs.get("mask") is None:
                raise fail("this mixer reads no attention mask, so on padded rows it mixes in padding; a "
                            "padding-free module cannot match the padded one", node)
        _windowed_mixers(mixers, facts.window, result)
        result.matched = len(sites) + len(mixers)

        body = next(n for n in graph.nodes if n.op not in ("placeholder", "get_attr"))
        with graph.inserting_before(body):
            keep = graph.call_function(runtime.padding_keep, (padding, facts.pads_are_true))
            checked = keep
            if facts.window_in_slots:  # windows counted between row slots: rows must have no holes
                where = ", ".join(sorted({module_path(s.node) or "<root>" for s in sites
                                          if s.name in facts.window_in_slots}))
                checked = graph.call_function(runtime.contiguous_rows, (keep, f"attention at {where}"))
            unpadded = graph.call_function(runtime.unpad_layout, (checked,))
            layout = {name: graph.call_function(operator.getitem, (unpadded, i))
                      for i, name in enumerate(("indices", "cu_seqlens", "max_seqlen"))}
            packed_inputs = {p: graph.call_function(runtime.pack_tokens, (p, layout["indices"])) for p in token_inputs}
        own = {keep, checked, unpadded, *layout.values()}
        for p, packed in packed_inputs.items():
            packed.meta["val"] = p.meta["val"]
            for user in list(p.users):
                if user not in own and user is not packed and not is_sym(user):
                    user.replace_input_with(p, packed)

        mixing = self._replace_mixing(graph, sites, mixers, causal, layout, result, facts.window, facts.lookahead)
        eliminate_dead_code(graph)

        with graph.inserting_before(layout["max_seqlen"].next):  # what the walk needs, made after dead-code removal
            layout["positions"] = graph.call_function(operator.getitem, (unpadded, 3))
            padded_sizes = (graph.call_function(aten.sym_size.int, (padding, 0)),
                            graph.call_function(aten.sym_size.int, (padding, 1)))
            layout["total"] = graph.call_function(aten.sym_size.int, (layout["indices"], 0))
            other_sizes = _other_sizes(graph, user_inputs, symbols)
        own.update({layout["positions"], layout["total"], *padded_sizes, *other_sizes.values()})
        layout["keep"] = keep
        rewriter = PackedGraphWalk(gm, symbols, layout, padded_sizes, other_sizes, ctx.source,
                                   layer_of=analysis.block_label)
        rewriter.kind.update({n: "sym" for n in own})
        rewriter.kind.update({n: "token" for n in packed_inputs.values()})
        rewriter.kind.update({p: "padded" for p in token_inputs})
        rewriter.padded_inputs = {packed: p for p, packed in packed_inputs.items()}
        if not facts.pads_are_true and padding in packed_inputs:  # 1 = real token: the mask is 0 at padding
            rewriter.zero_at_pads.add(packed_inputs[padding])
        rewriter.run(mixing)
        eliminate_dead_code(graph)
        graph.lint()
        gm.recompile()
        ctx.invalidate()

        result.messages.append(
            f"padding mask: input {padding.name!r} ({'True = padding' if facts.pads_are_true else '1 = real token'}); "
            f"packed inputs: {', '.join(p.name for p in token_inputs)}")
        if rewriter.positions_rewritten:
            result.messages.append("per-sequence positions: " + ", ".join(rewriter.positions_rewritten))
        if rewriter.convs_per_sequence:
            result.messages.append("causal convs per sequence: " + ", ".join(rewriter.convs_per_sequence))
        if rewriter.checked_at_runtime:
            result.messages.append("checked at run time: " + ", ".join(rewriter.checked_at_runtime))
        if rewriter.token_modules:
            result.messages.append("run packed as a whole, shown token-wise by running them: "
                                   + ", ".join(rewriter.token_modules))
        if rewriter.exits:
            result.messages.append("read the repadded tensor (padded tokens hold 0): " + ", ".join(rewriter.exits))
        result.real_tokens = _real_tokens(graph, padding, facts.pads_are_true, symbols, rewriter.restarts_positions)
        result.graph_replay = TokenBuckets(options.cuda_graphs, options.token_bucket, options.max_graphs)
        return result

    def _replace_mixing(self, graph: fx.Graph, sites: list[AttentionSite], mixers: list[fx.Node],
                        causal: dict[str, bool], layout: dict[str, fx.Node], result: PassResult,
                        windows: dict[str, int] | None = None,
                        lookaheads: dict[str, int] | None = None) -> set[fx.Node]:
        """Put varlen attention (sliding-window attention for sites in `windows`, looking ahead `lookaheads` keys
        where given) / packed (or per-sequence) mixers in place of every token-mixing node."""
        windows, lookaheads = windows or {}, lookaheads or {}
        options: VarlenOptions = self.options
        backend = options.attention_backend
        if backend == "auto":  # the plan's `kernels` field: reference everywhere, or our Triton kernel on CUDA
            backend = {"reference": "reference", "triton": "kernel"}.get(self.plan_kernels, "auto")
        mixing = set()
        for site in sites:
            window, lookahead = windows.get(site.name), lookaheads.get(site.name, 0)
            mixing.add(_replace_site(graph, site, causal[site.name], layout, backend, window, lookahead))
            how = "causal" if causal[site.name] else "bidirectional"
            if window is not None:
                how += (f" sliding-window ({window - 1} keys before, {lookahead} after)" if lookahead
                        else f" sliding-window ({window} keys)")
            result.changed.append(f"{site.name} ({site.module_path or '<root>'}): varlen {how} attention")
        for node in mixers:
            where = f"{node.name} ({module_path(node) or '<root>'})"
            kind = node.meta["rewrite_mixer"]
            mixing.add(_replace_mixer(graph, node, layout))
            how = "one call over the packed sequences" if runtime.mixer_takes_cu_seqlens(kind) else "per sequence"
            result.changed.append(f"{where}: {kind} mixer {how}")
        return mixing

    def _run_packed(self, gm: fx.GraphModule, ctx: PassContext, result: PassResult, analysis: GraphAnalysis,
                    mixers: list[fx.Node], uses: list[MaskUse], user_inputs: list[fx.Node], symbols: TokenSymbols,
                    source: fx.Node) -> PassResult:
        """Already-packed input ([1, T] tokens, sequences given by cu_seqlens or restarting position_ids)."""
        graph = gm.graph
        sites = analysis.sites
        token_inputs = [p for p in user_inputs if symbols.node_dims(p) in (TokenDims(None, 1), TokenDims(0, 1))]
        if not token_inputs:
            raise fail("no [1, T] token input found beside the packed sequence boundaries", source)
        for p in token_inputs:
            if tensor_meta(p).shape[0] != 1:
                raise fail(f"packed input {p.name!r} must hold one row [1, T]; pass several sequences back to "
                            f"back and mark them with {source.name!r}", p)
        facts, windows, lookaheads = prove_packed_masks(gm, uses, source if source.name in POSITION_NAMES else None,
                                                        symbols)
        causal = {site.name: _check_site(site, symbols, facts, False) for site in sites}
        _windowed_mixers(mixers, windows, result)
        result.matched = len(sites) + len(mixers)
        body = next(n for n in graph.nodes if n.op not in ("placeholder", "get_attr"))
        with graph.inserting_before(body):
            total = graph.call_function(aten.sym_size.int, (token_inputs[0], 1))
            if source.name in POSITION_NAMES:
                unpacked = graph.call_function(runtime.packed_layout, (source,))
            else:
                unpacked = graph.call_function(runtime.cu_seqlens_layout, (source, total))
            layout = {name: graph.call_function(operator.getitem, (unpacked, i))
                      for i, name in enumerate(("cu_seqlens", "max_seqlen"))}
        own = {unpacked, total, *layout.values()}
        mixing = self._replace_mixing(graph, sites, mixers, causal, layout, result, windows, lookaheads)
        eliminate_dead_code(graph)
        with graph.inserting_after(layout["max_seqlen"]):
            layout["positions"] = graph.call_function(operator.getitem, (unpacked, 2))
            layout["total"] = graph.call_function(aten.sym_size.int, (token_inputs[0], 1))
        own.update({layout["positions"], layout["total"]})
        rewriter = PackedGraphWalk(gm, symbols, layout, None, {}, ctx.source,
                                   layer_of=analysis.block_label)
        rewriter.kind.update({n: "sym" for n in own})
        rewriter.kind.update({p: "token" for p in token_inputs})
        rewriter.run(mixing)
        eliminate_dead_code(graph)
        graph.lint()
        gm.recompile()
        ctx.invalidate()
        result.messages.append(f"packed input: sequences from {source.name!r}; tokens: "
                               f"{', '.join(p.name for p in token_inputs)}")
        if rewriter.positions_rewritten:
            result.messages.append("per-sequence positions: " + ", ".join(rewriter.positions_rewritten))
        if rewriter.convs_per_sequence:
            result.messages.append("causal convs per sequence: " + ", ".join(rewriter.convs_per_sequence))
        if rewriter.exits:
            result.messages.append("read the packed row as a whole: " + ", ".join(rewriter.exits))
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        options: VarlenOptions = self.options
        result.graph_replay = TokenBuckets(
            options.cuda_graphs, options.token_bucket, options.max_graphs,
            packed="position_ids" if source.name in POSITION_NAMES else "cu_seqlens",
            packed_source=placeholders.index(source), token_input=placeholders.index(token_inputs[0]))
        return result


def _real_tokens(graph: fx.Graph, padding: fx.Node, pads_are_true: bool, symbols: TokenSymbols,
                 restarts_positions: bool) -> RealTokens:
    """What `rewrite.verify` needs to compare the padding-free module with the original on real tokens only.

    Outputs the pass repads are per-token ("tokens", with the dims `repad_tokens` put them back at); outputs
    computed from a repadded tensor ("rows": a pooler reading the first slot) are comparable on rows
    without padding; every other output is the original's computation and is compared in full.
    """
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    leaves = output.args[0] if isinstance(output.args[0], list | tuple) else [output.args[0]]
    repads = {n for n in graph.nodes if n.op == "call_function" and n.target is runtime.repad_tokens}
    outputs: dict[int, OutputTokens] = {}
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, fx.Node):
            continue
        if leaf in repads:
            batch_dim, seq_dim = leaf.args[4], leaf.args[5]
            outputs[i] = OutputTokens("tokens", batch_dim, seq_dim, bool(leaf.kwargs.get("seq_outer", False)))
        elif repads & (upstream := _ancestors(leaf) | {leaf}):
            val = tensor_meta(leaf)
            batch = [d for d, size in enumerate(val.shape) if symbols.kind(size) == "batch"] if val is not None else []
            outputs[i] = OutputTokens("rows", batch[0] if len(batch) == 1 else None,
                                      slots=_slots_read(upstream, repads))
    return RealTokens(
        mask_input=padding.name, mask_index=placeholders.index(padding), pads_are_true=pads_are_true,
        outputs=outputs, batch_symbols=frozenset(map(str, symbols.batch)),
        seq_symbols=frozenset(map(str, symbols.seq)), restarts_positions=restarts_positions)


def _slots_read(upstream: set[fx.Node], repads: set[fx.Node]) -> tuple[int, ...] | None:
    """The sequence slots through which an output (`upstream`: it and its ancestors) reads the repadded tensors it
    depends on, when each such read is a `select` of one constant slot on the repadded tensor's sequence dim (a
    pooler's first token); None otherwise."""
    slots: set[int] = set()
    for repad in repads & upstream:
        padded = tensor_meta(repad)
        if padded is None or repad.args[4] is None:
            return None
        seq_dim = repad.args[5]
        for user in repad.users:
            if user not in upstream:
                continue
            if user.target is not aten.select.int or user.args[0] is not repad:
                return None
            dim, index = user.args[1], user.args[2]
            if not isinstance(dim, int) or not isinstance(index, int) or dim % padded.dim() != seq_dim % padded.dim():
                return None
            slots.add(index)
    return tuple(sorted(slots)) if slots else None


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        for arg in stack.pop().all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                stack.append(arg)
    return seen


def _packed_source(inputs: list[fx.Node]) -> fx.Node | None:
    """The input that marks packed sequences: a cu_seqlens tensor, else position_ids of one packed row."""
    by_name = {p.name: p for p in inputs}
    for name in CU_SEQLENS_NAMES:
        if name in by_name:
            return by_name[name]
    for name in POSITION_NAMES:
        node = by_name.get(name)
        val = tensor_meta(node) if node is not None else None
        if val is not None and val.dim() == 2 and val.shape[0] == 1:
            return node
    return None


__all__ = ["Varlen", "VarlenOptions"]
