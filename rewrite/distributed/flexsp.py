"""FlexSP-style assignment: split a variable-length batch's sequences over SP groups of different sizes.

Per step, the GPUs are partitioned into sequence-parallel groups (sizes from `sizes`, e.g. 1, 2, 4, 8)
and each sequence goes to one group; a group processes its sequences one after another. A small
mixed-integer program (scipy's HiGHS) minimises the step time, the slowest group's total, subject to
every GPU being used at most once and each group holding at most `max_tokens_per_gpu` tokens of a
sequence per GPU. Time of a sequence of L tokens on a group of P GPUs (seconds):

    t(L, P) = (quadratic * L^2 + linear * L) / P + comm_per_token * L * (P - 1) / P

(`quadratic`: softmax attention per token pair; `linear`: everything else per token; the last term
the all-to-all / state traffic). Needs scipy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SequenceCost:
    """Coefficients of t(L, P) (see the module doc)."""

    quadratic: float = 1e-12
    linear: float = 1e-7
    comm_per_token: float = 2e-8

    def seconds(self, length: int, size: int) -> float:
        return (self.quadratic * length**2 + self.linear * length) / size + self.comm_per_token * length * (
            size - 1) / size


@dataclass
class Assignment:
    """Groups (size and the sequences each runs) and the predicted step time."""

    groups: list[tuple[int, list[int]]] = field(default_factory=list)
    step_seconds: float = 0.0

    def describe(self, lengths: list[int]) -> str:
        lines = [f"predicted step {self.step_seconds * 1e3:.3g} ms"]
        for i, (size, members) in enumerate(self.groups):
            lines.append(f"  group {i}: {size} GPU(s), sequences {members} "
                         f"(lengths {[lengths[m] for m in members]})")
        return "\n".join(lines)


def assign(
    lengths: list[int],
    gpus: int,
    *,
    sizes: tuple[int, ...] = (1, 2, 4, 8),
    max_tokens_per_gpu: int,
    cost: SequenceCost | None = None,
) -> Assignment:
    """The assignment of `lengths` to SP groups over `gpus` GPUs that minimises the step time."""
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp
    except ImportError as error:  # pragma: no cover - scipy is a dev dependency
        raise ImportError("FlexSP assignment needs scipy (pip install scipy)") from error
    cost = cost or SequenceCost()
    sizes = tuple(s for s in sizes if s <= gpus)
    slots = [(s, j) for s in sizes for j in range(gpus // s)]  # candidate groups
    n, m = len(lengths), len(slots)
    for i, length in enumerate(lengths):
        if length > max(sizes) * max_tokens_per_gpu:
            raise ValueError(f"sequence {i} of {length} tokens does not fit the largest group "
                             f"({max(sizes)} GPUs x {max_tokens_per_gpu} tokens)")
    # variables: x[i, g] (n*m), y[g] (m), T (1)
    nx, ny = n * m, m
    total = nx + ny + 1
    c = np.zeros(total)
    c[-1] = 1.0
    rows, lo, hi = [], [], []

    def row() -> np.ndarray:
        return np.zeros(total)

    for i in range(n):  # each sequence in exactly one group
        r = row()
        r[i * m:(i + 1) * m] = 1
        rows.append(r), lo.append(1), hi.append(1)
    for i in range(n):  # only in a used group that can hold it
        for g, (s, _) in enumerate(slots):
            r = row()
            r[i * m + g] = 1
            r[nx + g] = -1
            rows.append(r), lo.append(-np.inf), hi.append(0)
            if lengths[i] > s * max_tokens_per_gpu:
                r = row()
                r[i * m + g] = 1
                rows.append(r), lo.append(0), hi.append(0)
    r = row()  # GPUs used at most once
    for g, (s, _) in enumerate(slots):
        r[nx + g] = s
    rows.append(r), lo.append(0), hi.append(gpus)
    for g, (s, _) in enumerate(slots):  # each group's load within the step time
        r = row()
        for i in range(n):
            r[i * m + g] = cost.seconds(lengths[i], s)
        r[-1] = -1
        rows.append(r), lo.append(-np.inf), hi.append(0)
    integrality = np.concatenate([np.ones(nx + ny), [0]])
    bounds = Bounds(np.zeros(total), np.concatenate([np.ones(nx + ny), [np.inf]]))
    result = milp(c, constraints=LinearConstraint(np.array(rows), lo, hi), integrality=integrality, bounds=bounds)
    if not result.success:
        raise ValueError(f"no assignment of {n} sequences to {gpus} GPUs: {result.message}")
    x = np.round(result.x[:nx]).reshape(n, m)
    groups = []
    for g, (s, _) in enumerate(slots):
        members = [i for i in range(n) if x[i, g] > 0.5]
        if members:
            groups.append((s, members))
    return Assignment(groups, float(result.x[-1]))
