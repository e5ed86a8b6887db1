"""Pass `sequence_parallel`: split one long sequence over the ranks of a group and insert the collectives.

After this pass the module runs on ONE rank's shard of the sequence (`rewrite.distributed.shard_inputs`
cuts the inputs) and every rank of the group calls it together. The pass rewrites:

- every softmax attention site into `sp_attention` (`ulysses` all-to-all, `ring` with online
  softmax, or `ulysses_ring`: Ulysses over inner groups of `ulysses_size` ranks, ring across them);
  k / v are taken before GQA repetition;
- every linear mixer call (from the `mixer` pass, which must run first) into `sp_mixer`, whose
  linear-attention / delta-rule / short-conv kernels run over the whole sequence (`lasp2` or
  `allscan` for the states, halo exchange for convs);
- every causal depthwise conv over the tokens (LFM2's short convs) into `sp_causal_conv`, which reads the K-1
  inputs before the shard from the rank holding them (a conv over the tokens of any other form is refused);
- every `arange` over the sequence length into the rank's global positions, and every slice
  [0, seq) of a model buffer (position ids, rotary tables) into the rank's rows, so RoPE, absolute
  position embeddings and the masks built from them see global positions.

`strategy` names one strategy (for the family it serves; the other family gets `auto`), `auto`,
or a mapping {softmax: ..., linear: ...}. `auto` picks per layer from `rewrite.distributed.cost`.
Position ids passed in by the caller must already be global (`shard_inputs` does that).
With `packed` (an input name such as `position_ids`, restarting at 0 per sequence) the split attention
and mixers receive that input and keep attention and linear states inside each packed sequence.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from rewrite.analysis import SEQ, AttentionSite, GraphAnalysis
from rewrite.analysis.causal_conv import SUPPORTED_FORM, causal_conv_over_sequence, kernel_over_tokens
from rewrite.analysis.graph_utils import ancestors, descendants, erase_unused
from rewrite.analysis.nodes import is_op, module_path, op_name, state_name, tensor_meta
from rewrite.analysis.shapes import to_expr
from rewrite.cost_model import NodeCost, Shapes, register_cost
from rewrite.distributed import cost
from rewrite.distributed.graph_functions import sp_attention, sp_causal_conv, sp_mixer, sp_positions, sp_take
from rewrite.distributed.groups import group_size_if_known
from rewrite.distributed.layout import LAYOUTS
from rewrite.distributed.softmax_attention import (
    check_ulysses,
    check_ulysses_ring,
    default_inner_size,
    ulysses_group_sizes,
    ulysses_ring_sizes,
)
from rewrite.distributed.state_prefix import LINEAR_STRATEGIES
from rewrite.errors import PassError, PlanError
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

aten = torch.ops.aten

SOFTMAX_STRATEGIES = ("ulysses", "ring", "ulysses_ring")
STRATEGIES = ["auto", *SOFTMAX_STRATEGIES, *LINEAR_STRATEGIES]
SUPPORTED_KINDS = ("linear", "retention", "gla", "bidirectional", "gated_deltanet", "mamba2", "lawcat")
"""Mixer kinds whose tokens mix only through kernels with a sequence-parallel form."""
PACKED_KINDS = ("linear", "retention", "gla")
"""Mixer kinds with a sequence-parallel form for packed sequences (causal linear attention)."""


@dataclass
class SequenceParallelOptions:
    """Options of the `sequence_parallel` pass."""

    strategy: Any = field(
        default="auto",
        metadata={
            "help": "auto, one of ulysses / ring / ulysses_ring (softmax layers) / lasp2 / allscan (linear layers), or "
            "{softmax: ..., linear: ...}; a family not named gets auto",
        },
    )
    group: str = field(
        default="world",
        metadata={"help": "sequence group: 'world' (torch.distributed's default group) or a name bound with "
                  "rewrite.distributed.register_group (a process group or a DeviceMesh dimension)"},
    )
    layout: str = field(
        default="contiguous",
        metadata={"help": "shard layout: contiguous, or zigzag (2 chunks per rank, balances causal ring attention)",
                  "choices": list(LAYOUTS)},
    )
    group_size: int | None = field(
        default=None,
        metadata={"help": "ranks in the group, for checks and auto when the group is not initialised yet"},
    )
    scan_blocks: int = field(default=4, metadata={"help": "allscan: blocks each state is pipelined in (>= 1)"})
    ulysses_size: int | None = field(
        default=None,
        metadata={"help": "ulysses_ring: ranks of each inner Ulysses group (divides the group size and fits the "
                  "heads; the ring runs over group size / ulysses_size ranks); default: the largest valid size below "
                  "the group size. With auto, the only inner size considered"},
    )
    packed: str | None = field(
        default=None,
        metadata={"help": "name of the input holding each token's position in its own sequence in a packed row "
                  "(e.g. position_ids, restarting at 0 at each sequence start); attention and linear states then "
                  "stay inside each sequence, sequences may cross rank boundaries"},
    )
    expected_seq: int = field(
        default=32768, metadata={"help": "auto: global sequence length the choice is made for"}
    )
    link_gb_per_s: float = field(default=100.0, metadata={"help": "auto: link bandwidth per rank, GB/s"})
    device_tflops: float = field(default=400.0, metadata={"help": "auto: attention throughput per rank, TFLOP/s"})
    check_masks: bool = field(
        default=True, metadata={"help": "check in eager mode that each mask is causal / key padding"}
    )

    def strategies(self, where: str = "sequence_parallel") -> dict[str, str]:
        """{'softmax': ..., 'linear': ...} from `strategy`; a PlanError names the field under `where`."""
        where = f"{where}.strategy"
        s = self.strategy
        if isinstance(s, dict):
            unknown = set(s) - {"softmax", "linear"}
            if unknown:
                raise PlanError(where, f"unknown families {sorted(unknown)}", ["softmax", "linear"])
            out = {"softmax": s.get("softmax", "auto"), "linear": s.get("linear", "auto")}
        elif isinstance(s, str):
            if s not in STRATEGIES:
                raise PlanError(where, f"unknown strategy {s!r}", STRATEGIES)
            out = {"softmax": "auto", "linear": "auto"}
            if s in SOFTMAX_STRATEGIES:
                out["softmax"] = s
            elif s in LINEAR_STRATEGIES:
                out["linear"] = s
        else:
            raise PlanError(where, f"must be a strategy name or a mapping, got {s!r}", STRATEGIES)
        if out["softmax"] not in ("auto", *SOFTMAX_STRATEGIES):
            raise PlanError(f"{where}.softmax", f"unknown strategy {out['softmax']!r}", ["auto", *SOFTMAX_STRATEGIES])
        if out["linear"] not in ("auto", *LINEAR_STRATEGIES):
            raise PlanError(f"{where}.linear", f"unknown strategy {out['linear']!r}", ["auto", *LINEAR_STRATEGIES])
        return out

    def validate(self, where: str = "sequence_parallel") -> None:
        """Raise PlanError naming the first bad field."""
        chosen = self.strategies(where)
        if self.layout not in LAYOUTS:
            raise PlanError(f"{where}.layout", f"unknown layout {self.layout!r}", list(LAYOUTS))
        if chosen["linear"] == "allscan" and self.layout != "contiguous":
            raise PlanError(f"{where}.strategy", "allscan scans the ranks in order and needs layout 'contiguous'",
                            ["lasp2 (any layout)", "allscan with layout contiguous"])
        if not isinstance(self.group, str) or not self.group:
            raise PlanError(f"{where}.group", f"must be a group name, got {self.group!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise PlanError(f"{where}.group_size", f"must be an int >= 1, got {self.group_size!r}")
        if self.ulysses_size is not None and (not isinstance(self.ulysses_size, int) or self.ulysses_size < 1):
            raise PlanError(f"{where}.ulysses_size", f"must be an int >= 1, got {self.ulysses_size!r}")
        if self.packed is not None and (not isinstance(self.packed, str) or not self.packed):
            raise PlanError(f"{where}.packed", f"must be an input name, got {self.packed!r}")
        if not isinstance(self.scan_blocks, int) or self.scan_blocks < 1:
            raise PlanError(f"{where}.scan_blocks", f"must be an int >= 1, got {self.scan_blocks!r}")
        for name in ("expected_seq", "link_gb_per_s", "device_tflops"):
            if not getattr(self, name) > 0:
                raise PlanError(f"{where}.{name}", f"must be > 0, got {getattr(self, name)!r}")


def _is_seq(analysis: GraphAnalysis, x: Any) -> bool:
    if isinstance(x, fx.Node):
        x = x.meta.get("val")
    if not isinstance(x, int | torch.SymInt):
        return False
    return analysis.dims.expr(x) == SEQ


def _mask_ancestors(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes an attention mask is computed from (masks of the split attention and mixers), masks included."""
    masks = []
    for node in gm.graph.nodes:
        if node.target is sp_attention and len(node.args) > 3:
            masks.append(node.args[3])
        elif node.target is sp_mixer:
            masks.append(node.kwargs.get("mask"))
    return ancestors(masks)


_ALONG_DIM = {  # ops that read along one dim (argument index of the dim)
    aten.select.int: 1, aten.index_select.default: 1, aten.cumsum.default: 1, aten.cumprod.default: 1,
    aten.flip.default: 1, aten.roll.default: 2, aten.sum.dim_IntList: 1, aten.mean.dim: 1, aten.amax.default: 1,
    aten.amin.default: 1, aten.max.dim: 1, aten.min.dim: 1, aten.argmax.default: 1, aten.logsumexp.default: 1,
}


def _shard_local_reads(gm: fx.GraphModule, analysis: GraphAnalysis) -> list[str]:
    """Nodes that select or reduce along the sequence dim of an activation: on a split sequence they see
    only the rank's shard (a pooler taking token 0, a mean over tokens), so their results are per shard.
    Nodes that only build attention masks are left out: masks are local by design."""
    notes = []
    to_masks = _mask_ancestors(gm)
    for node in gm.graph.nodes:
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        if node in to_masks and all(u in to_masks or u.target in (sp_attention, sp_mixer) for u in node.users):
            continue  # masks stay local by design (e.g. packed-sequence boundaries found from the shard's positions)
        src = node.args[0]
        val = tensor_meta(src)
        if val is None or state_name(src) is not None:
            continue
        if is_op(node, aten.slice.Tensor):
            dim, start, end = (list(node.args[1:]) + [0, 0, None, None])[:3]
            full = start in (0, None) and (end is None or (isinstance(end, int) and end >= 2**62))
            if full:
                continue
        elif node.target in _ALONG_DIM:
            index = _ALONG_DIM[node.target]
            dim = node.args[index] if len(node.args) > index else node.kwargs.get("dim")
        else:
            continue
        dims = dim if isinstance(dim, list | tuple) else [dim]
        if not all(isinstance(d, int) for d in dims):
            continue
        if any(analysis.dims.expr(val.shape[d % val.dim()]) == SEQ for d in dims if val.dim()):
            notes.append(f"node {node.name} ({module_path(node) or '<root>'}: {op_name(node)}) reads along the "
                         "sequence dim; under sequence parallelism it sees only each rank's shard, so its result "
                         "is per shard (e.g. a pooler's token 0 is rank 0's)")
    return notes


def _mixer_kinds() -> dict[Any, str]:
    from rewrite.mixers import KINDS

    return {kind.fn: name for name, kind in KINDS.items()}


@register_cost(sp_attention)
def _split_attention_cost(node: fx.Node, shapes: Shapes) -> NodeCost:
    """One rank's attention: its queries (the shard, `seq` long) against all P * seq keys; halved when causal.

    P is the group size known when the pass ran (node meta); without it the rank's share is left uncounted.
    """
    size = node.meta.get("rewrite_sequence_parallel_size")
    q, v = tensor_meta(node.args[0]), tensor_meta(node.args[2])
    if size is None or q is None or v is None:
        return NodeCost()
    length = shapes.expr(q.shape[-2])
    batch_heads = shapes.numel(q) / shapes.expr(q.shape[-1]) / length
    flops = 2 * batch_heads * length * (size * length) * (shapes.expr(q.shape[-1]) + shapes.expr(v.shape[-1]))
    return NodeCost(flops=flops / 2 if node.kwargs.get("causal") else flops)


@register_pass
class SequenceParallel(GraphPass):
    """Split the sequence over a group and insert each mixer's collectives (see the module docstring)."""

    name = "sequence_parallel"
    summary = "shard the sequence over a process group: Ulysses / ring for softmax, LASP-2 / all-scan for linear mixers"
    Options = SequenceParallelOptions

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        options: SequenceParallelOptions = self.options
        self.field = self.where(ctx)
        options.validate(self.field)
        self.chosen = options.strategies(self.field)
        self.size = options.group_size or group_size_if_known(options.group)
        result = PassResult(self.name)
        for node in gm.graph.nodes:
            if getattr(node.target, "__module__", "") == "rewrite.varlen.runtime":
                raise PassError(self.name, "the graph holds packed variable-length sequences (the varlen pass); "
                                "the varlen and sequence_parallel passes do not combine: run sequence_parallel "
                                "without varlen on packed rows (option packed: position_ids)", node.name,
                                module_path(node))
        self.positions = self._packed_input(gm)
        analysis = ctx.analysis()
        refuse_unrecognized_attention(self.name, analysis, action="split")
        mixer_nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _mixer_kinds()]
        jobs = [self._plan_site(gm, site, analysis) for site in analysis.sites]
        linear_jobs = [self._plan_mixer(n, analysis) for n in mixer_nodes]
        for site, layer, (strategy, inner), why in jobs:  # every site is checked before any is changed
            self._rewrite_site(gm, site, layer, strategy, inner)
            result.matched += 1
            shown = strategy
            if inner is not None:
                shown += f" ({inner} x {self.size // inner})" if self.size is not None else f" (Ulysses size {inner})"
            result.changed.append(f"{layer}: softmax attention -> {shown}")
            result.messages.append(f"{layer}: {why}")
        for node, layer, kind, strategy, why in linear_jobs:
            self._rewrite_mixer(gm, node, layer, kind, strategy)
            result.matched += 1
            result.changed.append(f"{layer}: {kind} -> {strategy}")
            result.messages.append(f"{layer}: {why}")
        for layer in self._rewrite_convs(gm, analysis):
            result.matched += 1
            result.changed.append(f"{layer}: causal conv -> halo from the rank before")
        positions = self._rewrite_positions(gm, analysis)
        if positions:
            result.messages.append(f"positions offset per shard at {', '.join(positions)}")
        for note in _shard_local_reads(gm, analysis):
            warnings.warn(f"sequence_parallel: {note}", stacklevel=2)
            result.messages.append(note)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        ctx.invalidate()
        return result

    # --- softmax attention ----------------------------------------------------------------------

    def _plan_site(self, gm: fx.GraphModule, site: AttentionSite, analysis: GraphAnalysis):
        layer = analysis.block_label(site.node, site.module_path)
        if site.problem is not None:
            raise PassError(self.name, f"{layer}: cannot split this attention: {site.problem}", site.name,
                            site.module_path)
        refuse_mask_bias(self.name, site, layer, action="split")
        refuse_chunked_attention(self.name, site, layer, action="split",
                                 remedy=". Leave `sequence_parallel` out of the plan for this model")
        refuse_cached_keys(self.name, site, layer, action="split")
        q, k = tensor_meta(site.q), tensor_meta(site.k)
        if q is None or k is None or site.q_heads is None or site.kv_heads is None or site.head_dim is None:
            raise PassError(self.name, f"{layer}: head counts or head dim are not known", site.name, site.module_path)
        if to_expr(q.shape[-2]) != to_expr(k.shape[-2]):
            raise PassError(self.name, f"{layer}: cross-attention (queries and keys of different lengths) cannot be "
                            "split along one sequence", site.name, site.module_path)
        if site.dropout_p:
            raise PassError(self.name, f"{layer}: attention dropout p={site.dropout_p} is not supported under "
                            "sequence parallelism (evaluate, or set the model's attention dropout to 0)",
                            site.name, site.module_path)
        if site.mask is not None and not site.is_causal and site.mask_is_causal is None:
            raise PassError(self.name, f"{layer}: cannot tell whether the attention mask is causal (it could not "
                            "be evaluated on the example inputs)", site.name, site.module_path)
        v = tensor_meta(site.v)
        shape = cost.AttentionShape(site.q_heads, site.kv_heads, site.head_dim,
                                    int(v.shape[-1]) if v is not None else site.head_dim,
                                    q.element_size(), site.causal)
        strategy, inner, why = self._softmax_strategy(shape, layer, site)
        return site, layer, (strategy, inner), why

    def _softmax_strategy(self, shape: cost.AttentionShape, layer: str,
                          site: AttentionSite) -> tuple[str, int | None, str]:
        """(strategy, Ulysses size of ulysses_ring or None, why) for one softmax layer."""
        options: SequenceParallelOptions = self.options
        wanted = self.chosen["softmax"]
        size = self.size
        if wanted == "ulysses":
            if size is not None:
                try:
                    check_ulysses(shape.heads, shape.kv_heads, size, layer)
                except Exception as error:
                    raise PassError(self.name, str(error), site.name, site.module_path) from None
            return "ulysses", None, "ulysses (asked)"
        if wanted == "ring":
            return "ring", None, "ring (asked)"
        if wanted == "ulysses_ring":
            if size is None:
                return "ulysses_ring", options.ulysses_size, "ulysses_ring (asked; sizes checked at run time)"
            inner = options.ulysses_size or default_inner_size(shape.heads, shape.kv_heads, size)
            try:
                check_ulysses_ring(shape.heads, shape.kv_heads, size, inner, layer)
            except Exception as error:
                raise PassError(self.name, str(error), site.name, site.module_path) from None
            return "ulysses_ring", inner, f"ulysses_ring (asked): {inner} x {size // inner}"
        if size is None:
            raise PlanError(f"{self.field}.group_size", "strategy auto needs the group size: initialise "
                            "torch.distributed before optimizing, or set group_size")
        ok = size in ulysses_group_sizes(shape.heads, shape.kv_heads)
        inner_sizes: tuple[int, ...] = ()
        if not ok:  # Ulysses alone cannot split the heads over the group: try heads x ring
            valid = [u for u in ulysses_ring_sizes(shape.heads, shape.kv_heads, size) if 1 < u < size]
            if options.ulysses_size is not None:
                valid = [u for u in valid if u == options.ulysses_size]
            inner_sizes = tuple(valid)
        choice = cost.choose_softmax(shape, size, options.expected_seq, 1, link_bytes_per_s=options.link_gb_per_s * 1e9,
                                     flops_per_s=options.device_tflops * 1e12, ulysses_ok=ok, inner_sizes=inner_sizes)
        return choice.strategy, choice.inner, f"auto at seq {options.expected_seq}, P {size}: {choice.describe()}"

    def _rewrite_site(self, gm: fx.GraphModule, site: AttentionSite, layer: str, strategy: str,
                      inner: int | None) -> None:
        options: SequenceParallelOptions = self.options
        k, v = site.kv_repeat_source if site.kv_repeat_source is not None else (site.k, site.v)
        kwargs: dict[str, Any] = {"causal": site.causal, "scale": site.scale}
        if site.mask is not None and site.mask_negated:
            kwargs["mask_negated"] = True
        if not options.check_masks:
            kwargs["check_mask"] = False
        kwargs.update(strategy=strategy, group=options.group, layout=options.layout, layer=layer)
        if strategy == "ulysses_ring":
            kwargs["inner"] = inner
        if self.positions is not None:
            kwargs["positions"] = self.positions
        with gm.graph.inserting_before(site.node):
            new = gm.graph.call_function(sp_attention, (site.q, k, v, site.mask), kwargs)
        new.meta = dict(site.node.meta)
        new.meta["rewrite_sequence_parallel"] = strategy
        if inner is not None:
            new.meta["rewrite_sequence_parallel_inner"] = inner
        if self.size is not None:
            new.meta["rewrite_sequence_parallel_size"] = self.size
        site.node.replace_all_uses_with(new)
        erase_unused(gm.graph, [site.node, *site.chain])

    # --- linear mixers --------------------------------------------------------------------------

    def _plan_mixer(self, node: fx.Node, analysis: GraphAnalysis):
        options: SequenceParallelOptions = self.options
        kind = _mixer_kinds()[node.target]
        layer = str(node.kwargs.get("layer") or analysis.block_label(node))
        if kind not in SUPPORTED_KINDS:
            raise PassError(self.name, f"{layer}: mixer kind {kind!r} has no sequence-parallel form (it mixes tokens "
                            f"through a sliding window); supported kinds: {', '.join(SUPPORTED_KINDS)}",
                            node.name, module_path(node))
        if self.positions is not None and kind not in PACKED_KINDS:
            raise PassError(self.name, f"{layer}: mixer kind {kind!r} has no sequence-parallel form for packed sequences "
                            f"yet; supported with packed: {', '.join(PACKED_KINDS)}", node.name, module_path(node))
        if self.positions is not None and options.layout != "contiguous":
            raise PlanError(f"{self.field}.layout", "packed sequences through linear mixers need the contiguous "
                            "layout", ["contiguous"])
        wanted = self.chosen["linear"]
        if wanted != "auto":
            return node, layer, kind, wanted, f"{wanted} (asked)"
        if options.layout != "contiguous" or self.size is None:
            reason = "zigzag layout" if options.layout != "contiguous" else "group size unknown"
            return node, layer, kind, "lasp2", f"auto: lasp2 ({reason})"
        k, v = tensor_meta(node.args[1]), tensor_meta(node.args[2])
        kv_heads, key_dim = int(k.shape[1]), int(k.shape[-1])
        value_dim = int(v.shape[-1]) + (1 if node.kwargs.get("normalize") else 0)
        choice = cost.choose_linear(kv_heads, key_dim, value_dim, self.size, 1,
                                    link_bytes_per_s=options.link_gb_per_s * 1e9, blocks=options.scan_blocks,
                                    allscan_ok=True, matrix_transition=kind == "gated_deltanet")
        return node, layer, kind, choice.strategy, f"auto at P {self.size}: {choice.describe()}"

    def _rewrite_mixer(self, gm: fx.GraphModule, node: fx.Node, layer: str, kind: str, strategy: str) -> None:
        options: SequenceParallelOptions = self.options
        kwargs = dict(node.kwargs)
        kwargs.setdefault("layer", layer)
        if not options.check_masks:
            kwargs["check_mask"] = False
        kwargs.update(kind=kind, strategy=strategy, group=options.group, layout=options.layout,
                      scan_blocks=options.scan_blocks)
        if self.positions is not None:
            kwargs["positions"] = self.positions
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(sp_mixer, tuple(node.args), kwargs)
        new.meta = dict(node.meta)
        new.meta["rewrite_sequence_parallel"] = strategy
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)

    # --- convolutions over the tokens -------------------------------------------------------------

    def _rewrite_convs(self, gm: fx.GraphModule, analysis: GraphAnalysis) -> list[str]:
        """Causal depthwise convs over the tokens -> `sp_causal_conv`; any other conv over the tokens is refused."""
        options: SequenceParallelOptions = self.options
        done = []
        for node in list(gm.graph.nodes):
            conv = causal_conv_over_sequence(node, analysis.dims)
            if conv is not None:
                layer = analysis.block_label(node)
                if self.positions is not None:
                    raise PassError(self.name, f"{layer}: a causal conv over the tokens has no sequence-parallel form "
                                    "for packed sequences yet (it would read across a sequence start at a shard's "
                                    "edge); leave `packed` out or the pass out of the plan", node.name,
                                    module_path(node))
                with gm.graph.inserting_before(conv.cut):
                    new = gm.graph.call_function(sp_causal_conv, (conv.x, conv.weight, conv.bias),
                                                 {"group": options.group, "layout": options.layout})
                new.meta = dict(conv.cut.meta)
                new.meta["rewrite_sequence_parallel"] = "halo"
                conv.cut.replace_all_uses_with(new)
                erase_unused(gm.graph, [conv.cut, node])
                done.append(layer)
                continue
            if kernel_over_tokens(node, analysis.dims.mentions_seq) is not None:
                raise PassError(self.name, f"{analysis.block_label(node)}: a convolution over the "
                                "tokens of this form cannot be split along "
                                f"the sequence; supported: {SUPPORTED_FORM}, whose halo comes from the rank before",
                                node.name, module_path(node))
        return done

    # --- packed rows ----------------------------------------------------------------------------

    def _packed_input(self, gm: fx.GraphModule) -> fx.Node | None:
        """The placeholder named by option `packed` (positions restarting per sequence), or None."""
        options: SequenceParallelOptions = self.options
        if options.packed is None:
            return None
        inputs = [n for n in gm.graph.nodes if n.op == "placeholder" and state_name(n) is None]
        for node in inputs:
            if node.name == options.packed or node.target == options.packed:
                return node
        raise PlanError(f"{self.field}.packed", f"the captured program has no input {options.packed!r}; capture "
                        "with it among the example inputs", [str(n.target) for n in inputs])

    # --- positions ------------------------------------------------------------------------------

    def _rewrite_positions(self, gm: fx.GraphModule, analysis: GraphAnalysis) -> list[str]:
        """Give position tensors global positions, except on their way into attention masks.

        Masks stay local (causal over the shard, padding of the shard's keys): the split attention
        and mixers read only which local keys are real, and a model may index the shard's padding
        mask with local positions. Where one computation feeds both a mask and something else (a
        cache position used for RoPE and for the mask), the non-mask consumers get a copy of it
        computed from the global positions.
        """
        options: SequenceParallelOptions = self.options
        where = {"group": options.group, "layout": options.layout}
        to_masks = _mask_ancestors(gm)
        changed = []
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            if is_op(node, aten.arange.default) and len(node.args) == 1 and _is_seq(analysis, node.args[0]):
                make = (sp_positions, (node,))
            elif (is_op(node, aten.arange.start) and len(node.args) == 2 and node.args[0] == 0
                  and _is_seq(analysis, node.args[1])):
                make = (sp_positions, (node,))
            elif (is_op(node, aten.slice.Tensor) and len(node.args) == 4 and isinstance(node.args[0], fx.Node)
                  and state_name(node.args[0]) is not None and node.args[2] in (0, None)
                  and _is_seq(analysis, node.args[3])):
                make = (sp_take, tuple(node.args[i] for i in (0, 1, 3)))
            else:
                continue
            if _give_global_positions(gm.graph, node, make, where, to_masks):
                changed.append(node.name)
        return changed


def _give_global_positions(graph: fx.Graph, source: fx.Node, make: tuple, kwargs: dict, to_masks: set[fx.Node]) -> bool:
    """Feed every consumer of `source` outside `to_masks` from a global-position version of it.

    Nodes between `source` and a mask keep the local values; a node that also feeds a non-mask
    consumer is copied, the copy computed from the global positions. Returns whether anything changed.
    """
    downstream = descendants(source) | {source}
    copies: dict[fx.Node, fx.Node] = {}

    def global_version(node: fx.Node) -> fx.Node:
        if node in copies:
            return copies[node]
        if node is source:
            fn, args = make
            with graph.inserting_after(source):
                new = graph.call_function(fn, args, kwargs)
            new.meta = dict(source.meta)
        else:
            args = {a: global_version(a) for a in node.all_input_nodes if a in downstream}
            with graph.inserting_after(node):
                new = graph.node_copy(node, lambda a: args.get(a, a))
        copies[node] = new
        return new

    edges = [(n, user) for n in downstream if n is source or n in to_masks for user in list(n.users)
             if user not in to_masks and user.target not in (sp_attention, sp_mixer)
             and not (user.op == "call_function" and not user.users)]  # metadata asserts feed nothing
    if source not in to_masks and not edges:
        return False
    for node, user in edges:
        if node is source or node in to_masks:
            user.replace_input_with(node, global_version(node))
    return bool(edges)


__all__ = ["SequenceParallel", "SequenceParallelOptions"]
