"""The `torch.compile` backend: `torch.compile(model, backend="rewrite", options={"plan": plan})`.

Dynamo's graph is normalized into the same ATen IR that `rewrite.optimize` captures
(`rewrite.dynamo_ir.to_aten_ir`), the plan's passes run on it and canonical ops are lowered, then
the graph goes to Inductor (`options={"inductor": False}` runs it eagerly instead). The name
`rewrite` is registered through the `torch_dynamo_backends` entry point, so it works without
importing this package first.

Options (all optional):
  plan       the plan: a dict, list of passes, YAML/JSON text or file path, or a `rewrite.Plan`
  inductor   compile the rewritten graph with Inductor (default True); False runs it eagerly
  on_report  called with a `CompileReport` after each graph Dynamo compiles
  parameters a dict you own, {name: Parameter}: parameters that passes add are put there, and a
             recompile (a new shape, say) reuses them instead of making fresh ones

With Inductor, a plan that runs the `varlen` pass needs Dynamo to allow data-dependent sizes (unpadding
counts the real tokens): set `torch._dynamo.config.capture_dynamic_output_shape_ops` and
`capture_scalar_outputs` to True while the compiled model is first called, or compile with
`fullgraph=True`; otherwise the backend raises an error naming these settings (see
`check_data_dependent_sizes`).

`torch.compile`'s `mode` is passed on to Inductor. Parameters that passes add live on the rewritten
graph, not on the compiled model: train them by handing `parameters` (or each report's
`added_parameters`) to the optimizer.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from rewrite import ir_ops as _ir_ops  # noqa: F401  (registers the IR's abstract ops)
from rewrite.dynamo_ir import STATE_KEY, to_aten_ir
from rewrite.errors import PlanError, RewriteError
from rewrite.pipeline import PipelineReport, run_pipeline
from rewrite.plan import Plan

OPTION_KEYS = ["plan", "inductor", "on_report", "parameters"]

last_reports: collections.deque[CompileReport] = collections.deque(maxlen=16)
"""The reports of the most recent graphs this backend compiled, newest last (for interactive use)."""


@dataclass
class BackendOptions:
    """The validated `options` of `torch.compile(..., backend="rewrite", options=...)`."""

    plan: Plan = field(default_factory=Plan)
    inductor: bool = True
    on_report: Callable[[CompileReport], None] | None = None
    parameters: dict[str, torch.nn.Parameter] | None = None

    @classmethod
    def from_data(cls, options: dict[str, Any] | None) -> BackendOptions:
        """Check option names and types; raise PlanError naming the field at fault."""
        options = dict(options or {})
        for key in options:
            if key not in OPTION_KEYS:
                raise PlanError(f"options.{key}", "unknown option of the rewrite backend", OPTION_KEYS)
        raw_plan = options.get("plan")
        plan = Plan.parse(raw_plan) if isinstance(raw_plan, str) else Plan.from_data(raw_plan)
        inductor = options.get("inductor", True)
        if not isinstance(inductor, bool):
            raise PlanError("options.inductor", f"must be a bool, got {inductor!r}")
        on_report = options.get("on_report")
        if on_report is not None and not callable(on_report):
            raise PlanError("options.on_report", f"must be callable, got {on_report!r}")
        parameters = options.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise PlanError("options.parameters", f"must be a dict, got {type(parameters).__name__}")
        return cls(plan=plan, inductor=inductor, on_report=on_report, parameters=parameters)


@dataclass
class CompileReport:
    """What the backend did with one graph Dynamo handed it."""

    pipeline: PipelineReport
    graph_module: fx.GraphModule  # the rewritten ATen graph (what Inductor compiles or what runs)
    state_names: list[str]  # parameters and buffers among the graph's inputs, in input order
    inductor: bool
    normalize_seconds: float = 0.0
    compile_seconds: float = 0.0

    @property
    def code(self) -> str:
        """The rewritten program as Python."""
        return self.graph_module.code

    @property
    def added_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Parameters the passes added; they live on `graph_module`, not on the compiled model."""
        names = [name for r in self.pipeline.results for name in r.added_parameters]
        return {name: self.graph_module.get_parameter(name) for name in names}

    def summary(self) -> str:
        where = "inductor" if self.inductor else "eager"
        return f"{self.pipeline.summary()}\nnormalize {self.normalize_seconds:.2f} s, backend {where}"


def _compile_inductor(
    gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str | None
) -> Callable[..., Any]:
    """Inductor's own entry (AOT autograd, decompositions, codegen) on a copy: compile_fx mutates its input."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    patches = list_mode_options(mode) if mode else None
    return compile_fx(fx.GraphModule(gm, graph), list(example_inputs), config_patches=patches)


DATA_DEPENDENT_PASSES = ("varlen",)
"""Passes whose graphs have sizes that depend on input values (the number of real tokens)."""


def check_data_dependent_sizes(plan: Plan, example_inputs: Sequence[Any], inductor: bool) -> None:
    """Raise RewriteError naming the Dynamo settings when Inductor would have to trace data-dependent sizes that
    Dynamo's shape environment forbids.

    Dynamo fixes whether sizes may depend on data (`capture_dynamic_output_shape_ops`, `capture_scalar_outputs`,
    both implied by `fullgraph=True`) when it starts tracing a frame, before the backend runs, so the backend
    cannot turn them on for its own graph; it can only say what to set. Eager runs (`inductor: False`) need
    neither.
    """
    passes = [spec.name for spec in plan.enabled_passes if spec.name in DATA_DEPENDENT_PASSES]
    if not inductor or not passes:
        return
    fake_mode = detect_fake_mode(list(example_inputs))
    shape_env = getattr(fake_mode, "shape_env", None)
    missing = [name for name, allowed in (
        ("capture_dynamic_output_shape_ops", getattr(shape_env, "allow_dynamic_output_shape_ops", False)),
        ("capture_scalar_outputs", getattr(shape_env, "allow_scalar_outputs", False)),
    ) if not allowed]
    if not missing:
        return
    settings = ", ".join(f"{name}=True" for name in missing)
    raise RewriteError(
        f"the {' and '.join(passes)} pass makes sizes that depend on the inputs' values (unpadding counts the real "
        f"tokens), and Dynamo was tracing with {' and '.join(f'torch._dynamo.config.{m} = False' for m in missing)}, "
        "so Inductor cannot compile the rewritten graph. Call the compiled model inside "
        f"`with torch._dynamo.config.patch({settings}):` (Dynamo reads these when it traces, at the first call), "
        "compile with fullgraph=True (which allows both), or run the rewritten graph eagerly with "
        "options={'inductor': False}")


SYMBOLIC_LENGTH_PASSES = ("varlen",)
"""Passes whose program must serve any length, so the graph's sizes must be symbolic."""


def check_symbolic_sizes(plan: Plan, graph_module: fx.GraphModule) -> None:
    """Raise RewriteError naming `dynamic=True` when the plan needs symbolic sizes and every input of the graph
    Dynamo handed over has fixed ones (Dynamo's first graph of a model, unless compiled with `dynamic=True`)."""
    passes = [spec.name for spec in plan.enabled_passes if spec.name in SYMBOLIC_LENGTH_PASSES]
    if not passes:
        return
    for node in graph_module.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" and STATE_KEY not in node.meta else None
        if isinstance(value, torch.SymInt) or (
                isinstance(value, torch.Tensor) and any(isinstance(size, torch.SymInt) for size in value.shape)):
            return
    raise RewriteError(
        f"the {' and '.join(passes)} pass makes one program for every sequence length, which needs the length "
        "symbolic, and Dynamo handed the backend a graph whose input sizes are all fixed (its first graph of a "
        "model is, unless compiled with dynamic=True): compile with torch.compile(model, backend='rewrite', "
        "dynamic=True, options=...)")


def rewrite_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    options: dict[str, Any] | None = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """Dynamo backend: normalize `gm` into the rewriter's IR, run the plan, compile or run eagerly."""
    opts = BackendOptions.from_data(options)
    check_data_dependent_sizes(opts.plan, example_inputs, opts.inductor)
    start = time.perf_counter()
    aten_gm = to_aten_ir(gm, example_inputs)
    check_symbolic_sizes(opts.plan, aten_gm)
    normalized = time.perf_counter()
    pipeline = run_pipeline(aten_gm, opts.plan, existing_state=opts.parameters)
    pipeline.capture_seconds = normalized - start
    state = [n.meta[STATE_KEY] for n in aten_gm.graph.nodes if n.op == "placeholder" and STATE_KEY in n.meta]
    report = CompileReport(
        pipeline=pipeline,
        graph_module=aten_gm,
        state_names=state,
        inductor=opts.inductor,
        normalize_seconds=normalized - start,
    )
    if opts.parameters is not None:
        opts.parameters.update(report.added_parameters)
    compiled: Callable[..., Any] = aten_gm
    if opts.inductor:
        compiled = _compile_inductor(aten_gm, example_inputs, mode)
    report.compile_seconds = time.perf_counter() - start
    last_reports.append(report)
    if opts.on_report is not None:
        opts.on_report(report)
    return compiled


__all__ = ["BackendOptions", "CompileReport", "check_data_dependent_sizes", "check_symbolic_sizes", "last_reports",
           "rewrite_backend"]
