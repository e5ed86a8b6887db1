"""Facts about single graph nodes: owning module, state name, value, op identity."""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.fx as fx

# The compiled module is `L['self']`, or `L['args'][0]` when Dynamo enters through a decorated
# forward (a wrapper whose first positional argument is the module).
_DYNAMO_PREFIX = re.compile(r"^L\[(?:'self'\]|'args'\]\[0\])\.?")
_DYNAMO_INDEX = re.compile(r"\[(\d+)\]")


def normalize_module_path(path: str) -> str:
    """`L['self'].model.layers[0].mlp`, `L['args'][0].model.layers[0].mlp` or `model.layers.0.mlp`
    -> `model.layers.0.mlp`."""
    path = _DYNAMO_PREFIX.sub("", path)
    path = _DYNAMO_INDEX.sub(r".\1", path)
    path = path.replace("._modules['", ".").replace("']", "")
    return path.strip(".")


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """(module path, class name) from outermost to innermost for the module that produced `node`."""
    stack = node.meta.get("nn_module_stack") or {}
    out: list[tuple[str, str]] = []
    for value in stack.values():
        path, cls = value
        if str(path).startswith("_empty_nn_module_stack"):
            continue  # export's placeholder for nodes outside any module
        name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
        norm = normalize_module_path(path)
        if norm or not out:
            out.append((norm, name))
    return [(p, c) for p, c in out if p] or []


def module_path(node: fx.Node) -> str:
    """Innermost owning module path of `node`, or '' for top-level code."""
    stack = module_stack(node)
    return stack[-1][0] if stack else ""


def state_name(node: fx.Node) -> str | None:
    """Dotted name of the parameter/buffer `node` reads, or None if it is not model state."""
    if node.op == "get_attr":
        return str(node.target)
    if node.op == "placeholder":
        return node.meta.get("state_name")
    return None


def value(node: Any) -> Any:
    """The example (fake) value recorded for `node`, or the constant itself."""
    if isinstance(node, fx.Node):
        return node.meta.get("val", node.meta.get("example_value"))
    return node


def is_op(node: Any, *targets: Any) -> bool:
    """Whether `node` is a call_function to one of `targets` (OpOverload, OpOverloadPacket or callable)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    return any(target is t or (packet is not None and packet is t) for t in targets)


def op_name(node: fx.Node) -> str:
    """Short readable name of what `node` computes (`aten.linear`, `rewrite.attention`, `output`)."""
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            return f"{target.namespace}.{target._opname}"
        return getattr(target, "__name__", str(target))
    if node.op in ("call_module", "get_attr"):
        return f"{node.op}:{node.target}"
    return node.op


def tensor_meta(node: fx.Node) -> torch.Tensor | None:
    """The node's example tensor value if it produces one tensor."""
    val = value(node)
    return val if isinstance(val, torch.Tensor) else None
