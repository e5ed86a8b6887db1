"""`rewrite.optimize`: capture → analyze → passes → lower → emit."""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from rewrite.capture import capture
from rewrite.errors import RewriteError
from rewrite.optimized_module import OptimizedModule
from rewrite.pipeline import run_pipeline
from rewrite.plan import Plan


def _as_args(example_inputs: Any) -> tuple:
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)


def _prompt_example(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[tuple, dict[str, Any]]:
    """(example args, example kwargs) that call `model` on token ids: `input_ids=` when its forward
    takes that keyword, else the first positional argument."""
    import inspect

    if "input_ids" in inspect.signature(model.forward).parameters:
        return (), {"input_ids": input_ids}
    return (input_ids,), {}


class LazyOptimizedModule(torch.nn.Module):
    """Optimizes on the first call, when example inputs are known; then behaves as the OptimizedModule."""

    def __init__(self, model: torch.nn.Module, plan: Plan, verify: bool):
        super().__init__()
        self.__dict__["_model"] = model
        self.__dict__["_plan"] = plan
        self.__dict__["_verify"] = verify
        self.__dict__["_optimized"] = None
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, p in model._parameters.items():
            if p is not None:
                self.register_parameter(name, p)
        for name, b in model._buffers.items():
            if b is not None:
                self.register_buffer(name, b, persistent=name not in model._non_persistent_buffers_set)

    @property
    def optimized(self) -> OptimizedModule | None:
        """The OptimizedModule once the first call has captured the model."""
        return self.__dict__["_optimized"]

    def _ensure(self, args: tuple, kwargs: dict[str, Any]) -> OptimizedModule:
        """The OptimizedModule, captured now with `args` / `kwargs` as example inputs if it does not exist."""
        om = self.optimized
        if om is None:
            self._model.train(self.training)
            om = optimize(self._model, self._plan, args, example_kwargs=kwargs, verify=self._verify)
            assert isinstance(om, OptimizedModule)
            self.__dict__["_optimized"] = om
        om.train(self.training)
        return om

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._ensure(args, kwargs)(*args, **kwargs)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **options: Any) -> torch.Tensor:
        """Continue the prompts token by token (see `rewrite.decode.generate`); before the first call,
        the model is captured with the prompt's token ids as example inputs."""
        return self._ensure(*_prompt_example(self._model, input_ids)).generate(input_ids, attention_mask, **options)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            om = self.__dict__.get("_optimized")
            if om is not None and name in ("code", "graph", "program", "report", "plan", "save"):
                return getattr(om, name)
            raise


def optimize(
    model: torch.nn.Module,
    plan: Any = None,
    example_inputs: Any = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    verify: bool = False,
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> OptimizedModule | LazyOptimizedModule:
    """Rewrite `model` by `plan` (dict, YAML/TOML/JSON path, list of passes or Plan).

    With example inputs, captures now and returns an OptimizedModule; without, returns a module
    that captures on its first call. `verify=True` compares the result with `model` on the example
    inputs (the report is `om.verification`) and raises VerificationError naming the first diverging node
    if they differ, unless the plan holds a pass that changes the outputs by design (`mixer`): then the
    report only says how far apart they are. With `stateful` in the plan it also builds the decode program,
    whose step check raises PassError naming the first value a one-token step computes otherwise than the
    whole prompt (else the first `generate` would).
    """
    if not isinstance(model, torch.nn.Module):
        raise RewriteError(f"optimize() takes an nn.Module, got {type(model).__name__}")
    plan = Plan.parse(plan) if isinstance(plan, str) else Plan.from_data(plan)
    args = _as_args(example_inputs)
    kwargs = dict(example_kwargs or {})
    if not args and not kwargs:
        return LazyOptimizedModule(model, plan, verify)
    start = time.perf_counter()
    captured = capture(model, args, kwargs)
    gm = captured.graph_module
    captured_graph = copy.deepcopy(gm.graph)
    capture_seconds = time.perf_counter() - start
    report = run_pipeline(gm, plan, source=model)
    report.capture_seconds = capture_seconds
    om = OptimizedModule(gm, captured, plan, report, model, captured_graph=captured_graph)
    if verify:
        from rewrite.verify import verify as run_verify

        outcome = run_verify(model, om, args, kwargs, atol=atol, rtol=rtol)
        om.__dict__["verification"] = outcome
        by_design = _output_changing_passes(plan)
        if by_design:
            outcome.notes.append(
                f"the plan's {', '.join(by_design)} pass changes the model's outputs by design: the differences "
                "above are reported, not raised")
        else:
            outcome.raise_if_failed()
        if any(spec.name == "stateful" for spec in plan.enabled_passes):
            outcome.notes.append(_check_decode_step(om))
    return om


def _check_decode_step(om: OptimizedModule) -> str:
    """Build `om`'s decode program, whose step check raises PassError naming the first value a one-token step
    computes otherwise than the whole prompt; what was checked, as a note of the verification report."""
    from rewrite.decode.loop import decode_program

    program = decode_program(om)
    if program.signature.routed_layers:
        return ("decode: the program routes layers, so its one-token step is not checked against the prefill (a "
                "prompt one token shorter may route otherwise)")
    return ("decode: a prompt's last token decoded as one step after a prefill of the others gives the values "
            "of the whole prompt")


def _output_changing_passes(plan: Plan) -> list[str]:
    """Names of the plan's enabled passes that change the model's outputs by design (`GraphPass.changes_outputs`)."""
    from rewrite.passes import PASSES

    names = [spec.name for spec in plan.enabled_passes]
    return sorted({n for n in names if getattr(PASSES.get(n), "changes_outputs", False)})
