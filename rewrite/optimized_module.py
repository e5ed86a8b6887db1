"""`OptimizedModule`: the emitted module. It owns the original parameters (shared, not copied) under
their original names, runs the rewritten graph, and captures again when a call needs it."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from rewrite.capture import Captured, capture, check_inputs, order_kwargs
from rewrite.errors import RewriteError
from rewrite.pipeline import PipelineReport, run_pipeline
from rewrite.plan import Plan
from rewrite.real_tokens import RealTokens, program_inputs


class _SourceRef:
    """Holds the original model without registering it as a submodule."""

    def __init__(self, module: torch.nn.Module | None):
        self.module = module


def ensure_module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """The submodule at `path`, creating empty modules along the way."""
    module = root
    for part in path.split(".") if path else []:
        child = module._modules.get(part)
        if child is None:
            child = torch.nn.Module()
            module.add_module(part, child)
        module = child
    return module


def adopt_state(target: torch.nn.Module, source: torch.nn.Module) -> None:
    """Give `target` every parameter and buffer of `source` (same objects, same names, same persistence)."""
    for mod_path, module in source.named_modules(remove_duplicate=False):
        holder = ensure_module(target, mod_path)
        for name, param in module._parameters.items():
            if param is not None:
                holder.register_parameter(name, param)
        for name, buf in module._buffers.items():
            if buf is not None:
                holder.register_buffer(name, buf, persistent=name not in module._non_persistent_buffers_set)


def _copy_new_attrs(target: torch.nn.Module, gm: fx.GraphModule) -> None:
    """Bring parameters/buffers/constants the graph reads but `target` lacks (added by passes, export constants)."""
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        owner_path, _, name = str(node.target).rpartition(".")
        try:
            target.get_submodule(owner_path) if owner_path else target
            existing = _resolve(target, str(node.target))
        except AttributeError:
            existing = None
        if existing is not None:
            continue
        value = _resolve(gm, str(node.target))
        holder = ensure_module(target, owner_path)
        if isinstance(value, torch.nn.Parameter):
            holder.register_parameter(name, value)
        elif isinstance(value, torch.Tensor):
            holder.register_buffer(name, value, persistent=False)
        else:
            setattr(holder, name, value)


def _resolve(root: torch.nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _graph_devices(graph: fx.Graph) -> set[torch.device]:
    found = set()
    for node in graph.nodes:
        dev = node.kwargs.get("device") if node.op == "call_function" else None
        if isinstance(dev, torch.device):
            found.add(dev)
    return found


def retarget_device(graph: fx.Graph, device: torch.device) -> None:
    """Point every op's `device=` argument at `device` (captured graphs bake the capture device in), also in the
    graphs of calls that run a graph of their own (a routed block's `body`, as a loaded program holds it)."""
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if isinstance(node.kwargs.get("device"), torch.device):
            kwargs = dict(node.kwargs)
            kwargs["device"] = device
            node.kwargs = kwargs
        body = getattr(node.target, "body", None)
        if isinstance(body, fx.GraphModule):
            retarget_device(body.graph, device)
            body.recompile()


class OptimizedModule(torch.nn.Module):
    """A rewritten model. Call it like the original; `.code` shows the program it runs."""

    def __init__(
        self,
        graph_module: fx.GraphModule,
        captured: Captured,
        plan: Plan,
        report: PipelineReport,
        source: torch.nn.Module | None,
        captured_graph: fx.Graph | None = None,
    ):
        super().__init__()
        if source is not None:
            adopt_state(self, source)
        _copy_new_attrs(self, graph_module)
        self.__dict__["_source"] = _SourceRef(source)
        self.__dict__["_plan"] = plan
        self.__dict__["_report"] = report
        self.__dict__["_captured"] = captured
        self.__dict__["_captured_graph"] = captured_graph
        self.__dict__["_needs_capture"] = None
        self.training = source.training if source is not None else False
        self.__dict__["_captured_training"] = self.training
        self._install_graph(graph_module.graph)

    # -- the program -------------------------------------------------------------------------
    def _install_graph(self, graph: fx.Graph) -> None:
        gm = fx.GraphModule(self, graph, class_name=self.__class__.__name__ + "Program")
        self.__dict__["_program"] = gm
        self.__dict__["_replayer"] = None  # graphs of the previous program do not run this one

    @property
    def program(self) -> fx.GraphModule:
        """The GraphModule the module runs (state shared with this module)."""
        return self.__dict__["_program"]

    @property
    def graph(self) -> fx.Graph:
        return self.program.graph

    @property
    def code(self) -> str:
        """The program as readable Python."""
        return self.program.code

    @property
    def plan(self) -> Plan:
        return self.__dict__["_plan"]

    @property
    def report(self) -> PipelineReport:
        """What each pass did at the last capture."""
        return self.__dict__["_report"]

    @property
    def real_tokens(self) -> RealTokens | None:
        """Which inputs and outputs hold real tokens when the plan changes padded positions (the `varlen`
        pass), for `rewrite.verify`; None when every output value is comparable with the original's."""
        return self.report.real_tokens

    @property
    def source(self) -> torch.nn.Module | None:
        """The original model (parameters shared), or None for a module loaded from disk."""
        return self.__dict__["_source"].module

    @property
    def captured_graph(self) -> fx.Graph | None:
        """The graph as captured, before any pass (for `verify`)."""
        return self.__dict__["_captured_graph"]

    # -- calling -------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        captured: Captured = self.__dict__["_captured"]
        reason = self.__dict__["_needs_capture"] or check_inputs(captured, args, kwargs)
        if reason is None and self.training != self.__dict__["_captured_training"]:
            reason = f"the module is now in {'train' if self.training else 'eval'} mode"
        if reason is not None:
            self._recapture(args, kwargs, reason)
            captured = self.__dict__["_captured"]
        full = {**captured.injected_kwargs, **kwargs}
        replay = self.report.graph_replay
        if replay is not None and not self.training:
            return self._replayer_for(replay)(args, full)
        return self.program(*args, **full)

    def _replayer_for(self, policy: Any) -> Any:
        """The CUDA-graph runner of this program (built on first use; see `rewrite.varlen.graph_replay`)."""
        from rewrite.varlen.graph_replay import BucketedGraphs

        runner = self.__dict__["_replayer"]
        if runner is None or runner.policy != policy:
            captured: Captured = self.__dict__["_captured"]

            def flat_inputs(args: tuple, kwargs: dict[str, Any]) -> list[Any]:
                return program_inputs(self.graph, args, order_kwargs(kwargs, captured.kwarg_order))

            runner = BucketedGraphs(self.program, policy, flat_inputs, self.real_tokens)
            self.__dict__["_replayer"] = runner
        return runner

    def _recapture(self, args: tuple, kwargs: dict[str, Any], reason: str) -> None:
        source = self.source
        if source is None:
            raise RewriteError(
                f"this optimized module cannot run these inputs: {reason}. It was loaded without its "
                "source model; load it with rewrite.load(path, model=...) to let it capture again."
            )
        self._sync_source()
        source.train(self.training)
        captured = capture(source, args, kwargs)
        gm = captured.graph_module
        existing = dict(self.named_parameters())
        captured_graph = copy.deepcopy(gm.graph)
        report = run_pipeline(gm, self.plan, existing_state=existing, source=source)
        _copy_new_attrs(self, gm)
        self.__dict__["_captured"] = captured
        self.__dict__["_captured_graph"] = captured_graph
        self.__dict__["_report"] = report
        self.__dict__["_captured_training"] = self.training
        self.__dict__["_needs_capture"] = None
        self._install_graph(gm.graph)

    def _sync_source(self) -> None:
        """Move the source's buffers where this module's are (parameters are shared already)."""
        source = self.source
        assert source is not None
        mine = dict(self.named_buffers())
        for name, buf in list(source.named_buffers()):
            if name in mine and (mine[name].device != buf.device or mine[name].dtype != buf.dtype):
                owner, _, leaf = name.rpartition(".")
                (source.get_submodule(owner) if owner else source)._buffers[leaf] = mine[name]

    def _apply(self, fn, recurse: bool = True):  # noqa: D401 - nn.Module hook
        before = {p.device for p in self.parameters()} | {p.dtype for p in self.parameters()}
        out = super()._apply(fn, recurse)
        after = {p.device for p in self.parameters()} | {p.dtype for p in self.parameters()}
        if "_program" in self.__dict__:
            graph = self.program.graph
            devices = {p.device for p in self.parameters()} or {b.device for b in self.buffers()}
            if len(devices) == 1:
                retarget_device(graph, next(iter(devices)))
            self._install_graph(graph)
            if before != after and self.source is not None:
                self.__dict__["_needs_capture"] = "the module was moved or cast"
            elif self.source is None:  # a saved program bakes its dtypes in (metadata asserts, casts)
                now = sorted(str(p.dtype) for p in self.parameters())
                saved = self.__dict__.setdefault("_program_dtypes", sorted(str(d) for d in before
                                                                            if isinstance(d, torch.dtype)))
                self.__dict__["_needs_capture"] = None if set(now) == set(saved) else (
                    f"its parameters were cast to {sorted(set(now))} but the saved program runs in {saved}")
        return out

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **options: Any) -> torch.Tensor:
        """Continue the prompts token by token with the rewritten model (see `rewrite.decode.generate`)."""
        from rewrite.decode import generate

        return generate(self, input_ids, attention_mask, **options)

    # -- saving ----------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write the plan (plan.yaml), the weights (weights.safetensors) and the program (program.pt2)."""
        from rewrite.serialize import save_optimized

        return save_optimized(self, Path(directory))

    def __deepcopy__(self, memo: dict[int, Any]) -> OptimizedModule:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new

    def __reduce_ex__(self, protocol: Any) -> Any:
        # its program holds export's local functions and generated classes, which pickle cannot name
        raise RewriteError(
            "an OptimizedModule cannot be pickled (torch.save(om)): save it with om.save(folder) and "
            "rewrite.load(folder[, model=...]), or save om.state_dict()")

    def extra_repr(self) -> str:
        names = [p.name for p in self.plan.enabled_passes]
        return f"plan={names}"


def summary_json(om: OptimizedModule) -> str:
    """The pipeline report as JSON (pass results only)."""
    return json.dumps(
        [
            {"pass": r.name, "matched": r.matched, "changed": r.changed, "messages": r.messages, "ms": r.seconds * 1e3}
            for r in om.report.results
        ],
        indent=2,
    )
