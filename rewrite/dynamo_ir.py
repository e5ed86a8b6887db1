"""Normalize a Dynamo graph into the rewriter's IR: an ATen pre-dispatch FX graph.

Dynamo hands a backend a torch-level graph (`torch.nn.functional.linear`, `F.scaled_dot_product_attention`,
method calls) whose placeholders are the user inputs, the model's parameters and buffers, and
symbolic sizes. `rewrite.optimize` captures with `torch.export`, whose graph holds ATen ops. Passes
match one IR only, so this module retraces Dynamo's graph into ATen pre-dispatch form (the level of
export's training IR: `aten.linear`, `aten.scaled_dot_product_attention`, autograd left to run
later), keeping each node's `nn_module_stack` and Dynamo's symbolic sizes. Parameters and buffers
stay placeholders (Dynamo passes them in on every call) and are tagged `meta['state_name']` with
their dotted name, which `rewrite.analysis.nodes.state_name` reads.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch._guards import TracingContext, detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental.proxy_tensor import make_fx

from rewrite.analysis.mask_probe import annotate_mask_causality
from rewrite.empty_concats import drop_empty_concats
from rewrite.errors import RewriteError
from rewrite.score_masks import canonicalize_score_masks

STATE_KEY = "state_name"
SOURCE_KEY = "dynamo_source"

_ACCESS = re.compile(r"\['([^']*)'\]|\[(\d+)\]|\.(\w+)")
_CONTAINERS = {"_modules", "_parameters", "_buffers"}
_ROOT = re.compile(r"^[LG]\['([^']*)'\]")
_COMPILED_MODULE = re.compile(r"^L\['(?:self|fn)'\]|^L\['args'\]\[0\]")  # the compiled module, in nn_module_stack


@dataclass(frozen=True)
class InputInfo:
    """What one placeholder of Dynamo's graph is."""

    kind: str  # "state" (parameter / buffer), "input" (user tensor or value) or "size" (a SymInt)
    name: str  # dotted state name, or a readable input name
    source: str  # Dynamo's source expression, e.g. "L['self']._modules['lm_head']._parameters['weight']"


def _source_text(node: fx.Node) -> str:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return ""
    name = source.name
    return name() if callable(name) else str(name)


def _accessors(source: str) -> tuple[str, list[str]]:
    """Split `L['self']._modules['a']._parameters['w']` into its root ('self') and accessors."""
    root = _ROOT.match(source)
    if root is None:
        return "", []
    parts = [a or b or c for a, b, c in _ACCESS.findall(source[root.end() :])]
    if root.group(1) == "args" and parts[:1] == ["0"] and parts[1:2] and parts[1] in _CONTAINERS:
        return "self", parts[1:]  # a decorated forward: its first argument is the compiled module
    return root.group(1), parts


def state_name_from_source(source: str) -> str | None:
    """`L['self']._modules['layers']._modules['0']._parameters['weight']` -> `layers.0.weight`.

    None unless the source reads a module's parameter or buffer. State of the compiled module
    itself (`L['self']`) is named as in its `named_parameters()`; state reached from another root
    (a global module, say) keeps that root's name as the first part.
    """
    root, parts = _accessors(source)
    if len(parts) < 2 or parts[-2] not in ("_parameters", "_buffers"):
        return None
    dotted = [p for p in parts if p not in _CONTAINERS]
    return ".".join(dotted if root == "self" else [root, *dotted])


def describe_input(node: fx.Node) -> InputInfo:
    """Classify one placeholder of Dynamo's graph from its source (see InputInfo)."""
    source = _source_text(node)
    if isinstance(node.meta.get("example_value"), torch.SymInt):
        return InputInfo("size", node.name, source)
    state = state_name_from_source(source)
    if state is not None:
        return InputInfo("state", state, source)
    root, parts = _accessors(source)
    tail = [p for p in parts if p not in _CONTAINERS]
    if root == "kwargs" and tail:  # L['kwargs']['input_ids'] -> input_ids
        return InputInfo("input", "_".join(tail), source)
    return InputInfo("input", "_".join([root, *tail]) if root else node.name, source)


def _identifier(text: str) -> str:
    name = re.sub(r"\W", "_", text).strip("_") or "arg"
    return name if not name[0].isdigit() else f"_{name}"


def _fake_inputs(placeholders: list[fx.Node], example_inputs: Sequence[Any]) -> tuple[Any, list[Any]]:
    """The fake mode to trace in and each input as a fake value of it.

    Inside `torch.compile` the backend's fake mode (TracingContext) shares Dynamo's shape env but
    not its tensors, so real inputs are fakified as AOT autograd does it: with the symbolic context
    Dynamo recorded for them, which gives the same size symbols and the same memoized scalars
    (`.item()` of an unspecialized float attribute). Outside it, Dynamo's recorded fake values are used.
    """
    context = TracingContext.try_get()
    fake_mode = context.fake_mode if context is not None else None
    if fake_mode is None:
        vals = [n.meta.get("example_value", x) for n, x in zip(placeholders, example_inputs)]
        fake_mode = detect_fake_mode(vals)
        if fake_mode is None:
            raise RewriteError(
                "the rewrite backend takes graphs from torch.compile (Dynamo), whose inputs carry fake "
                "values; to rewrite an nn.Module directly use rewrite.optimize"
            )
        return fake_mode, vals
    vals = []
    for x in example_inputs:
        if not isinstance(x, torch.Tensor) or (isinstance(x, FakeTensor) and x.fake_mode is fake_mode):
            vals.append(x)
        elif isinstance(x, FakeTensor):
            vals.append(fake_mode.from_tensor(x))
        else:
            symbolic = context.tensor_to_context.get(x)
            source = symbolic.tensor_source if symbolic is not None else None
            vals.append(fake_mode.from_tensor(x, symbolic_context=symbolic, source=source, trace=False))
    return fake_mode, vals


def _concrete(x: Any) -> Any:
    """A real value to probe masks with: real tensors as they are, SymInts by their hint, fakes -> None."""
    if isinstance(x, FakeTensor):
        return None
    if isinstance(x, torch.SymInt):
        hint = x.node.hint
        return int(hint) if hint is not None else None
    return x


def _probe_masks(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Record which attention masks are causal, as `capture` does, when the inputs are real."""
    values = [_concrete(x) for x in example_inputs]
    if any(v is None for v, x in zip(values, example_inputs) if x is not None):
        return
    annotate_mask_causality(gm, values)


def _where(node: fx.Node) -> str:
    """`module path, file:line` of a node of Dynamo's graph, as far as its metadata tells."""
    paths = [_COMPILED_MODULE.match(path) for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
    module = next((path.string[path.end():].lstrip(".") for path in reversed(paths) if path is not None), "")
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    frames = [line.strip() for line in trace if line.strip().startswith("File ")]
    outside_torch = [frame for frame in frames if "/torch/" not in frame]  # the model's code, not vmap's
    place = (outside_torch or frames or [""])[-1].split(", in ")[0]
    return ", ".join(part for part in (f"module {module!r}" if module else "", place) if part) or "unknown place"


def _refuse_function_transforms(gm: fx.GraphModule) -> None:
    """Raise RewriteError naming the first node of a functorch transform (torch.vmap, jvp; also inside
    `torch._higher_order_ops.associative_scan`, which Hugging Face's Mamba uses under torch.compile): Dynamo
    inlines them as level markers around batched tensors, which a retrace into ATen cannot follow (it would
    leave fake values in the graph as constants and fail on the first call)."""
    for node in gm.graph.nodes:
        target = node.target
        if node.op == "call_function" and getattr(target, "__module__", None) == "torch._functorch.predispatch":
            raise RewriteError(
                f"the rewrite backend cannot normalize Dynamo's graph: node {node.name!r} "
                f"({getattr(target, '__name__', target)}, at {_where(node)}) belongs to a functorch transform "
                "(torch.vmap or jvp, also used by torch._higher_order_ops.associative_scan), which the retrace "
                "into ATen ops does not support; call that code outside the compiled region, write it without "
                "the transform (Hugging Face Mamba: config.use_associative_scan=False), or use rewrite.optimize")


def _refuse_fake_constants(traced: fx.GraphModule) -> None:
    """Safety net: a value the retrace lost track of becomes a fake-tensor constant, which fails only when the
    graph runs; say so now."""
    for node in traced.graph.nodes:
        if node.op == "get_attr" and isinstance(getattr(traced, str(node.target), None), FakeTensor):
            users = ", ".join(sorted(u.name for u in node.users)) or "nothing"
            raise RewriteError(
                f"the rewrite backend cannot normalize Dynamo's graph: retracing it into ATen ops lost track of a "
                f"value (read by {users}, at {_where(node)}), which would be left in the graph as a fake constant; "
                "the op that made it is not supported by the retrace")


def to_aten_ir(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """Retrace Dynamo's `gm` into the ATen pre-dispatch IR that `rewrite.optimize`'s passes read.

    The result takes the same positional inputs in the same order as `gm` and returns the same
    outputs. Placeholders get readable names; parameters and buffers carry `meta['state_name']`.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise ValueError(
            f"Dynamo graph has {len(placeholders)} inputs but {len(example_inputs)} example inputs"
        )
    _refuse_function_transforms(gm)
    infos = [describe_input(n) for n in placeholders]
    fake_mode, vals = _fake_inputs(placeholders, example_inputs)
    with torch.fx.traceback.preserve_node_meta(), fake_mode:  # the inputs are fake already: trace "real"
        traced = make_fx(fx.Interpreter(gm).run, pre_dispatch=True, record_module_stack=True)(*vals)
    new_placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    for node, old, info in zip(new_placeholders, placeholders, infos):
        node._rename(_identifier(info.name) if info.kind != "size" else old.name)
        node.target = node.name
        node.meta[SOURCE_KEY] = info.source
        if info.kind == "state":
            node.meta[STATE_KEY] = info.name
    _refuse_fake_constants(traced)
    traced.graph.lint()
    traced.recompile()
    canonicalize_score_masks(traced)  # the capture's rewrites of hand-written mask forms (rewrite.capture)
    drop_empty_concats(traced)
    _probe_masks(traced, example_inputs)
    return traced


__all__ = ["InputInfo", "describe_input", "state_name_from_source", "to_aten_ir"]
