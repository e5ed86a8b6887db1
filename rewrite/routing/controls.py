"""Per-call knobs of layer skipping (threshold, budget, a decision mask, training mode) and the skip report.

The routed graph reads these when it runs, so one captured program serves every setting:

    with skip_controls(threshold=0.7):
        out = om(input_ids)
    with record_skips() as report:
        out = om(input_ids)
    report.decisions          # [calls][B, n_routed] bool: True where the sequence skipped the block
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

MODES = ("hard", "soft", "straight_through")
"""hard: skipped rows are not computed (inference); soft: every row runs and the block output is
mixed as p * input + (1 - p) * block(input); straight_through: hard decisions forward, the soft
mixture's gradient backward (training)."""


@dataclass(frozen=True)
class SkipControls:
    """Knobs of one call; None leaves the value the plan chose."""

    threshold: float | None = None
    budget: float | None = None
    skip_mask: torch.Tensor | None = None
    mode: str = "hard"

    def check(self) -> None:
        """Raise ValueError naming the first bad knob."""
        if self.threshold is not None and not isinstance(self.threshold, int | float):
            raise ValueError(f"skip_controls: threshold must be a number, got {self.threshold!r}")
        if self.budget is not None and not 0.0 <= float(self.budget) <= 1.0:
            raise ValueError(f"skip_controls: budget is a fraction of the routed blocks in [0, 1], got {self.budget!r}")
        if self.mode not in MODES:
            raise ValueError(f"skip_controls: unknown mode {self.mode!r} (allowed: {', '.join(MODES)})")
        if self.skip_mask is not None:
            m = self.skip_mask
            if not isinstance(m, torch.Tensor) or m.dim() != 2 or m.dtype != torch.bool:
                got = f"{m.dtype} {tuple(m.shape)}" if isinstance(m, torch.Tensor) else type(m).__name__
                raise ValueError(f"skip_controls: skip_mask must be a bool tensor [batch, routed blocks], got {got}")


@dataclass
class SkipRecord:
    """What one call decided: per routed block, which sequences skipped it and the router's probability."""

    layers: list[str] = field(default_factory=list)
    skipped: list[torch.Tensor] = field(default_factory=list)
    probabilities: list[torch.Tensor | None] = field(default_factory=list)

    @property
    def decisions(self) -> torch.Tensor:
        """[B, n_routed] bool: True where the sequence skipped the block."""
        return torch.stack([s.detach().cpu() for s in self.skipped], dim=1)


@dataclass
class SkipReport:
    """Decisions of every call made while `record_skips()` was active."""

    calls: list[SkipRecord] = field(default_factory=list)

    @property
    def last(self) -> SkipRecord:
        if not self.calls:
            raise ValueError("no routed call was recorded (was the module called inside record_skips()?)")
        return self.calls[-1]

    @property
    def decisions(self) -> torch.Tensor:
        """The last call's [B, n_routed] bool decisions."""
        return self.last.decisions

    @property
    def layers(self) -> list[str]:
        """Module paths of the routed blocks, in column order."""
        return self.last.layers

    def skip_rate(self) -> float:
        """Fraction of (sequence, routed block) executions skipped over every recorded call."""
        total = sum(int(r.decisions.numel()) for r in self.calls)
        skipped = sum(int(r.decisions.sum()) for r in self.calls)
        return skipped / total if total else 0.0

    def table(self) -> str:
        """The last call's decisions as text: one row per sequence, one column per routed block."""
        record = self.last
        d = record.decisions
        lines = ["seq  " + " ".join(f"{i:>3}" for i in range(d.shape[1])) + "   skipped"]
        for b in range(d.shape[0]):
            marks = " ".join("  x" if v else "  ." for v in d[b].tolist())
            lines.append(f"{b:>3}  {marks}   {', '.join(p for p, v in zip(record.layers, d[b].tolist()) if v) or '-'}")
        return "\n".join(lines)


@dataclass
class CallState:
    """Running state of one forward call (budget counters, the record being written)."""

    skipped_so_far: torch.Tensor | None = None
    """[B] blocks skipped so far per sequence (made by the first block routed under a budget)."""
    record: SkipRecord | None = None
    held: Any = None
    """The held decisions of this call, prepared once (rewrite.routing.runtime.HeldDecisions)."""
    probabilities: list[torch.Tensor] = field(default_factory=list)
    """The routers' probabilities with their autograd history (training modes only)."""
    weights: list[torch.Tensor] = field(default_factory=list)
    """The skip weights the blocks used (hard decisions with a soft gradient under straight_through)."""


_DEFAULT_CONTROLS = SkipControls()
_CONTROLS: contextvars.ContextVar[SkipControls | None] = contextvars.ContextVar("layer_skip_controls", default=None)
_REPORT: contextvars.ContextVar[SkipReport | None] = contextvars.ContextVar("layer_skip_report", default=None)
_CALL: contextvars.ContextVar[CallState | None] = contextvars.ContextVar("layer_skip_call", default=None)


@contextlib.contextmanager
def skip_controls(
    *,
    threshold: float | None = None,
    budget: float | None = None,
    skip_mask: torch.Tensor | None = None,
    mode: str = "hard",
) -> Iterator[SkipControls]:
    """Set the knobs of the calls made inside the block.

    threshold: skip a block for a sequence when its router's probability exceeds it (1.0: never).
    budget: skip exactly round(budget * n_routed) blocks per sequence, those whose router fires first
    in layer order; when the remaining blocks are as many as the remaining quota, they are skipped.
    skip_mask: [B, n_routed] bool decisions to apply instead of the routers (decisions made at
    prefill, held through decode); keep it on the CPU so that no block waits for the device to
    learn how many rows run. mode: see `MODES`.
    """
    controls = SkipControls(threshold=threshold, budget=budget, skip_mask=skip_mask, mode=mode)
    controls.check()
    token = _CONTROLS.set(controls)
    try:
        yield controls
    finally:
        _CONTROLS.reset(token)


@contextlib.contextmanager
def record_skips() -> Iterator[SkipReport]:
    """Collect every routed call's decisions made inside the block into a SkipReport."""
    report = SkipReport()
    token = _REPORT.set(report)
    try:
        yield report
    finally:
        _REPORT.reset(token)


def current_controls() -> SkipControls:
    """The knobs in effect now."""
    return _CONTROLS.get() or _DEFAULT_CONTROLS


def begin_call() -> CallState:
    """Start the state of a new forward call (at its first routed block)."""
    report = _REPORT.get()
    state = CallState()
    if report is not None:
        state.record = SkipRecord()
        report.calls.append(state.record)
    _CALL.set(state)
    return state


def call_state() -> CallState:
    """The state of the forward call in progress."""
    state = _CALL.get()
    if state is None:
        raise RuntimeError("layer skip: a routed block ran before the first one of its call")
    return state


def last_call_probabilities(*, used: bool = False) -> torch.Tensor:
    """[B, n_routed] router probabilities of the last call made in a training mode, differentiable.

    With `used`, the skip weights the blocks applied instead: equal to the probabilities in soft
    mode, the hard decisions (with the probabilities' gradient) in straight_through mode.
    """
    state = _CALL.get()
    if state is None or not state.probabilities:
        raise RuntimeError("no routed call in a training mode (soft / straight_through) was made in this context")
    return torch.stack(state.weights if used else state.probabilities, dim=1)
