"""Pass `stateful`: thread decode state through the graph so one program prefills and generates.

Every remaining softmax attention site becomes `stateful_attention` (a KV cache), every linear mixer
site the `mixer` pass placed becomes `stateful_mixer` (the kind's recurrent state), every causal depthwise
conv over the tokens (LFM2's short convs) becomes `stateful_conv` (its last K-1 inputs), and positions the
model computes from the sequence length (`arange(T)`) continue from the tokens already seen. Any other
convolution over the tokens is refused, naming its module. The
state is one extra graph input, `decode_state` (a `rewrite.decode.DecodeState`), updated in place
by the sites; the program's outputs are unchanged.

Kept softmax layers in `window_layers` see only their last `sliding_window` tokens (generate()
fills both from a Hugging Face config when the plan sets no window).

Blocks the `layer_skip` pass routed (found through `rewrite.routing.graph`) are threaded too: the
state enters each routed block as one more input that follows its running rows
(`DecodeState.select_rows`), so a sequence that skips the block never writes nor reads that block's
caches; each block's router is replaced by `held_route`, which decides from the prompt at prefill
and holds the decision for every later call.

With `thread: false` (the default, as in a user's plan) the pass only checks that every site can
decode — a non-causal (encoder) or cross-attention site, a site whose probabilities escape, a mixer
kind without a recurrent step, a routed block whose batch size the capture fixed, or a sub-program
that is not a routed block is an error naming the layer — and leaves the forward program as it is.
A program threaded in a user's plan (`thread: true`) needs a `decode_state` on every call.
`OptimizedModule.generate` captures the model a second time and runs the plan with `thread: true`
to build its decode program.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from rewrite.analysis import AttentionSite, GraphAnalysis, SymbolicDims, analyze
from rewrite.analysis.causal_conv import (
    SUPPORTED_FORM,
    CausalConv,
    causal_conv_over_sequence,
    kernel_over_tokens,
)
from rewrite.analysis.graph_utils import (
    ancestors,
    eliminate_dead_code,
    erase_unused,
    erase_unused_computation,
)
from rewrite.analysis.nodes import is_op, module_path, tensor_meta
from rewrite.analysis.shapes import to_expr
from rewrite.decode.program_meta import DecodeSignature
from rewrite.decode.sites import (
    continued_positions,
    held_route,
    stateful_attention,
    stateful_conv,
    stateful_mixer,
)
from rewrite.decode.step_check import CARRIED
from rewrite.decode.steps import kind_step
from rewrite.errors import PassError, PlanError, RewriteError
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
from rewrite.routing.graph import (
    RoutedCall,
    add_block_input,
    hidden_free_after,
    is_routed_block,
    outer_value,
    replace_route,
    routed_calls,
)
from rewrite.routing.runtime import InputRule
from rewrite.selectors import Selector, describe_selector_syntax, select_layers_for, validate_selector

aten = torch.ops.aten

CUDA_GRAPH_CHOICES = ["auto", "always", "never"]
SCANS = (aten.cumsum.default, aten.cumprod.default, aten.logcumsumexp.default)
_ARANGE = (aten.arange.default, aten.arange.start, aten.arange.start_step)


@dataclass
class StatefulOptions:
    """Options of the `stateful` pass."""

    thread: bool = field(
        default=False,
        metadata={"help": "thread the decode state through this graph now (generate() sets it on its own "
                          "program); off: only check that every site can decode"},
    )
    sliding_window: int | None = field(
        default=None,
        metadata={"help": "kept softmax layers in `window_layers` see only their last N tokens (the model's own "
                          "window); generate() reads it from a Hugging Face config when unset"},
    )
    window_layers: Selector = field(
        default="all",
        metadata={"help": f"layers the sliding window applies to ({describe_selector_syntax()})"},
    )
    cuda_graph: str = field(
        default="auto",
        metadata={"help": "capture the one-token decode step as a CUDA graph: auto (on CUDA), always, never",
                  "choices": CUDA_GRAPH_CHOICES},
    )

    def validate(self, where: str = "stateful") -> None:
        """Raise PlanError naming the first bad field."""
        if not isinstance(self.thread, bool):
            raise PlanError(f"{where}.thread", f"must be true or false, got {self.thread!r}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise PlanError(f"{where}.sliding_window", f"must be a positive number of tokens, got {self.sliding_window!r}")
        validate_selector(self.window_layers, f"{where}.window_layers")
        if self.cuda_graph not in CUDA_GRAPH_CHOICES:
            raise PlanError(f"{where}.cuda_graph", f"unknown mode {self.cuda_graph!r}", CUDA_GRAPH_CHOICES)


@dataclass
class _SoftmaxJob:
    site: AttentionSite
    layer: str
    key: str
    window: int | None = None


@dataclass
class _MixerJob:
    node: fx.Node
    kind: str
    layer: str
    key: str


@dataclass
class _ConvJob:
    conv: CausalConv
    layer: str
    key: str


@dataclass
class _Jobs:
    """The sites of one graph (the program or a routed block's body)."""

    softmax: list[_SoftmaxJob]
    mixers: list[_MixerJob]
    convs: list[_ConvJob]


def _check_softmax_site(site: AttentionSite, layer: str) -> None:
    def refuse(why: str) -> PassError:
        return PassError("stateful", f"{layer}: {why}", site.name, site.module_path)

    if site.problem is not None:
        raise refuse(f"cannot carry a KV cache for this attention: {site.problem}")
    refuse_mask_bias("stateful", site, layer, action="carry a KV cache for")
    refuse_chunked_attention("stateful", site, layer, action="carry a KV cache for", remedy=(
        ". Stateful decode does not support it: a decode step would have to hide every key before its chunk's start, "
        "and neither the KV cache (every key) nor a sliding window's ring (the last N keys) does; generate with the "
        "original model"))
    refuse_cached_keys("stateful", site, layer, action="carry a KV cache for",
                       remedy=": the decode program keeps its own cache")
    q, k = tensor_meta(site.q), tensor_meta(site.k)
    if q is not None and k is not None and q.dim() >= 2 and k.dim() >= 2 and to_expr(q.shape[-2]) != to_expr(k.shape[-2]):
        raise refuse("cross-attention (queries and keys of different lengths) has no self-attention cache to grow")
    if site.mask is not None and not site.is_causal and site.mask_is_causal is None:
        raise refuse("cannot tell whether the attention mask is causal (it could not be evaluated on the example "
                     "inputs); decoding needs causal attention")
    if not site.causal:
        raise refuse("attention is not causal (every token sees the whole sequence, as in an encoder); "
                     "token-by-token decoding needs causal attention")


def _check_no_hidden_graphs(gm: fx.GraphModule) -> None:
    """Refuse sub-programs the pass cannot see into (other than routed blocks, which it threads):
    their attention would run without state, attending to the new tokens only."""
    for node in gm.graph.nodes:
        if is_routed_block(node):
            continue
        body = getattr(node.target, "body", None) if node.op == "call_function" else None
        if node.op == "call_module" or isinstance(body, fx.GraphModule):
            layer = getattr(node.target, "layer", None) or str(node.target)
            raise PassError(
                "stateful", f"{layer}: this block runs as a separate sub-program the stateful pass cannot thread "
                "decode state into, so this model cannot decode token by token", node.name,
            )


def _check_routed(call: RoutedCall) -> None:
    if not call.block.gatherable:
        raise PassError(
            "stateful", f"{call.layer}: this routed block runs every row (the capture fixed the batch size), so a "
            "sequence that skips it would still write its decode state; capture with a dynamic batch", call.node.name,
        )


def _unique_key(path: str, node: fx.Node, taken: set[str]) -> str:
    key = path or node.name
    if key in taken:
        key = f"{key}:{node.name}"
    taken.add(key)
    return key


def _block_paths(analysis: GraphAnalysis, calls: list[RoutedCall]) -> list[str]:
    """The model's block paths in layer order: the analysis's blocks and the routed ones (whose nodes
    live in their bodies)."""
    index = {b.path: b.index for b in analysis.blocks}
    for call in calls:
        last = call.layer.rsplit(".", 1)[-1]
        index.setdefault(call.layer, int(last) if last.isdigit() else len(index))
    return sorted(index, key=index.__getitem__)


def _windowed_blocks(options: StatefulOptions, paths: list[str], where: str) -> set[str]:
    """Paths of the blocks whose kept softmax layers see only the last `sliding_window` tokens (`where`: the plan
    field of the pass's options)."""
    if options.sliding_window is None:
        return set()
    return {paths[i] for i in select_layers_for(options.window_layers, paths, f"{where}.window_layers")}


def _last_inputs(conv: CausalConv) -> str:
    """What a conv's decode state holds, in words."""
    return "its last input" if conv.kernel == 2 else f"its last {conv.kernel - 1} inputs"


def _collect_convs(gm: fx.GraphModule, analysis: GraphAnalysis, taken: set[str]) -> list[_ConvJob]:
    """The causal depthwise convs over the tokens; any other convolution over the tokens is refused."""
    jobs = []
    for node in gm.graph.nodes:
        conv = causal_conv_over_sequence(node, analysis.dims)
        if conv is not None:
            layer = analysis.node_label(node)
            jobs.append(_ConvJob(conv, layer, _unique_key(module_path(node), node, taken)))
            continue
        kernel = kernel_over_tokens(node, analysis.dims.mentions_seq)
        if kernel is not None:
            raise PassError(
                "stateful", f"{analysis.node_label(node)}: a convolution over the tokens (kernel {kernel}) "
                "mixes each token with its neighbours, and the decode state carries only the last inputs of "
                f"{SUPPORTED_FORM}; this model cannot decode token by token",
                node.name, module_path(node) or "<root>")
    return jobs


def _refuse_scans_over_tokens(gm: fx.GraphModule, analysis: GraphAnalysis) -> None:
    """Refuse a floating-point running sum or product along a dim sized by the tokens (a selective scan's, as
    Mamba2's reference code runs over its chunks): a decode step would restart it at the new token. Integer ones
    (positions counted from a mask) are left to the positions' own handling."""
    for node in gm.graph.nodes:
        if not is_op(node, *SCANS):
            continue
        x, val = tensor_meta(node.args[0]), tensor_meta(node)
        if x is None or val is None or not val.is_floating_point():
            continue
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if not isinstance(dim, int) or not analysis.dims.mentions_seq(x.shape[dim]):
            continue
        raise PassError(
            "stateful", f"{analysis.node_label(node)}: a running {node.target.__name__.split('.')[0]} along a dim "
            "sized by the tokens, as a selective scan's, carries each token "
            f"into the next, and {CARRIED}; this model cannot decode token by token (generate with the original "
            "model, or replace the layer's token mixing with the `mixer` pass)",
            node.name, module_path(node) or "<root>")


def _collect(
    gm: fx.GraphModule, analysis: GraphAnalysis, options: StatefulOptions, windowed: set[str], taken: set[str]
) -> _Jobs:
    """The sites of one graph (the program or a routed block's body) with every check made."""
    from rewrite.mixers import KINDS

    refuse_unrecognized_attention("stateful", analysis, action="carry a KV cache for")
    softmax = []
    for site in analysis.sites:
        layer = analysis.site_label(site)
        _check_softmax_site(site, layer)
        block = analysis.block_of(site)
        window = options.sliding_window if block is not None and block.path in windowed else None
        softmax.append(_SoftmaxJob(site, layer, _unique_key(site.module_path, site.node, taken), window))
    mixers = []
    for node in gm.graph.nodes:
        kind = node.meta.get("rewrite_mixer") if node.op == "call_function" else None
        if kind is None:
            continue
        layer = str(node.kwargs.get("layer") or node.name)
        spec = KINDS.get(kind)
        if spec is not None and not spec.causal:
            raise PassError("stateful", f"{layer}: mixer kind {kind!r} is not causal; decoding needs a causal kind",
                            node.name)
        try:
            kind_step(kind, layer)
        except RewriteError as exc:
            raise PassError("stateful", str(exc), node.name) from exc
        path = str(layer.split("(")[-1].rstrip(")")) if "(" in layer else layer
        mixers.append(_MixerJob(node, kind, layer, _unique_key(path, node, taken)))
    _refuse_scans_over_tokens(gm, analysis)
    return _Jobs(softmax, mixers, _collect_convs(gm, analysis, taken))


def _add_state_input(gm: fx.GraphModule) -> tuple[fx.Node, DecodeSignature]:
    """Append the `decode_state` input; the program switches to flat inputs and outputs."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    info = getattr(graph._codegen, "pytree_info", None)
    signature = DecodeSignature(
        inputs=[n.name for n in placeholders],
        in_spec=info.in_spec if info is not None else None,
        out_spec=info.out_spec if info is not None else None,
    )
    graph._codegen = fx.graph.CodeGen()
    anchor = placeholders[-1] if placeholders else next(iter(graph.nodes))
    with graph.inserting_after(anchor) if placeholders else graph.inserting_before(anchor):
        state = graph.placeholder("decode_state")
    return state, signature


def _continue_positions(graph: fx.Graph, state: fx.Node, masks: list[fx.Node], dims: SymbolicDims) -> list[str]:
    """Offset every integer `arange` over the sequence length that feeds more than masks."""
    mask_side = ancestors(masks)
    moved = []
    for node in list(graph.nodes):
        if not is_op(node, *_ARANGE):
            continue
        val = tensor_meta(node)
        start = node.args[0] if node.target is not aten.arange.default else 0
        end = node.args[0] if node.target is aten.arange.default else node.args[1]
        if val is None or val.is_floating_point() or not isinstance(end, fx.Node) or start != 0:
            continue
        if dims.role_of(end.meta.get("val")) != "seq":
            continue
        users = [u for u in node.users if u not in mask_side]
        if not users:
            continue
        with graph.inserting_after(node):
            shifted = graph.call_function(continued_positions, (state, node))
        shifted.meta = dict(node.meta)
        for user in users:
            user.replace_input_with(node, shifted)
        moved.append(node.name)
    return moved


def _thread(graph: fx.Graph, state: fx.Node, jobs: _Jobs) -> tuple[list[str], list[fx.Node]]:
    """Replace the sites of `graph` by stateful ones reading `state`; returns (what changed, the masks they read)."""
    changed, masks = [], []
    for job in jobs.softmax:
        site = job.site
        k, v = site.kv_repeat_source if site.kv_repeat_source is not None else (site.k, site.v)
        kwargs = {"site": job.key, "scale": site.scale, "layer": job.layer}
        if job.window is not None:
            kwargs["window"] = job.window
        if site.mask_negated:
            kwargs["mask_negated"] = True
        with graph.inserting_before(site.node):
            new = graph.call_function(stateful_attention, (state, site.q, k, v, site.mask), kwargs)
        new.meta = dict(site.node.meta)
        new.meta["rewrite_stateful"] = "kv_cache"
        site.node.replace_all_uses_with(new)
        erase_unused(graph, [site.node, *site.chain])
        if isinstance(site.mask, fx.Node):
            masks.append(site.mask)
        changed.append(f"{job.layer}: kv cache" + (f" (window {job.window})" if job.window else ""))
    from rewrite.mixers.transfer import TEACHER_KWARG  # loaded on first use, as the mixers are

    teachers: list[fx.Node] = []
    for job in jobs.mixers:
        node = job.node
        # decoding records no attention transfer: the teacher's rotated q / k (rope: drop) need not be computed
        kwargs = {"site": job.key, "kind": job.kind, **{k: v for k, v in node.kwargs.items() if k != TEACHER_KWARG}}
        teachers += [t for t in node.kwargs.get(TEACHER_KWARG) or () if isinstance(t, fx.Node)]
        with graph.inserting_before(node):
            new = graph.call_function(stateful_mixer, (state, *node.args), kwargs)
        new.meta = dict(node.meta)
        new.meta["rewrite_stateful"] = f"{job.kind} state"
        if isinstance(node.kwargs.get("mask"), fx.Node):
            masks.append(node.kwargs["mask"])
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        changed.append(f"{job.layer}: {job.kind} state")
    erase_unused_computation(graph, teachers)  # with the metadata asserts that would keep the rotation alive
    for job in jobs.convs:
        conv = job.conv
        with graph.inserting_before(conv.cut):
            new = graph.call_function(stateful_conv, (state, conv.x, conv.weight, conv.bias), {"site": job.key})
        new.meta = dict(conv.cut.meta)
        new.meta["rewrite_stateful"] = "conv state"
        conv.cut.replace_all_uses_with(new)
        erase_unused(graph, [conv.cut, conv.cut.args[0]])
        changed.append(f"{job.layer}: conv state ({_last_inputs(conv)})")
    return changed, masks


@dataclass
class _Body:
    """A routed block and the sites of its body."""

    call: RoutedCall
    analysis: GraphAnalysis
    jobs: _Jobs


def _thread_body(body: _Body, state: fx.Node) -> tuple[list[str], list[str], list[fx.Node]]:
    """Hand the state to a routed block (following its running rows) and thread its body's sites.

    Returns (what changed, positions moved inside the body, the outer values the body's masks come from).
    """
    if not body.jobs.softmax and not body.jobs.mixers and not body.jobs.convs:
        return [], [], []
    inner = add_block_input(body.call, state, "decode_state", InputRule("rows"))
    module = body.call.block.body
    changed, masks = _thread(module.graph, inner, body.jobs)
    moved = _continue_positions(module.graph, inner, masks, body.analysis.dims)
    outer = [outer_value(body.call, n) for n in ancestors(masks) if n.op == "placeholder"]
    eliminate_dead_code(module.graph)
    module.graph.lint()
    module.recompile()
    return changed, moved, [n for n in outer if isinstance(n, fx.Node)]


@register_pass
class Stateful(GraphPass):
    """Thread KV caches and recurrent states through the graph (see the module docstring)."""

    name = "stateful"
    summary = "thread KV caches / recurrent states through the graph so one program prefills and decodes"
    Options = StatefulOptions

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        options: StatefulOptions = self.options
        options.validate(self.where(ctx))
        result = PassResult(self.name)
        analysis = ctx.analysis()
        _check_no_hidden_graphs(gm)
        try:
            calls = routed_calls(gm)
        except ValueError as exc:
            raise PassError("stateful", str(exc)) from exc
        for call in calls:
            _check_routed(call)
        windowed = _windowed_blocks(options, _block_paths(analysis, calls), self.where(ctx))
        taken: set[str] = set()
        jobs = _collect(gm, analysis, options, windowed, taken)
        bodies = []
        for call in calls:
            body_analysis = analyze(call.block.body)
            bodies.append(_Body(call, body_analysis, _collect(call.block.body, body_analysis, options, windowed, taken)))
        every_softmax = jobs.softmax + [j for b in bodies for j in b.jobs.softmax]
        every_mixer = jobs.mixers + [j for b in bodies for j in b.jobs.mixers]
        every_conv = jobs.convs + [j for b in bodies for j in b.jobs.convs]
        result.matched = len(every_softmax) + len(every_mixer) + len(every_conv)
        if not options.thread:
            result.messages.extend(
                f"{j.layer}: can decode with a KV cache" + (f" (window {j.window})" if j.window else "")
                for j in every_softmax
            )
            result.messages.extend(f"{j.layer}: can decode with a {j.kind} state" for j in every_mixer)
            result.messages.extend(f"{j.layer}: can decode with a conv state ({_last_inputs(j.conv)})"
                                   for j in every_conv)
            result.messages.extend(
                f"{c.layer}: routed; decodes with the decision made at prefill, its state kept for the sequences "
                "that run it" for c in calls
            )
            return result
        if not result.matched:
            return result
        state, signature = _add_state_input(gm)
        result.changed, masks = _thread(gm.graph, state, jobs)
        moved_in_bodies = []
        for body in bodies:
            changed, body_moved, body_masks = _thread_body(body, state)
            result.changed.extend(changed)
            moved_in_bodies.extend(body_moved)
            masks.extend(body_masks)
            replace_route(body.call, held_route, state)
            result.changed.append(f"{body.call.layer}: routed; decision made at prefill and held")
        moved = _continue_positions(gm.graph, state, masks, analysis.dims) + moved_in_bodies
        for call in calls:  # a decode program reads no block's input after it: its rows are written in place
            call.block.writes_hidden = hidden_free_after(call)
        signature.positions_in_graph = moved
        signature.routed_layers = [c.layer for c in calls]
        signature.slot_mask = any(j.window is None for j in every_softmax)
        gm.meta["decode"] = signature
        if not signature.slot_mask:
            result.messages.append("no full softmax KV cache: the decode state keeps no per-token memory")
        if moved:
            result.messages.append(f"positions computed in the graph continue from the state: {', '.join(moved)}")
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        ctx.invalidate()
        return result
