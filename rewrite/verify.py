"""Check an optimized module against its original: every output within tolerance, and if not, where
the two programs first diverge (the first graph node whose value differs, with its module path).

When the optimized module publishes a real-token description (`OptimizedModule.real_tokens`, set by
the `varlen` pass; see `rewrite.real_tokens`), only the values it says are comparable are compared:
per-token outputs on real tokens, values computed from repadded tensors on rows without padding. If
the module restarts positions per row and a row has padding before a real token, the original is
called with those positions as `position_ids` when its forward takes that argument (the report says
so). The first diverging node is then looked for on real tokens too, packing the captured program's
[batch, seq, ...] values to their real tokens where the optimized program holds packed ones.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from rewrite.analysis.nodes import module_path, op_name
from rewrite.capture import config_cache_off, order_kwargs
from rewrite.errors import VerificationError
from rewrite.real_tokens import OutputTokens, RealTokens, program_inputs, select


@dataclass
class OutputCheck:
    """How one output leaf of the optimized module compares with the original's."""

    path: str
    shape: tuple[int, ...] | None
    max_abs: float
    max_rel: float
    passed: bool
    problem: str | None = None  # a mismatch that is not numeric (shape, dtype, type, value), or where values differ
    compared: str | None = None  # which values were compared, when not all of them (real tokens only, say)


@dataclass
class Divergence:
    """The first node (in the captured program's execution order) whose value differs."""

    node: str
    op: str
    module_path: str
    max_abs: float
    max_rel: float
    beyond_tolerance: bool  # False: nothing exceeds tolerance, this is merely the first nonzero difference
    new_op: str | None = None  # what the optimized program computes at this node, if the op changed
    new_inputs: list[str] = field(default_factory=list)  # inputs that exist only in the optimized program

    def describe(self) -> str:
        where = self.module_path or "<root>"
        kind = "diverges" if self.beyond_tolerance else "is the first to differ at all (within tolerance)"
        op = self.op if self.new_op is None else f"{self.op}, now {self.new_op}"
        text = f"node {self.node!r} ({op}, module {where}) {kind}: max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g}"
        if self.new_inputs:
            text += f"; it reads node(s) added by the passes: {', '.join(self.new_inputs)}"
        return text


@dataclass
class VerifyReport:
    """Per-output errors of optimized vs original, and where they first diverge if they do."""

    outputs: list[OutputCheck]
    atol: float
    rtol: float
    divergence: Divergence | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(o.passed for o in self.outputs)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    def __str__(self) -> str:
        head = f"{'output':<36} {'shape':<18} {'max abs':>10} {'max rel':>10}  ok"
        lines = [head, "-" * len(head)]
        for o in self.outputs:
            shape = "x".join(map(str, o.shape)) if o.shape is not None else "-"
            lines.append(f"{o.path:<36} {shape:<18} {o.max_abs:>10.3g} {o.max_rel:>10.3g}  {'yes' if o.passed else 'NO'}")
            if o.compared:
                lines.append(f"    compared: {o.compared}")
            if o.problem:
                lines.append(f"    {o.problem}")
        verdict = "PASSED" if self.passed else "FAILED"
        lines.append(f"{verdict} (atol {self.atol:g}, rtol {self.rtol:g})")
        if self.divergence is not None:
            lines.append("first divergence: " + self.divergence.describe())
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        """Raise VerificationError carrying this report's table if any output is out of tolerance."""
        if not self.passed:
            raise VerificationError("the optimized module's outputs differ from the original's\n" + str(self))


def _errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """(max abs error, max rel error, |got - want|) in float64; NaN where both are NaN counts as equal."""
    a, b = got.detach().double(), want.detach().double()
    diff = (a - b).abs()
    both_nan = a.isnan() & b.isnan()
    same_inf = a.isinf() & (a == b)
    diff = torch.where(both_nan | same_inf, torch.zeros_like(diff), diff)
    diff = torch.nan_to_num(diff, nan=float("inf"))
    if diff.numel() == 0:
        return 0.0, 0.0, diff
    rel = diff / b.abs().clamp_min(torch.finfo(torch.float64).tiny)
    rel = torch.where(diff == 0, torch.zeros_like(rel), rel)
    return float(diff.max()), float(rel.max()), diff


def _close(diff: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> bool:
    return bool((diff <= atol + rtol * want.detach().double().abs().nan_to_num(0.0)).all())


Where = Callable[[int, torch.Tensor], tuple[torch.Tensor, str] | None]
"""Which values of flat output `index` (the original's tensor given) to compare: (bool mask, description), or
None for all."""


def compare_values(
    got: Any, want: Any, atol: float, rtol: float, path: str = "", where: tuple[torch.Tensor, str] | None = None
) -> OutputCheck:
    """Compare one output leaf (tensor or Python value); `where` = (bool mask of want's shape, what it selects)
    limits the comparison to the masked values. A failing tensor names the first value out of tolerance."""
    if isinstance(want, torch.Tensor) != isinstance(got, torch.Tensor):
        return OutputCheck(path, None, float("inf"), float("inf"), False,
                           f"type {type(got).__name__}, expected {type(want).__name__}")
    if not isinstance(want, torch.Tensor):
        ok = got == want
        return OutputCheck(path, None, 0.0 if ok else float("inf"), 0.0 if ok else float("inf"), bool(ok),
                           None if ok else f"value {got!r}, expected {want!r}")
    shape = tuple(want.shape)
    if got.shape != want.shape:
        return OutputCheck(path, shape, float("inf"), float("inf"), False,
                           f"shape {tuple(got.shape)}, expected {shape}")
    if got.dtype != want.dtype:
        return OutputCheck(path, shape, float("inf"), float("inf"), False, f"dtype {got.dtype}, expected {want.dtype}")
    mask, scope = where if where is not None else (None, None)
    picked_got, picked_want = (got, want) if mask is None else (got[mask], want[mask])
    max_abs, max_rel, diff = _errors(picked_got, picked_want)
    passed = _close(diff, picked_want, atol, rtol)
    compared = None if mask is None else f"{scope}, {int(mask.sum())} of {want.numel()} values"
    problem = None
    if not passed:
        _, _, full = _errors(got, want)
        bad = full > atol + rtol * want.detach().double().abs().nan_to_num(0.0)
        if mask is not None:
            bad &= mask
        found = bad.nonzero()
        problem = f"{int(bad.sum())} of {picked_want.numel()} compared values out of tolerance"
        if len(found) and want.dim():
            problem += f", the first at index {[int(i) for i in found[0]]}"
    return OutputCheck(path, shape, max_abs, max_rel, passed, problem, compared)


def compare_outputs(
    got: Any, want: Any, atol: float, rtol: float, where: Where | None = None
) -> tuple[list[OutputCheck], list[str]]:
    """Compare two output trees leaf by leaf (HF ModelOutput, tuples, dicts...).

    `where(index, want_leaf)` limits the comparison of flat output `index` (used only when both trees have the
    same structure, since the indices are the flat outputs of the optimized program)."""
    want_leaves, want_spec = pytree.tree_flatten_with_path(want)
    got_leaves, got_spec = pytree.tree_flatten_with_path(got)
    notes = []
    if [p for p, _ in want_leaves] != [p for p, _ in got_leaves]:
        notes.append(f"output structure differs: {got_spec} vs {want_spec}")
        want_map = {pytree.keystr(p): v for p, v in want_leaves}
        got_map = {pytree.keystr(p): v for p, v in got_leaves}
        checks = []
        for key in sorted(set(want_map) | set(got_map)):
            if key in want_map and key in got_map:
                checks.append(compare_values(got_map[key], want_map[key], atol, rtol, key))
            else:
                side = "optimized" if key in got_map else "original"
                checks.append(OutputCheck(key or "<output>", None, float("inf"), float("inf"), False,
                                          f"only the {side} module returns this"))
        return checks, notes
    checks = [
        compare_values(g, w, atol, rtol, pytree.keystr(p) or "<output>",
                       where(i, w) if where is not None and isinstance(w, torch.Tensor) else None)
        for i, ((p, w), (_, g)) in enumerate(zip(want_leaves, got_leaves))
    ]
    return checks, notes


class _Recorder(fx.Interpreter):
    """Runs a graph and keeps every node's tensor value by node name."""

    def __init__(self, module: fx.GraphModule):
        super().__init__(module)
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor) and n.op != "output":
            self.values[n.name] = result.detach()
        return result


def _record(root: torch.nn.Module, graph: fx.Graph, flat: list[Any]) -> dict[str, torch.Tensor]:
    plain = fx.Graph()
    plain.graph_copy(graph, {})  # nodes keep their names; default codegen takes flat placeholders
    plain.output(None)  # values are recorded as they are computed; every node runs
    gm = fx.GraphModule(root, plain)
    recorder = _Recorder(gm)
    with torch.no_grad():
        recorder.run(*flat)
    return recorder.values


@dataclass
class _RealTokenScope:
    """Real tokens of the inputs at hand: the description, the [batch, seq] mask, and the rows the captured program
    agrees on (all, unless positions restart per row: then the rows without padding before a real token)."""

    real: RealTokens
    keep: torch.Tensor
    rows: torch.Tensor

    def pick(self, node: fx.Node, want: torch.Tensor, got: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The comparable values of a captured node (`want`) and the optimized program's node of that name."""
        val = node.meta.get("val")
        dims = self.real.token_dims(val.shape) if isinstance(val, torch.Tensor) else None
        if dims is None:
            if isinstance(val, torch.Tensor) and any(isinstance(s, torch.SymInt) and str(s.node.expr) in
                                                     self.real.seq_symbols for s in val.shape):
                return None  # sequence-sized but not per row (positions, masks): not comparable here
            return (want, got) if want.shape == got.shape else None
        batch, seq = dims
        if seq is None:  # a per-row value: rows without padding
            rows = self.keep.all(dim=1) & self.rows
            if want.shape != got.shape:
                return None
            return want.movedim(batch, 0)[rows], got.movedim(batch, 0)[rows]
        keep = self.keep & self.rows[:, None]
        if want.shape == got.shape:
            mask = select(OutputTokens("tokens", batch, seq), want.shape, keep)
            return want[mask], got[mask]
        packed_shape = list(want.shape)
        packed_shape[batch], packed_shape[seq] = 1, int(self.keep.sum())
        if list(got.shape) != packed_shape:
            return None
        tokens = self.rows.repeat_interleave(self.keep.sum(dim=1))
        want_packed = want.movedim((batch, seq), (0, 1)).flatten(0, 1)[self.keep.reshape(-1)]
        got_packed = got.movedim((batch, seq), (0, 1)).flatten(0, 1)
        return want_packed[tokens], got_packed[tokens]


def find_divergence(
    root: torch.nn.Module,
    reference: fx.Graph,
    candidate: fx.Graph,
    args: tuple,
    kwargs: dict[str, Any],
    *,
    atol: float,
    rtol: float,
    seed: int = 0,
    real_tokens: _RealTokenScope | None = None,
) -> Divergence | None:
    """Run both graphs on the inputs (state from `root`); the first common node whose values differ.

    With `real_tokens`, values are compared on real tokens only, packed ones against the captured value's
    real tokens."""
    flat_ref = program_inputs(reference, args, kwargs)
    flat_new = program_inputs(candidate, args, kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        ref_values = _record(root, reference, flat_ref)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        new_values = _record(root, candidate, flat_new)
    new_nodes = {n.name: n for n in candidate.nodes}
    ref_names = {n.name for n in reference.nodes}
    first_nonzero: Divergence | None = None
    for node in reference.nodes:
        want, got = ref_values.get(node.name), new_values.get(node.name)
        if want is None or got is None or want.dtype != got.dtype:
            continue
        picked = (want, got) if real_tokens is None else real_tokens.pick(node, want, got)
        if picked is None or picked[0].shape != picked[1].shape:
            continue
        want, got = picked
        max_abs, max_rel, diff = _errors(got, want)
        if max_abs == 0.0:
            continue
        beyond = not _close(diff, want, atol, rtol)
        new_node = new_nodes[node.name]
        added = [a.name for a in new_node.all_input_nodes if a.name not in ref_names]
        new_op = op_name(new_node) if op_name(new_node) != op_name(node) else None
        found = Divergence(node.name, op_name(node), module_path(node), max_abs, max_rel, beyond, new_op, added)
        if beyond:
            return found
        if first_nonzero is None:
            first_nonzero = found
    return first_nonzero


def _takes_argument(module: torch.nn.Module, name: str, args: tuple, kwargs: dict[str, Any]) -> bool:
    """Whether `module.forward` has a parameter `name` that this call leaves unset."""
    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return False
    return name in params and name not in kwargs and params.index(name) >= len(args)


def _real_token_scope(
    original: torch.nn.Module, optimized: Any, captured: Any, args: tuple, kwargs: dict[str, Any],
    reference_kwargs: dict[str, Any],
) -> tuple[_RealTokenScope | None, list[str]]:
    """The real tokens of these inputs if `optimized` publishes them; adds `position_ids` to `reference_kwargs`
    when the module restarts positions per row, some row has padding before a real token and the original
    takes that argument."""
    real = getattr(optimized, "real_tokens", None)
    if not isinstance(real, RealTokens) or captured is None:
        return None, []
    full = order_kwargs({**captured.injected_kwargs, **kwargs}, captured.kwarg_order)
    keep = real.keep(program_inputs(optimized.graph, args, full))
    notes = [f"padded positions (padding mask {real.mask_input!r}) are not compared: the padding-free module "
             "holds 0 there"]
    rows = keep.new_ones(keep.shape[0])
    if real.restarts_positions and not bool(real.rows_where_positions_agree(keep).all()):
        if _takes_argument(original, "position_ids", args, reference_kwargs):
            reference_kwargs["position_ids"] = real.positions(keep).to(keep.device)
            notes.append("positions restart per row in the padding-free module, and a row has padding before "
                         "its real tokens: the original was given position_ids counted from each row's first real "
                         "token")
        else:
            notes.append("positions restart per row in the padding-free module, and a row has padding before "
                         "its real tokens; the original takes no position_ids to count them the same way, so "
                         "those rows may differ")
        rows = real.rows_where_positions_agree(keep)
    return _RealTokenScope(real, keep, rows), notes


def _run(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], seed: int) -> Any:
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        return module(*args, **kwargs)


def verify(
    original: torch.nn.Module,
    optimized: Any,
    args: tuple = (),
    kwargs: dict[str, Any] | None = None,
    *,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    seed: int = 0,
) -> VerifyReport:
    """Run both modules on the inputs (same RNG seed) and compare every output leaf.

    When outputs differ and `optimized` keeps its captured (pre-pass) graph, both programs are run
    node by node and the report names the first node where they diverge.
    """
    kwargs = dict(kwargs or {})
    got = _run(optimized, tuple(args), kwargs, seed)  # first: a call that captures again updates what follows
    captured = optimized.__dict__.get("_captured")
    injected = dict(captured.injected_kwargs) if captured is not None else {}
    reference_kwargs = {**injected, **kwargs}
    scope, scope_notes = _real_token_scope(original, optimized, captured, tuple(args), kwargs, reference_kwargs)
    # a model whose forward takes no use_cache was traced with its config's use_cache off: called so here too
    with config_cache_off(original, captured is not None and captured.cache_off_in_config):
        want = _run(original, tuple(args), reference_kwargs, seed)
    where = None
    if scope is not None:
        def where(index: int, leaf: torch.Tensor) -> tuple[torch.Tensor, str] | None:
            try:
                mask = scope.real.output_selector(index, leaf.shape, scope.keep)
            except RuntimeError:  # the original's output is not laid out as the pass said: compare it all
                return None
            if mask is None:
                return None
            layout = scope.real.outputs[index]
            if layout.kind == "tokens":
                return mask, "real tokens"
            if layout.slots is None:
                return mask, "rows without padding (read the repadded tensor)"
            slots = ", ".join(map(str, layout.slots))
            return mask, f"rows whose slot {slots} is a real token (read there from the repadded tensor)"
    checks, notes = compare_outputs(got, want, atol, rtol, where)
    report = VerifyReport(outputs=checks, atol=atol, rtol=rtol, notes=scope_notes + notes)
    if report.passed:
        return report
    reference = getattr(optimized, "captured_graph", None)
    if reference is None:
        report.notes.append("no captured graph kept: cannot locate the first diverging node")
        return report
    full = order_kwargs({**captured.injected_kwargs, **kwargs}, captured.kwarg_order)
    if scope is not None and not bool(scope.rows.all()):
        report.notes.append("the first diverging node is looked for on rows without padding before a real token "
                            "(the captured program counts positions from each row's first slot)")
    try:
        report.divergence = find_divergence(
            optimized, reference, optimized.graph, tuple(args), full, atol=atol, rtol=rtol, seed=seed,
            real_tokens=scope,
        )
    except Exception as exc:  # localization is a diagnostic: never hide the output table behind it
        report.notes.append(f"could not run the graphs node by node: {type(exc).__name__}: {exc}")
        return report
    if report.divergence is None:
        report.notes.append("no node present in both programs differs; the difference is in nodes the passes added")
    return report
