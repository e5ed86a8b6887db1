"""Modules shown token-wise by running them: each token's output depends on that token alone.

Some per-token computations are written with ops that no token-wise rule covers. A mixture-of-experts
block sorts the tokens by expert, runs each expert on its group and puts the results back in order:
its graph mixes tokens, the module does not. When the varlen walk meets such an op, it looks for the
innermost enclosing module of the source model that takes the hidden states [batch, seq, hidden] as
its only per-token input, and runs it (`tokenwise_reason`) on random hidden states in three layouts:
as given, packed into one row, and a shuffled subset of the tokens in one row. If every token's
output agrees, the module's nodes run on the packed tokens as a whole (sizes rewritten to the packed
ones), as the module itself did on the packed row. This is shown on the inputs tried, not proved
op by op; a module whose tokens compete (expert capacity limits) fails. The module runs in eval mode
for the probe: dropout and router noise act per token, so a module in training mode is judged by its
eval-mode function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from rewrite.analysis.nodes import module_path, tensor_meta
from rewrite.varlen.symbols import TokenDims, TokenSymbols

PROBE_BATCH, PROBE_SEQ, PROBE_SUBSET = 2, 5, 6
"""Random hidden states [PROBE_BATCH, PROBE_SEQ, hidden]; the context run keeps PROBE_SUBSET of the tokens."""

PROBE_REPEATS = 256
"""The crowd run: one token repeated this many times in one row, so every copy picks the same experts and an
expert with a capacity below it drops some of them."""

CONTEXT_SCALE = 100.0
"""The context run scales the other tokens by this much, so a dependence on them shows above rounding."""

TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9}
"""Relative tolerance per token between runs, by the dtype the module computes in (else 2e-2, half precision)."""


def _rows(value: object, batch: int, seq: int) -> list[torch.Tensor] | str:
    """Each tensor of a module's output as per-token rows [batch * seq, -1] in float64, or why it is not per token."""
    rows = []
    for t in pytree.tree_leaves(value):
        if not isinstance(t, torch.Tensor):
            continue
        per_token = (t.dim() >= 2 and tuple(t.shape[:2]) == (batch, seq)) or (t.dim() >= 1 and t.shape[0] == batch * seq)
        if per_token:
            rows.append(t.reshape(batch * seq, -1).double())
        else:
            return f"an output of shape {tuple(t.shape)} is not per token of input [{batch}, {seq}, ...]"
    return rows if rows else "it returns no tensor"


def _differ(got: list[torch.Tensor], want: list[torch.Tensor], tol: float) -> bool:
    """Whether any token's output differs from the reference by more than `tol` of that token's own magnitude."""
    for a, b in zip(got, want, strict=True):
        if a.shape != b.shape:
            return True
        scale = b.abs().amax(-1).clamp(min=1e-6)
        if bool(((a - b).abs().amax(-1) > tol * scale).any()):
            return True
    return False


def tokenwise_reason(module: torch.nn.Module, hidden: int, dtype: torch.dtype | None = None) -> str | None:
    """None if `module(hidden_states)` maps [B, L, hidden] token by token on the probe inputs, else why not.

    Four runs: the batch as given; its rows packed into one row; some tokens in a shuffled order next to the
    other tokens scaled by CONTEXT_SCALE; one token repeated PROBE_REPEATS times. Each token's output must
    agree across runs. `dtype` is the hidden states' dtype (default: the module's first floating parameter's).
    """
    params = [p for p in module.parameters() if p.is_floating_point()]
    dtype = dtype or (params[0].dtype if params else torch.float32)
    device = params[0].device if params else torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    total = PROBE_BATCH * PROBE_SEQ
    x = torch.randn(PROBE_BATCH, PROBE_SEQ, hidden, generator=g)
    subset = torch.randperm(total, generator=g)[:PROBE_SUBSET]
    others = torch.ones(total, dtype=torch.bool)
    others[subset] = False
    context = x.reshape(total, hidden).clone()
    context[others] *= CONTEXT_SCALE
    context = torch.cat([context[subset], context[others]])[None]  # the kept tokens first, shuffled
    crowd = x[:1, :1].expand(1, PROBE_REPEATS, hidden)
    runs = {"given": (x, PROBE_BATCH, PROBE_SEQ), "packed": (x.reshape(1, total, hidden), 1, total),
            "context": (context, 1, total), "crowd": (crowd, 1, PROBE_REPEATS), "alone": (x[:1, :1], 1, 1)}
    out: dict[str, list[torch.Tensor]] = {}
    try:
        with torch.no_grad():
            for name, (inputs, batch, seq) in runs.items():
                rows = _rows(module(inputs.to(device, dtype)), batch, seq)
                if isinstance(rows, str):
                    return rows
                out[name] = rows
    except Exception as exc:  # noqa: BLE001 - any failure means the module was not shown token-wise
        return f"calling it on hidden states [batch, seq, {hidden}] failed: {type(exc).__name__}: {exc}"
    tol = TOLERANCE.get(dtype, 2e-2)
    if _differ(out["packed"], out["given"], tol):
        return "its outputs change when the batch's rows are packed into one row"
    if _differ([r[:PROBE_SUBSET] for r in out["context"]], [r[subset] for r in out["given"]], tol):
        return "a token's output changes with the other tokens it runs with"
    if _differ(out["crowd"], [r.expand(PROBE_REPEATS, -1) for r in out["alone"]], tol):
        return ("copies of one token get different outputs when many run together (experts with a capacity "
                "drop the tokens over it)")
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
        dims = self.symbols.node_dims(hidden)
        layout = isinstance(dims, TokenDims) and dims.seq == 1 and dims.batch in (0, None) and not dims.merged
        if kind_of(hidden) != "token" or not layout or val is None or val.dim() != 3:
            return f"its input {hidden.name!r} is not packed hidden states [batch, seq, ...]"
        if self.source is None:
            return "the source model is not at hand to run it (a graph without its nn.Module)"
        try:
            module = self.source.get_submodule(path)
        except AttributeError:
            return "the source model has no such submodule"
        was_training = module.training
        module.eval()  # dropout and router noise are per token, but random: the probe compares eval runs
        try:
            return tokenwise_reason(module, int(val.shape[-1]), val.dtype)
        finally:
            module.train(was_training)


def _inside(path: str, module: str) -> bool:
    return path == module or path.startswith(module + ".")


__all__ = ["TokenwiseModules", "tokenwise_reason"]
