"""What every pass is: a name, an options dataclass, and `run(graph_module, context) -> PassResult`."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx

from rewrite.analysis import SUPPORTED_FORMS, GraphAnalysis, analyze
from rewrite.analysis.nodes import op_name
from rewrite.errors import PassError
from rewrite.real_tokens import RealTokens


@dataclass
class PassResult:
    """What one pass did to the graph."""

    name: str
    matched: int = 0
    changed: list[str] = field(default_factory=list)
    added_parameters: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    seconds: float = 0.0
    op_counts_before: Counter = field(default_factory=Counter)
    op_counts_after: Counter = field(default_factory=Counter)
    real_tokens: RealTokens | None = None
    """Set by a pass whose module differs from the original at padded positions by design (the `varlen`
    pass): which inputs and outputs hold real tokens, for `rewrite.verify` (see `rewrite.real_tokens`)."""
    graph_replay: Any = None
    """Set by a pass whose module can be replayed from CUDA graphs (the `varlen` pass's `TokenBuckets`): how
    the optimized module's calls may be replayed."""

    def op_count_diff(self) -> dict[str, int]:
        """Ops whose count changed, with the change (+ added, - removed)."""
        keys = set(self.op_counts_before) | set(self.op_counts_after)
        diff = {k: self.op_counts_after[k] - self.op_counts_before[k] for k in keys}
        return {k: v for k, v in sorted(diff.items()) if v}

    def summary(self) -> str:
        parts = [f"{self.name}: matched {self.matched}, changed {len(self.changed)}"]
        if self.added_parameters:
            parts.append(f"added {len(self.added_parameters)} parameters")
        parts.append(f"{self.seconds * 1000:.1f} ms")
        return ", ".join(parts)


def refuse_unrecognized_attention(
    pass_name: str,
    analysis: GraphAnalysis,
    nodes: Iterable[fx.Node] | None = None,
    *,
    action: str = "rewrite",
    layer: str | None = None,
) -> None:
    """Raise a PassError naming the first softmax (within `nodes`, or anywhere in the graph) that
    weights values like attention but matches no supported form; `layer` names where it sits."""
    inside = None if nodes is None else {id(n) for n in nodes}
    for found in analysis.unrecognized:
        if inside is None or id(found.node) in inside:
            where = layer or found.module_path or "<root>"
            raise PassError(
                pass_name,
                f"cannot {action} the attention of {where}: {found.reason}. Supported attention forms: "
                f"{SUPPORTED_FORMS}",
                found.node.name,
                found.module_path,
            )


def refuse_mask_bias(pass_name: str, site: Any, layer: str, *, action: str = "rewrite") -> None:
    """Raise a PassError naming the site's layer when its mask carries an additive bias besides padding and
    causality (probed on the example inputs: ALiBi folded into the mask, as Falcon's ALiBi variant does)."""
    if site.mask_bias:
        raise PassError(
            pass_name,
            f"cannot {action} the attention of {layer}: {site.mask_bias}, which no supported attention form "
            f"models. Supported attention forms: {SUPPORTED_FORMS}",
            site.name,
            site.module_path,
        )


def chunked_attention(site: Any) -> str | None:
    """What a site's chunked local attention mask is (probed on the example inputs), or None when it has none."""
    chunk = getattr(site, "mask_chunk", None)
    if chunk:
        return (f"chunked local attention: each query sees only keys in its own chunk of {chunk} tokens (its mask is "
                f"block-diagonal causal with blocks of {chunk} at fixed positions, as in Llama 4's local layers, not "
                "sequences the example packs into one row)")
    unseen = getattr(site, "mask_unseen_chunk", None)
    if unseen:
        return (f"chunked local attention: the graph that builds its mask cuts positions into chunks of {unseen} "
                f"tokens (each query would see only keys in its own chunk), which no sequence of the example inputs "
                f"is long enough to cross")
    return None


CHUNKED_SUPPORT = ("no pass that rewrites attention supports chunked local attention (mixer, varlen, stateful and "
                   "sequence_parallel refuse it; attention_normalize keeps its mask)")


def refuse_chunked_attention(pass_name: str, site: Any, layer: str, *, action: str = "rewrite",
                             remedy: str = "") -> None:
    """Raise a PassError naming the site's layer when its mask is chunked local attention (`chunked_attention`)."""
    what = chunked_attention(site)
    if what:
        raise PassError(pass_name, f"cannot {action} the attention of {layer}: {what}; {CHUNKED_SUPPORT}{remedy}",
                        site.name, site.module_path)


CACHE_CALL = ("a KV cache: a Hugging Face model called with past_key_values, or with use_cache=True, its default, "
              "under torch.compile")


def refuse_cached_keys(pass_name: str, site: Any, layer: str, *, action: str = "rewrite", remedy: str = "") -> None:
    """Raise a PassError naming the site's layer when its keys are joined along the tokens to keys from outside
    this call's projections (a KV cache the caller passes in and gets back), which the pass cannot carry."""
    if site.key_concat is not None:
        raise PassError(
            pass_name,
            f"cannot {action} the attention of {layer}: its keys are joined along the tokens to keys from elsewhere "
            f"(at {site.key_concat.name}): {CACHE_CALL}. Call the model with use_cache=False{remedy}",
            site.name,
            site.module_path,
        )


def op_counts(gm: fx.GraphModule) -> Counter:
    """How many nodes of each op the graph holds (placeholders and output excluded)."""
    return Counter(op_name(n) for n in gm.graph.nodes if n.op in ("call_function", "call_module", "call_method"))


class PassContext:
    """Shared state of one pipeline run: analysis cache, new parameters, options of the whole plan."""

    def __init__(
        self,
        gm: fx.GraphModule,
        *,
        kernels: str = "auto",
        existing_state: dict[str, torch.Tensor] | None = None,
        source: torch.nn.Module | None = None,
    ):
        self.gm = gm
        self.kernels = kernels
        self.existing_state = existing_state or {}
        self.source = source  # the model the graph was captured from, where there is one (passes may run its modules)
        self.later_passes: tuple[str, ...] = ()  # names of the plan's passes that run after the current one
        self.plan_entry: str | None = None  # the running pass's entry as PlanErrors name it (`passes[2].mixer`)
        self._analysis: GraphAnalysis | None = None

    def analysis(self) -> GraphAnalysis:
        """Analysis of the current graph, recomputed after `invalidate()`."""
        if self._analysis is None:
            self._analysis = analyze(self.gm)
        return self._analysis

    def invalidate(self) -> None:
        self._analysis = None

    def add_parameter(self, owner: str, name: str, init: torch.Tensor, requires_grad: bool = True) -> str:
        """Register a new parameter at `owner.name` (reusing one of that name kept from an earlier run)."""
        target = f"{owner}.{name}" if owner else name
        existing = self.existing_state.get(target)
        param = existing if isinstance(existing, torch.nn.Parameter) else torch.nn.Parameter(init, requires_grad)
        module = self.gm
        for part in owner.split(".") if owner else []:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(name, param)
        return target


class GraphPass:
    """Base class: subclasses set `name`, `Options`, `summary` and implement `run`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type]
    changes_outputs: ClassVar[bool] = False
    """True for a pass that changes what the model computes by design (the `mixer` pass replaces softmax
    attention): `optimize(..., verify=True)` then reports the difference instead of raising."""

    def __init__(self, options: Any | None = None):
        self.options = options if options is not None else self.Options()

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def where(self, ctx: PassContext) -> str:
        """The plan field of this pass's options, as PlanErrors name it: `passes[i].<name>` inside a plan, else
        the pass name."""
        return ctx.plan_entry or self.name


def option_docs(options_cls: type) -> list[tuple[str, Any, str, list | None]]:
    """(name, default, help, choices) for each option of a pass."""
    out = []
    for f in dataclasses.fields(options_cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        )
        out.append((f.name, default, f.metadata.get("help", ""), f.metadata.get("choices")))
    return out
