"""Run a plan's passes in order over a captured graph, then lower; keep a report of every stage."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from rewrite.analysis.graph_utils import eliminate_dead_code
from rewrite.errors import PlanError
from rewrite.lower import lower
from rewrite.passes import PASSES
from rewrite.passes.base import PassContext, PassResult, op_counts
from rewrite.plan import Plan
from rewrite.real_tokens import RealTokens


@dataclass
class Stage:
    """A snapshot of the program after one step (`captured`, a pass name, `final`)."""

    name: str
    code: str
    op_counts: dict[str, int]
    graph: fx.Graph | None = None


@dataclass
class PipelineReport:
    """What the pipeline did: per-pass results and, in debug mode, every stage's program."""

    results: list[PassResult] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)
    lowered: list[str] = field(default_factory=list)
    capture_seconds: float = 0.0
    saved_real_tokens: RealTokens | None = None  # a loaded module's: what its passes published when it was saved

    def summary(self) -> str:
        lines = [r.summary() for r in self.results]
        for r in self.results:
            lines.extend(f"  {m}" for m in r.messages)
        if self.lowered:
            lines.append(f"lower: {len(self.lowered)} nodes")
        return "\n".join(lines) if lines else "no passes"

    @property
    def real_tokens(self) -> RealTokens | None:
        """The real-token description the last pass that published one left, or a loaded module's saved one (None:
        every value comparable)."""
        published = (r.real_tokens for r in reversed(self.results) if r.real_tokens is not None)
        return next(published, self.saved_real_tokens)

    @property
    def added_parameters(self) -> list[str]:
        """Names of the parameters the passes added (mixer gates and feature maps, routers), in pass order."""
        return [n for r in self.results for n in r.added_parameters]

    @property
    def graph_replay(self) -> Any:
        """How the module's calls may be replayed from CUDA graphs (the last pass that said so; None: eagerly)."""
        return next((r.graph_replay for r in reversed(self.results) if r.graph_replay is not None), None)

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage {name!r}; stages: {[s.name for s in self.stages]}")


def _snapshot(name: str, gm: fx.GraphModule, keep_graph: bool) -> Stage:
    gm.recompile()
    graph = None
    if keep_graph:
        graph = _copy_graph(gm.graph)
    return Stage(name=name, code=gm.code, op_counts=dict(op_counts(gm)), graph=graph)


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    out = new.graph_copy(graph, {})
    new.output(out)
    new._codegen = graph._codegen
    return new


def run_pipeline(
    gm: fx.GraphModule,
    plan: Plan,
    *,
    existing_state: dict[str, torch.Tensor] | None = None,
    keep_stages: bool | None = None,
    lower_ops: bool = True,
    source: torch.nn.Module | None = None,
) -> PipelineReport:
    """Apply `plan` to `gm` in place and lower it; returns the report. `source` is the model `gm` was
    captured from, where there is one: passes may run its submodules to check what the graph cannot show."""
    keep = plan.debug if keep_stages is None else keep_stages
    report = PipelineReport()
    report.stages.append(_snapshot("captured", gm, keep))
    ctx = PassContext(gm, kernels=plan.kernels, existing_state=existing_state, source=source)
    enabled = [(index, spec) for index, spec in enumerate(plan.passes) if spec.name not in plan.disable]
    for position, (index, spec) in enumerate(enabled):
        pass_obj = PASSES[spec.name](spec.options)
        ctx.later_passes = tuple(later.name for _, later in enabled[position + 1:])
        ctx.plan_entry = f"passes[{index}].{spec.name}"
        before = op_counts(gm)
        start = time.perf_counter()
        result = pass_obj.run(gm, ctx)
        result.seconds = time.perf_counter() - start
        result.op_counts_before = before
        result.op_counts_after = op_counts(gm)
        ctx.invalidate()
        eliminate_dead_code(gm.graph)
        gm.recompile()
        report.results.append(result)
        if result.matched == 0:
            message = f"pass {spec.name!r} matched nothing in this model"
            if plan.strict:
                raise PlanError(ctx.plan_entry, message + " (strict: true)")
            warnings.warn(message, stacklevel=3)
        report.stages.append(_snapshot(spec.name, gm, keep))
    if lower_ops:
        report.lowered = lower(gm, plan.kernels)
    gm.graph.eliminate_dead_code()
    report.stages.append(_snapshot("final", gm, keep))
    return report
