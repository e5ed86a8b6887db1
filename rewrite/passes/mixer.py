"""Pass `mixer`: replace softmax attention by a linear mixer, reusing the pretrained q/k/v/o projections.

For every attention site in the selected layers, the attention node (SDPA, canonical
`rewrite.attention`, or an unfused matmul-softmax-matmul chain) becomes one call to a mixer function
from `rewrite.mixers` with the same inputs (k / v before GQA repetition) and an output of the same
shape [B, H, L, Dv]; the q/k/v producers and the output projection stay as they are.

- Kinds (`rewrite.mixers.KINDS`): `linear`, `retention`, `gla`, `gated_deltanet`, `mamba2`,
  `lawcat`, `hybrid_swa`, `sliding_window` (causal) and `bidirectional` (encoders). New parameters
  (decays, gates, convs, a learned `hedgehog` feature map) are registered next to the attention
  module under readable names (`model.layers.3.self_attn.deltanet_beta_bias`).
- Causal sites get the chosen causal kind (`auto`: `gla`); non-causal sites (encoders) get
  `bidirectional`. A causal kind on a non-causal site, or `bidirectional` on a causal one, is an
  error naming the layer.
- Masks: only causal and key-padding masks are carried (see `rewrite.mixers.masks` for the exact
  rule); a mask computed from model parameters (a learned position bias), one the capture's probe saw
  hide earlier keys of a query's own sequence (a window or block pattern the example shows), or one
  built around a window longer than the example is refused here; a packed row's block-diagonal causal
  mask is accepted when a later pass of the plan (`varlen`, `sequence_parallel`) replaces it by
  cu_seqlens and refused otherwise, and any mask is checked again when it is evaluated in eager mode.
- RoPE (option `rope`): `keep` gives the mixer q and k as the site sees them (rotated); `drop` gives
  it the tensors that enter the rotary embedding (after QK-norm where the model normalises first), the
  rotation found structurally (`rewrite.analysis.rotary`) and undone in the graph, while attention
  transfer's teacher still reads the rotated ones (`teacher_qk`). Default: `drop` for `mamba2`
  (Mamba-in-the-Llama), `keep` otherwise. With `drop`, a site whose q / k show no rotary embedding is
  left as it is with a message; one whose rotation is not of the recognised form is an error naming
  the layer.
- Scale: the mixers use the site's softmax scale (1/sqrt(head dim) when the site has none), so with
  identity features and no decay o_t = scale * sum_{s <= t} (q_t . k_s) v_s.
- Cross-attention (queries and keys of different lengths) is left alone and reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from rewrite.analysis import SUPPORTED_FORMS, AttentionSite, Block, GraphAnalysis
from rewrite.analysis.graph_utils import erase_unused, erase_unused_computation, walk_inputs
from rewrite.analysis.mask_probe import PACKED_KEY, SEQUENCE_CAUSAL_KEY, UNSEEN_WINDOW_KEY
from rewrite.analysis.nodes import tensor_meta
from rewrite.analysis.rotary import Rotary, find_rotary, rotary_traces, unrotated
from rewrite.analysis.shapes import to_expr
from rewrite.errors import PassError, PlanError
from rewrite.mixers import (
    KINDS,
    LEARNED_FEATURE_MAPS,
    POSITIVE_FEATURE_MAPS,
    ROPE_CHOICES,
    MixerKind,
    SiteShape,
)
from rewrite.mixers.common import FEATURE_MAPS
from rewrite.mixers.masks import MIXER_LIMIT
from rewrite.mixers.transfer import TEACHER_KWARG
from rewrite.passes import register_pass
from rewrite.passes.base import (
    GraphPass,
    PassContext,
    PassResult,
    chunked_attention,
    refuse_cached_keys,
    refuse_chunked_attention,
    refuse_mask_bias,
    refuse_unrecognized_attention,
)
from rewrite.selectors import Selector, describe_selector_syntax, select_layers_for, validate_selector

KIND_CHOICES = ["auto", *KINDS]
CAUSAL_DEFAULT = "gla"
"""The kind `auto` picks for causal sites (non-causal sites get `bidirectional`)."""



@dataclass
class MixerOptions:
    """Options of the `mixer` pass."""

    kind: str = field(
        default="auto",
        metadata={
            "help": "mixer for the selected layers; auto: gla on causal sites, bidirectional on non-causal ones",
            "choices": KIND_CHOICES,
        },
    )
    layers: Selector = field(
        default="all",
        metadata={"help": f"layers to linearize ({describe_selector_syntax()}); the rest keep softmax"},
    )
    feature_map: str = field(
        default="elu1",
        metadata={
            "help": "phi applied to q and k (elu1 = elu(x) + 1; hedgehog = learned per-head softmax map, "
            "new parameters feature_map_q / feature_map_k)",
            "choices": list(FEATURE_MAPS),
        },
    )
    normalize: bool | None = field(
        default=None,
        metadata={"help": "divide by phi(q) . sum phi(k); default: on for positive feature maps, off for identity"},
    )
    decay_min: float = field(
        default=1 - 2**-5,
        metadata={"help": "retention: initial decay of the fastest-forgetting kv head (0 < decay_min < 1)"},
    )
    decay_max: float = field(
        default=1 - 2**-9,
        metadata={"help": "retention: initial decay of the slowest-forgetting kv head (decay_min <= decay_max < 1)"},
    )
    gate: str = field(
        default="vector",
        metadata={"help": "gla: one gate per key dim (vector) or per head (scalar)", "choices": ["vector", "scalar"]},
    )
    gate_normalizer: float = field(
        default=16.0, metadata={"help": "gla: log-gate = logsigmoid(k) / gate_normalizer (> 0)"}
    )
    window: int = field(
        default=64, metadata={"help": "sliding_window / hybrid_swa: tokens each query sees by softmax (>= 1)"}
    )
    sinks: int = field(
        default=4, metadata={"help": "sliding_window / hybrid_swa: first tokens every query also sees (>= 0)"}
    )
    linear_weight: float = field(
        default=0.1,
        metadata={"help": "hybrid_swa: initial weight of the linear branch beyond the window per head (0 < w < 1)"},
    )
    conv_width: int = field(
        default=4, metadata={"help": "mamba2 / lawcat: taps of the causal short conv (2..8), initialised to identity"}
    )
    beta_init: float = field(
        default=0.5, metadata={"help": "gated_deltanet: initial write strength beta (0 < beta_init < 1)"}
    )
    dt_min: float = field(default=1e-3, metadata={"help": "mamba2: smallest initial step dt (> 0)"})
    dt_max: float = field(default=0.1, metadata={"help": "mamba2: largest initial step dt (>= dt_min)"})
    a_min: float = field(default=1.0, metadata={"help": "mamba2: smallest initial decay rate -A (> 0)"})
    a_max: float = field(default=16.0, metadata={"help": "mamba2: largest initial decay rate -A (>= a_min)"})
    rope: str | None = field(
        default=None,
        metadata={
            "help": "keep: the mixer reads q and k after the rotary embedding, as the site sees them; drop: "
            "before it (the rotation undone in the graph); default: drop for mamba2, keep for the other kinds",
        },
    )
    check_masks: bool = field(
        default=True,
        metadata={"help": "refuse a layer whose mask is not causal / key padding (a window or block pattern), when "
                          "the pass runs and on each eager call; false: linearize it over the whole prefix, its "
                          "window dropped (varlen and stateful then do the same)"},
    )

    def validate(self, where: str = "mixer") -> None:
        """Raise PlanError naming the first bad field."""
        if self.kind not in KIND_CHOICES:
            raise PlanError(f"{where}.kind", f"unknown mixer kind {self.kind!r}", KIND_CHOICES)
        if self.feature_map not in FEATURE_MAPS:
            raise PlanError(f"{where}.feature_map", f"unknown feature map {self.feature_map!r}", list(FEATURE_MAPS))
        validate_selector(self.layers, f"{where}.layers")
        if self.normalize and self.feature_map not in POSITIVE_FEATURE_MAPS:
            raise PlanError(
                f"{where}.normalize",
                f"normalising needs a positive feature map (the denominator of {self.feature_map!r} can be 0)",
                list(POSITIVE_FEATURE_MAPS),
            )
        if not 0 < self.decay_min < 1:
            raise PlanError(f"{where}.decay_min", f"must lie in (0, 1), got {self.decay_min!r}")
        if not self.decay_min <= self.decay_max < 1:
            raise PlanError(f"{where}.decay_max", f"must lie in [decay_min, 1), got {self.decay_max!r}")
        if self.rope is not None and self.rope not in ROPE_CHOICES:
            raise PlanError(f"{where}.rope", f"unknown rope handling {self.rope!r}", ROPE_CHOICES)
        if self.gate not in ("vector", "scalar"):
            raise PlanError(f"{where}.gate", f"unknown gate {self.gate!r}", ["vector", "scalar"])
        if not self.gate_normalizer > 0:
            raise PlanError(f"{where}.gate_normalizer", f"must be > 0, got {self.gate_normalizer!r}")
        self._validate_new_kinds(where)

    def _validate_new_kinds(self, where: str) -> None:
        def is_int(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if not is_int(self.window) or self.window < 1:
            raise PlanError(f"{where}.window", f"must be an int >= 1, got {self.window!r}")
        if not is_int(self.sinks) or self.sinks < 0:
            raise PlanError(f"{where}.sinks", f"must be an int >= 0, got {self.sinks!r}")
        if not is_int(self.conv_width) or not 2 <= self.conv_width <= 8:
            raise PlanError(f"{where}.conv_width", f"must be an int in 2..8, got {self.conv_width!r}")
        for name in ("linear_weight", "beta_init"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 < value < 1:
                raise PlanError(f"{where}.{name}", f"must lie in (0, 1), got {value!r}")
        for low, high in (("dt_min", "dt_max"), ("a_min", "a_max")):
            lo, hi = getattr(self, low), getattr(self, high)
            if not isinstance(lo, int | float) or not lo > 0:
                raise PlanError(f"{where}.{low}", f"must be > 0, got {lo!r}")
            if not isinstance(hi, int | float) or not hi >= lo:
                raise PlanError(f"{where}.{high}", f"must be >= {low} ({lo}), got {hi!r}")
        kind = KINDS.get(self.kind)
        if kind is None:
            return
        if not kind.feature_maps and self.feature_map in LEARNED_FEATURE_MAPS:
            users = [k for k, v in KINDS.items() if v.feature_maps]
            raise PlanError(f"{where}.feature_map", f"kind {self.kind!r} takes no feature map", users)
        if self.kind == "hybrid_swa" and self.feature_map not in POSITIVE_FEATURE_MAPS:
            raise PlanError(
                f"{where}.feature_map",
                "hybrid_swa normalises its softmax and linear branches together, which needs a positive feature map",
                list(POSITIVE_FEATURE_MAPS),
            )
        if not kind.normalizable and self.normalize:
            users = [k for k, v in KINDS.items() if v.normalizable]
            raise PlanError(f"{where}.normalize", f"kind {self.kind!r} has no normaliser to turn on", users)

    @property
    def normalized(self) -> bool:
        """Whether the mixers normalise (the `normalize` option resolved)."""
        return self.feature_map in POSITIVE_FEATURE_MAPS if self.normalize is None else bool(self.normalize)


@dataclass
class _Job:
    """One site to replace, with what the pass decided for it."""

    site: AttentionSite
    layer: str
    kind: MixerKind
    shape: SiteShape
    rotary: tuple[Rotary, Rotary] | None = None  # (q's, k's) rotations to undo (rope: drop)


def _selected_blocks(options: MixerOptions, analysis: GraphAnalysis, where: str) -> list[Block]:
    """The blocks the `layers` selector (the plan field `where`.layers) chooses."""
    paths = [b.path for b in analysis.blocks]
    return [analysis.blocks[i] for i in select_layers_for(options.layers, paths, f"{where}.layers")]


def _reads_parameter(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The name of a parameter `node` is computed from, if any (a learned bias)."""
    for cur in walk_inputs([node]):
        if cur.op == "get_attr":
            try:
                value = gm.get_parameter(str(cur.target))
            except AttributeError:
                value = None
            if value is not None:
                return str(cur.target)
        if cur.op == "placeholder" and isinstance(cur.meta.get("state_name"), str):
            if isinstance(tensor_meta(cur), torch.nn.Parameter) or cur.meta.get("state_kind") == "parameter":
                return cur.meta["state_name"]
    return None


def _check_block(block: Block, analysis: GraphAnalysis) -> None:
    """Refuse softmaxes that mix tokens in a selected block but match no attention form (softcapping,
    ALiBi, relative position biases): leaving them would leave that attention un-rewritten."""
    refuse_unrecognized_attention(
        "mixer", analysis, block.nodes, action="linearize", layer=f"layer {block.index} ({block.path})"
    )


def _check_something_matched(gm: fx.GraphModule, options: MixerOptions) -> None:
    """Refuse a mixer entry that found no attention in its layers, unless mixers are what is there
    (an earlier `mixer` entry of the plan replaced those sites)."""
    if any(n.meta.get("rewrite_mixer") for n in gm.graph.nodes):
        return
    raise PassError(
        "mixer",
        f"found no attention to replace in the selected layers ({options.layers!r}) of {type(gm).__name__}. "
        f"Supported attention forms: {SUPPORTED_FORMS}",
    )


def _site_shape(site: AttentionSite, layer: str) -> SiteShape:
    q = tensor_meta(site.q)
    if q is None or site.q_heads is None or site.kv_heads is None or site.head_dim is None:
        raise PassError("mixer", f"{layer}: head counts or head dim are not known", site.name, site.module_path)
    v = tensor_meta(site.v)
    value_dim = int(v.shape[-1]) if v is not None and v.dim() >= 1 else None
    return SiteShape(site.q_heads, site.kv_heads, site.head_dim, q.dtype, q.device, value_dim)


def _is_cross_attention(site: AttentionSite) -> bool:
    q, k = tensor_meta(site.q), tensor_meta(site.k)
    if q is None or k is None or q.dim() < 2 or k.dim() < 2:
        return False
    return to_expr(q.shape[-2]) != to_expr(k.shape[-2])


def _choose_kind(options: MixerOptions, site: AttentionSite, layer: str) -> MixerKind:
    refuse_mask_bias("mixer", site, layer, action="linearize")
    if site.mask is not None and not site.is_causal and site.mask_is_causal is None:
        raise PassError(
            "mixer",
            f"{layer}: cannot tell whether the attention mask is causal (it could not be evaluated on "
            "the example inputs), so neither a causal nor a bidirectional mixer is known to be right",
            site.name,
            site.module_path,
        )
    causal = site.causal
    name = options.kind
    if name == "auto":
        name = CAUSAL_DEFAULT if causal else "bidirectional"
    kind = KINDS[name]
    if kind.causal and not causal:
        raise PassError(
            "mixer",
            f"{layer}: attention is not causal (every token sees the whole sequence) but kind {name!r} is "
            "causal; use kind 'bidirectional' or 'auto' for encoder layers, or leave this layer out of `layers`",
            site.name,
            site.module_path,
        )
    if causal and not kind.causal:
        raise PassError(
            "mixer",
            f"{layer}: attention is causal but kind {name!r} lets every token see future tokens; "
            f"use a causal kind ({', '.join(k for k, v in KINDS.items() if v.causal)})",
            site.name,
            site.module_path,
        )
    return kind


PACKING_CARRIERS = ("varlen", "sequence_parallel")
"""Passes that replace a packed row's block-diagonal mask by sequence boundaries (cu_seqlens) for the mixers."""


def _chunk_remedy(analysis: GraphAnalysis) -> str:
    """What to do about a chunked layer: leave it out with the `layers` selector (naming the layers whose attention is
    not chunked, when there are some), or drop its chunks with `check_masks: false`."""
    plain = [i for i, block in enumerate(analysis.blocks) if block.sites and not any(
        chunked_attention(s) for s in block.sites)]
    keep = f" (here the layers without chunked attention: `layers: {plain}`)" if plain else ""
    return (f". Leave this layer out with the mixer's `layers` selector{keep}, or set `check_masks: false` to "
            "linearize it over the whole prefix (its chunks dropped)")


def _check_site(
    gm: fx.GraphModule, site: AttentionSite, layer: str, check_masks: bool = True, packing_carried: bool = False,
    chunk_remedy: str = "",
) -> None:
    if site.problem is not None:
        raise PassError("mixer", f"{layer}: cannot replace this attention: {site.problem}", site.name, site.module_path)
    mask = site.mask
    if mask is None:
        return
    if not isinstance(mask, fx.Node):
        raise PassError("mixer", f"{layer}: attention mask {mask!r} is not a tensor", site.name, site.module_path)
    val = tensor_meta(mask)
    if val is not None and val.is_floating_point():
        param = _reads_parameter(gm, mask)
        if param is not None:
            raise PassError(
                "mixer",
                f"{layer}: the additive attention mask is computed from the parameter {param!r} (a learned "
                "position bias such as ALiBi or a relative position bias); a linear mixer cannot carry it",
                site.name,
                site.module_path,
            )
    if check_masks:  # before the facts below: a chunked mask looks like a block pattern or packed sequences
        refuse_chunked_attention("mixer", site, layer, action="linearize", remedy=chunk_remedy)
    if check_masks and mask.meta.get(SEQUENCE_CAUSAL_KEY) is False:
        # Shown by the example, and no later pass carries it for a mixer (varlen and sequence_parallel replace a
        # packed row's block-diagonal mask by cu_seqlens, which this fact allows, but refuse a window).
        raise PassError(
            "mixer",
            f"{layer}: on the example inputs its attention mask hides earlier keys of a query's own sequence (a "
            "sliding window or a block pattern, not causal attention with key padding or packed sequences); "
            f"{MIXER_LIMIT}, or set `check_masks: false` to linearize it over the whole prefix (its window dropped)",
            site.name,
            site.module_path,
        )
    window = mask.meta.get(UNSEEN_WINDOW_KEY)
    if window and check_masks:
        # The example is too short to show the window; the module would refuse the first input that does.
        raise PassError(
            "mixer",
            f"{layer}: the graph that builds its attention mask offsets positions by up to {window}, more than the "
            "example inputs show: a sliding window of that size hides keys only in longer inputs, and a linear "
            "mixer can carry only causal and key-padding masks (the module would refuse the first input long "
            "enough to show the window). Leave this layer out with the mixer's `layers` selector, or set "
            "`check_masks: false` to linearize it over the whole prefix (its window dropped)",
            site.name,
            site.module_path,
        )
    if check_masks and mask.meta.get(PACKED_KEY) and not packing_carried:
        raise PassError(
            "mixer",
            f"{layer}: on the example inputs its attention mask packs several sequences into one row (block-diagonal "
            "causal); the mixers carry packed sequences by their boundaries (cu_seqlens), which no later pass of "
            f"this plan supplies: add one of {', '.join(PACKING_CARRIERS)} after `mixer`, or give each sequence its "
            "own row with key padding",
            site.name,
            site.module_path,
        )


def _mask_carries_padding(site: AttentionSite, kind: MixerKind) -> bool:
    """Whether the mixer must read the site's mask.

    A causal mask built from the input shapes alone (what Hugging Face builds for an unpadded batch
    once the capture makes its size symbolic) says nothing a causal mixer does not already do, and
    reading it costs an [L, L] tensor per layer; such a mask is left out, and dead once every site
    drops it.
    """
    if site.mask is None:
        return False
    return not (kind.causal and site.mask_shape_only and site.mask_exactly_causal)


def _rotary_to_drop(site: AttentionSite, layer: str, kind: MixerKind, options: MixerOptions,
                    messages: list[str]) -> tuple[Rotary, Rotary] | None:
    """The rotations of q and of the k the mixer reads, when the site's `rope` is `drop` and both are found.

    None (with a message) when neither q nor k shows a rotary embedding; an error naming the layer when
    one does but its rotation is not matched.
    """
    if (options.rope or kind.rope) != "drop":
        return None
    k = site.kv_repeat_source[0] if site.kv_repeat_source is not None else site.k
    q_rot, k_rot = find_rotary(site.q), find_rotary(k)
    if q_rot is not None and k_rot is not None:
        return q_rot, k_rot
    rotated = [
        name for name, node, rot, proj in (("q", site.q, q_rot, site.q_projection), ("k", k, k_rot, site.k_projection))
        if rot is None and rotary_traces(node, proj)
    ]
    if q_rot is None and k_rot is None and not rotated:
        messages.append(f"{layer}: rope: drop found no rotary embedding on q or k; the mixer reads them as they are")
        return None
    unmatched = rotated or [name for name, rot in (("q", q_rot), ("k", k_rot)) if rot is None]
    default = f" ({kind.name} drops RoPE by default)" if options.rope is None else ""
    verb = "is" if len(unmatched) == 1 else "are"
    raise PassError(
        "mixer",
        f"{layer}: rope: drop{default} needs q and k before their rotary embedding, but "
        f"{' and '.join(unmatched)} {verb} not rotated in the recognised form x * cos + rotate_half(x) * sin "
        "(full or partial, as Hugging Face models write it; complex multiplication or interleaved pairs are "
        "not undone); set rope: keep to read them as the site sees them",
        site.name,
        site.module_path,
    )


def _rewrite(gm: fx.GraphModule, ctx: PassContext, job: _Job, options: MixerOptions) -> list[str]:
    """Put the mixer call in place of the attention node; returns the new parameters' names."""
    site, kind = job.site, job.kind
    added = [
        ctx.add_parameter(site.module_path, name, init)
        for name, init in kind.parameters(job.shape, options).items()
    ]
    q = site.q
    k, v = site.kv_repeat_source if site.kv_repeat_source is not None else (site.k, site.v)
    graph = gm.graph
    kwargs: dict = {}
    if job.rotary is not None:
        with graph.inserting_before(site.node):
            kwargs[TEACHER_KWARG] = (q, k)  # attention transfer's teacher: the original, rotated q and k
            q, k = unrotated(graph, job.rotary[0]), unrotated(graph, job.rotary[1])
    if _mask_carries_padding(site, kind):
        kwargs["mask"] = site.mask
        if site.mask_negated:
            kwargs["mask_negated"] = True
        if not options.check_masks:
            kwargs["check_mask"] = False
    kwargs["scale"] = site.scale
    if kind.feature_maps:
        kwargs["feature_map"] = options.feature_map
    if kind.normalizable:
        kwargs["normalize"] = options.normalized
    kwargs.update(kind.kwargs(options))
    kwargs["layer"] = job.layer
    with graph.inserting_before(site.node):
        params = [graph.get_attr(name) for name in added]
        new = graph.call_function(kind.fn, (q, k, v, *params), kwargs)
    new.meta = dict(site.node.meta)
    new.meta["rewrite_mixer"] = kind.name
    site.node.replace_all_uses_with(new)
    erase_unused(graph, [site.node, *site.chain])
    return added


@register_pass
class Mixer(GraphPass):
    """Replace softmax attention in the selected layers by linear mixers (see the module docstring)."""

    name = "mixer"
    summary = "replace softmax attention by linear / gated / bidirectional mixers, reusing q/k/v/o weights"
    Options = MixerOptions
    changes_outputs = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        options: MixerOptions = self.options
        options.validate(self.where(ctx))
        result = PassResult(self.name)
        analysis = ctx.analysis()
        selected_blocks = _selected_blocks(options, analysis, self.where(ctx))
        jobs: list[_Job] = []
        for block in selected_blocks:
            _check_block(block, analysis)
        if not analysis.blocks:
            refuse_unrecognized_attention("mixer", analysis, action="linearize")
        for site in analysis.sites:
            block = analysis.block_of(site)
            if block is None:
                selected = options.layers in ("all", "*", None)
            else:
                selected = any(b is block for b in selected_blocks)
            if not selected:
                continue
            layer = analysis.site_label(site)
            result.matched += 1
            if _is_cross_attention(site):
                refuse_cached_keys("mixer", site, layer, action="linearize", remedy=(
                    ": a linear mixer carries a recurrent state between calls, not keys; decode a linearized model "
                    "with rewrite.optimize(model, [{'mixer': ...}, 'stateful']).generate(...)"))
                result.messages.append(f"left {layer} as softmax: cross-attention (queries and keys differ in length)")
                continue
            _check_site(gm, site, layer, options.check_masks,
                        packing_carried=any(name in PACKING_CARRIERS for name in ctx.later_passes),
                        chunk_remedy=_chunk_remedy(analysis) if chunked_attention(site) else "")
            kind = _choose_kind(options, site, layer)
            shape = _site_shape(site, layer)
            refusal = kind.refusal(shape) if kind.refusal is not None else None
            if refusal is not None:
                others = ", ".join(name for name, k in KINDS.items() if k.causal == kind.causal and k.refusal is None)
                raise PassError("mixer", f"{layer}: kind {kind.name!r} cannot serve this layer: {refusal}; use "
                                f"another kind ({others}) or leave the layer out of `layers`", site.name,
                                site.module_path)
            rotary = _rotary_to_drop(site, layer, kind, options, result.messages)
            jobs.append(_Job(site, layer, kind, shape, rotary))
        if result.matched == 0:
            _check_something_matched(gm, options)
        for job in jobs:  # every site is checked before any is changed
            result.added_parameters.extend(_rewrite(gm, ctx, job, options))
            result.changed.append(f"{job.layer}: {job.kind.name}")
            if job.rotary is not None:
                result.messages.append(f"{job.layer}: q and k read before the rotary embedding (rope: drop)")
            if job.site.dropout_p:
                result.messages.append(f"{job.layer}: attention dropout p={job.site.dropout_p} dropped (no scores)")
        dropped = [j.site.mask for j in jobs if isinstance(j.site.mask, fx.Node) and not _mask_carries_padding(j.site, j.kind)]
        erase_unused_computation(gm.graph, dropped)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        ctx.invalidate()
        return result
