"""Modules shown token-wise by running them: each token's output depends on that token alone.

Some per-token computations are written with ops that no token-wise rule covers. A mixture-of-experts
block sorts the tokens by expert, runs each expert on its group and puts the results back in order:
its graph mixes tokens, the module does not. When the varlen walk meets such an op, it looks for the
innermost enclosing module of the source model that takes the hidden states [batch, seq, hidden] as
its only per-token input, and runs it (`tokenwise_reason`) on random hidden states in three layouts:
as given, packed into one row, and a shuffled subset of the tokens in one row. If every token's
output agrees, the module's nodes run on the packed tokens as a whole (sizes rewritten to the packed
ones), as the module itself did on the packed row. This is shown on the inputs tried, not proved
op by op; a module whose tokens compete (expert capacity limits) or that draws random numbers fails.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from rewrite.analysis.nodes import module_path, tensor_meta
from rewrite.varlen.symbols import TokenDims, TokenSymbols

PROBE_BATCH, PROBE_SEQ, PROBE_SUBSET = 2, 5, 6
"""Random hidden states [PROBE_BATCH, PROBE_SEQ, hidden]; the subset run keeps PROBE_SUBSET of the tokens."""

TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9}
"""Relative tolerance between layouts per parameter dtype (else 2e-2, for half precision)."""


def _rows(value: object, batch: int, seq: int) -> list[torch.Tensor] | str:
    """Each tensor of a module's output as per-token rows [batch * seq, ...], or why it is not per token."""
    rows = []
    for t in pytree.tree_leaves(value):
        if not isinstance(t, torch.Tensor):
            continue
        if t.dim() >= 2 and tuple(t.shape[:2]) == (batch, seq):
            rows.append(t.reshape(batch * seq, *t.shape[2:]))
        elif t.dim() >= 1 and t.shape[0] == batch * seq:
            rows.append(t)
        else:
            return f"an output of shape {tuple(t.shape)} is not per token of input [{batch}, {seq}, ...]"
    return rows if rows else "it returns no tensor"


def tokenwise_reason(module: torch.nn.Module, hidden: int) -> str | None:
    """None if `module(hidden_states)` maps [B, L, hidden] token by token on the probe inputs, else why not."""
    first = next(iter(module.parameters()), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    device = first.device if first is not None else torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(PROBE_BATCH, PROBE_SEQ, hidden, generator=g).to(device, dtype)
    total = PROBE_BATCH * PROBE_SEQ
    subset = torch.randperm(total, generator=g)[:PROBE_SUBSET].to(device)
    try:
        with torch.no_grad():
            full = _rows(module(x), PROBE_BATCH, PROBE_SEQ)
            packed = _rows(module(x.reshape(1, total, hidden)), 1, total)
            part = _rows(module(x.reshape(total, hidden)[subset][None]), 1, PROBE_SUBSET)
    except Exception as exc:  # noqa: BLE001 - any failure means the module was not shown token-wise
        return f"calling it on hidden states [batch, seq, {hidden}] failed: {type(exc).__name__}: {exc}"
    for got in (full, packed, part):
        if isinstance(got, str):
            return got
    tol = TOLERANCE.get(dtype, 2e-2)
    for want, one_row, some in zip(full, packed, part, strict=True):
        scale = want.abs().max().item() or 1.0
        if one_row.shape != want.shape or (one_row - want).abs().max().item() > tol * scale:
            return "its outputs change when the batch's rows are packed into one row"
        if (some - want[subset]).abs().max().item() > tol * scale:
            return "a token's output changes with the other tokens it runs with"
    return None


class TokenwiseModules:
    """Which module of the source model a node lies in that was shown token-wise (see the module docstring)."""

    def __init__(self, graph: fx.Graph, symbols: TokenSymbols, source: torch.nn.Module | None):
        self.graph, self.symbols, self.source = graph, symbols, source
        self.verdicts: dict[str, str | None] = {}  # module path -> None (token-wise) or why not
        self.accepted: list[str] = []

    def members(self, path: str) -> list[fx.Node]:
        """The graph's nodes owned by module `path` or its submodules."""
        return [n for n in self.graph.nodes if _inside(module_path(n), path)]

    def owner(self, node: fx.Node) -> str | None:
        """The accepted token-wise module `node` lies in, if any."""
        path = module_path(node)
        return next((m for m in self.accepted if _inside(path, m)), None)

    def find(self, node: fx.Node, kind_of: Callable[[fx.Node], str]) -> tuple[str | None, list[str]]:
        """(the innermost module enclosing `node` shown token-wise, now accepted, or None; why each candidate failed)."""
        path = module_path(node)
        parts = path.split(".") if path else []
        why = []
        for depth in range(len(parts), 0, -1):
            candidate = ".".join(parts[:depth])
            verdict = self._verdict(candidate, kind_of)
            if verdict is None:
                self.accepted.append(candidate)
                return candidate, why
            why.append(f"{candidate}: {verdict}")
        return None, why

    def _verdict(self, path: str, kind_of: Callable[[fx.Node], str]) -> str | None:
        if path not in self.verdicts:
            self.verdicts[path] = self._judge(path, kind_of)
        return self.verdicts[path]

    def _judge(self, path: str, kind_of: Callable[[fx.Node], str]) -> str | None:
        inside = set(self.members(path))
        outer = {a for n in inside for a in n.all_input_nodes if a not in inside and a.op != "get_attr"
                 and kind_of(a) not in ("sym", "free")}
        if len(outer) != 1:
            return f"it reads {len(outer)} per-token values from outside, not only its hidden states"
        (hidden,) = outer
        val = tensor_meta(hidden)
        if kind_of(hidden) != "token" or self.symbols.node_dims(hidden) != TokenDims(0, 1) or val is None:
            return f"its input {hidden.name!r} is not packed hidden states [batch, seq, ...]"
        if self.source is None:
            return "the source model is not at hand to run it (a graph without its nn.Module)"
        try:
            module = self.source.get_submodule(path)
        except AttributeError:
            return "the source model has no such submodule"
        if module.training:
            return "it is in training mode (dropout or noise would differ between runs)"
        return tokenwise_reason(module, int(val.shape[-1]))


def _inside(path: str, module: str) -> bool:
    return path == module or path.startswith(module + ".")


__all__ = ["TokenwiseModules", "tokenwise_reason"]
