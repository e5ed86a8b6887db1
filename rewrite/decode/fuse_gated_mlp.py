"""Fused gated MLP activations in a decode program.

A Hugging Face gated MLP (`down_proj(act_fn(gate_proj(x)) * up_proj(x))`, or Phi-3's one `gate_up_proj` split in
two by `chunk`) leaves the activation and the product in the graph as two kernels per layer: `aten.silu` (Llama,
Mistral, Qwen2 / Qwen3, Phi-3) or `aten.gelu(approximate="tanh")` (Gemma's `gelu_pytorch_tanh`), then `aten.mul`.
Each such pair, the product's factors in either order and of one shape and dtype, whose activation nothing else
reads, becomes one `rewrite::gated_activation` call (one Triton kernel on CUDA, reading the halves of a fused
projection in place) that rounds as the two ops do. Anything else (another activation, exact GELU, a product that
broadcasts) is left as it is. Off by default (`FUSE_GATED_ACTIVATION`): the time it saves has not been measured on
a GPU yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

import rewrite.kernels.gated_activation  # noqa: F401  (registers rewrite::gated_activation)
from rewrite.analysis.graph_utils import erase_unused
from rewrite.analysis.nodes import is_op
from rewrite.kernels.gated_activation.op import DTYPES

aten = torch.ops.aten

FUSE_GATED_ACTIVATION = True
"""Whether a decode program built from now on fuses its gated MLP activations (read when `DecodeProgram` is built;
`rewrite.decode.decode_program` builds the program again when this changes). On by
default: with the other decode fusions it took a graphed batch-1 8K step from 2.35 to 1.55 ms (BENCHMARKS.md,
2026-12-07)."""


@dataclass
class GatedActivation:
    """One `mul(act(gate), up)` of a graph: `mul` is its result, `act` the activation node only it reads."""

    mul: fx.Node
    act: fx.Node
    gate: fx.Node
    up: fx.Node
    kind: str


def _val(node: object) -> torch.Tensor | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two meta values have the same shape, without guarding on symbolic sizes."""
    return a.dim() == b.dim() and all(
        x is y or str(x) == str(y) for x, y in zip(a.shape, b.shape, strict=True)
    )


def activation_kind(node: object) -> str | None:
    """The kind of activation `node` is: "silu" for `aten.silu(gate)`, "gelu_tanh" for
    `aten.gelu(gate, approximate="tanh")`, else None."""
    if is_op(node, aten.silu.default) and len(node.args) == 1 and not node.kwargs:
        return "silu"
    if is_op(node, aten.gelu.default) and len(node.args) in (1, 2):
        given = dict(zip(("self", "approximate"), node.args, strict=False))
        given.update(node.kwargs)
        if set(given) <= {"self", "approximate"} and given.get("approximate") == "tanh":
            return "gelu_tanh"
    return None


def gated_activation(mul: fx.Node) -> GatedActivation | None:
    """`mul` as `act(gate) * up` (either order) that `rewrite::gated_activation` computes: gate, up, the
    activation and the product all of one shape and one dtype the op takes, the activation read by `mul` alone."""
    if not is_op(mul, aten.mul.Tensor) or len(mul.args) != 2 or mul.kwargs:
        return None
    for act, up in (mul.args, mul.args[::-1]):
        kind = activation_kind(act)
        if kind is None or not isinstance(up, fx.Node) or up is act or set(act.users) != {mul}:
            continue
        gate = act.args[0]
        values = [_val(n) for n in (gate, up, act, mul)]
        if any(v is None for v in values) or not isinstance(gate, fx.Node):
            continue
        if (
            all(_same_shape(v, values[0]) and v.dtype == values[0].dtype for v in values)
            and values[0].dtype in DTYPES
        ):
            return GatedActivation(mul, act, gate, up, kind)
    return None


def gated_activations(gm: fx.GraphModule) -> list[GatedActivation]:
    """The fusable gated activations of `gm`'s graph, in graph order."""
    found = (gated_activation(node) for node in gm.graph.nodes if is_op(node, aten.mul.Tensor))
    return [m for m in found if m is not None]


def fuse_gated_activations(gm: fx.GraphModule) -> int:
    """Replace every match of `gated_activations(gm)` by one `rewrite::gated_activation` call, recompile `gm`, and
    return how many were fused."""
    matches = gated_activations(gm)
    graph = gm.graph
    for m in matches:
        with graph.inserting_before(m.mul):
            call = graph.call_function(torch.ops.rewrite.gated_activation.default, (m.gate, m.up, m.kind))
        call.meta = dict(m.mul.meta)
        value = _val(m.mul)
        call.meta["val"] = value.new_empty(value.shape)  # contiguous, as the op's output is
        m.mul.replace_all_uses_with(call)
        erase_unused(graph, [m.mul, m.act])
    if matches:
        graph.lint()
        gm.recompile()
    return len(matches)
