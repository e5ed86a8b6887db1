"""The check that a threaded decode program's one-token step computes what its prefill computes.

The stateful pass carries softmax attention (KV caches), the `mixer` pass's linear mixers (recurrent states) and
causal depthwise convs (their last inputs) from one call to the next. Any other op that mixes tokens (a selective
scan written with cumsums and einsums, a shift, a pooled statistic) would read only the new token in a decode
step, and the step's logits would be silently wrong. The check runs a short example prompt twice: whole, and as a
prefill of all but its last token followed by one decode step, recording every floating-point value that holds one
token dim at the last token; the first value that differs beyond the dtype's tolerance is the op at fault, named
in the error with its module.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import sympy
import torch
import torch.fx as fx

from rewrite.analysis.nodes import module_path, tensor_meta
from rewrite.analysis.shapes import to_expr
from rewrite.errors import PassError

PROMPT_TOKENS = 6
"""Tokens of the example prompt: its last one is decoded as a step after a prefill of the others."""
FLOAT_TOLERANCE = 1e-4
"""Largest difference allowed between a value of the step and of the whole prompt, relative to their largest
magnitude, in float32 on the CPU and in float64 (whose values may have been computed in float32 and cast). A token
the step does not see changes a value by far more (its own order of magnitude: 0.95 for LFM2's conv without its
state)."""
ACCELERATOR_FLOAT32_TOLERANCE = 2e-2
"""float32 off the CPU: matmuls and convolutions may run in TF32 (cuDNN's default for convolutions)."""
HALF_TOLERANCE = 0.2
"""float16 / bfloat16: a prefill and a step round differently through every layer (the decode benchmark's
bf16 logits differ by about 2e-2 between them)."""


def tolerance(value: torch.Tensor) -> float:
    """The difference allowed for a value of this dtype and device."""
    if value.dtype in (torch.float16, torch.bfloat16):
        return HALF_TOLERANCE
    if value.dtype == torch.float32 and value.device.type != "cpu":
        return ACCELERATOR_FLOAT32_TOLERANCE
    return FLOAT_TOLERANCE

CARRIED = ("the decode state carries softmax attention as KV caches, the `mixer` pass's linear mixers as recurrent "
           "states and causal depthwise convs over the tokens as their last inputs")


def _is_view(node: fx.Node) -> bool:
    return node.op == "call_function" and bool(getattr(node.target, "is_view", False))


def _written_later(gm: fx.GraphModule) -> set[fx.Node]:
    """Values whose memory an op writes in place, or that hold no defined value (`empty`): the buffer and every view
    of it, whose value when made is not what later ops read."""
    roots = set()
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        if schema is None:
            continue
        if schema.name.startswith("aten::empty") or schema.name.startswith("aten::new_empty"):
            roots.add(node)
            continue
        for arg, value in zip(schema.arguments, node.args):
            if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, fx.Node):
                while _is_view(value) and isinstance(value.args[0], fx.Node):
                    value = value.args[0]
                roots.add(value)
    written, todo = set(), list(roots)
    while todo:
        node = todo.pop()
        if node not in written:
            written.add(node)
            todo.extend(u for u in node.users if _is_view(u))
    return written


def _token_dims(gm: fx.GraphModule, seq: sympy.Expr) -> dict[fx.Node, int]:
    """Floating-point values with exactly one dim of the token count `seq` that no op writes in place later:
    node -> that dim."""
    dims = {}
    written = _written_later(gm)
    for node in gm.graph.nodes:
        val = tensor_meta(node)
        if val is None or not val.is_floating_point() or node in written:
            continue
        hits = [i for i, size in enumerate(val.shape) if isinstance(size, torch.SymInt) and to_expr(size) == seq]
        if len(hits) == 1:
            dims[node] = hits[0]
    return dims


def _token_count(gm: fx.GraphModule) -> sympy.Expr | None:
    """The symbol of the token dim of the program's token ids (its first 2-d integer input)."""
    for node in gm.graph.nodes:
        val = tensor_meta(node) if node.op == "placeholder" else None
        if val is not None and not val.is_floating_point() and val.dim() == 2 and isinstance(val.shape[1], torch.SymInt):
            return to_expr(val.shape[1])
    return None


class _LastTokenRecorder(fx.Interpreter):
    """Runs the program, keeping each recorded value at one token (`at`: index along its token dim)."""

    def __init__(self, gm: fx.GraphModule, dims: dict[fx.Node, int], at: int):
        super().__init__(gm)
        self.dims, self.at, self.seen = dims, at, {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        dim = self.dims.get(n)
        if dim is not None and isinstance(out, torch.Tensor) and out.dim() > dim and out.shape[dim] > 0:
            self.seen[n] = out.detach().select(dim, self.at if self.at >= 0 else out.shape[dim] + self.at).clone()
        return out


def _difference(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-30)
    return (a - b).abs().max().item() / scale


def check_step_matches_prefill(
    gm: fx.GraphModule,
    call: Callable[[Callable[..., Any], torch.Tensor, torch.Tensor, Any], torch.Tensor],
    new_state: Callable[[int, int], Any],
    ids: torch.Tensor,
    model_name: str,
) -> None:
    """Raise PassError naming the first op whose value at the last token of `ids` [1, T] differs between the whole
    prompt and a prefill of T-1 tokens followed by one decode step (in half precision, warn instead). `call(module, ids, positions, state)` runs a
    callable taking the program's flat inputs (the program's own way of calling); `new_state(batch, capacity)`."""
    seq = _token_count(gm)
    if seq is None:
        return
    dims = _token_dims(gm, seq)
    length = ids.shape[1]
    positions = torch.arange(length, device=ids.device)[None, :]

    whole = _LastTokenRecorder(gm, dims, -1)
    state = new_state(1, length)
    state.begin(length)
    call(whole.run, ids, positions, state)

    stepped = _LastTokenRecorder(gm, dims, 0)
    state = new_state(1, length)
    state.begin(length - 1)
    call(fx.Interpreter(gm).run, ids[:, :-1], positions[:, :-1], state)
    state.advance()
    state.begin(1)
    call(stepped.run, ids[:, -1:], positions[:, -1:], state)

    for node in gm.graph.nodes:
        a, b = whole.seen.get(node), stepped.seen.get(node)
        if a is None or b is None or a.shape != b.shape or a.numel() == 0:
            continue
        difference = _difference(a, b)
        if difference <= tolerance(a):
            continue
        path = module_path(node) or "<root>"
        found = (f"the value of {node.name} ({path}) at a prompt's last token differs by {difference:.2g} (relative) "
                 "when that token is decoded as a step after the others are prefilled")
        if a.dtype in (torch.float16, torch.bfloat16):  # rounding can flip a choice (an expert, a top-k): warn
            warnings.warn(f"{model_name} may not decode token by token: {found}. In {a.dtype} this can be rounding "
                          "that flipped a discrete choice (a mixture-of-experts router's top-k) as well as a token "
                          f"mixer the decode state does not carry ({CARRIED}); check the model's decode in float32",
                          RuntimeWarning, stacklevel=2)
            return
        raise PassError(
            "stateful",
            f"{model_name} cannot decode token by token: {found}, so an op up to there mixes tokens in a way the "
            f"decode state does not carry ({CARRIED}); a selective scan or a convolution written in another form, "
            "for example. Generate with the original model, or replace that layer's token mixing with the `mixer` "
            "pass",
            node.name, path)
