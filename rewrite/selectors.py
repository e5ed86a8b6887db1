"""Layer selectors: indices, Python slices ("1:-1") and module-path globs ("model.layers.*")."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

Selector = int | str | Sequence[int | str] | None

_SLICE = re.compile(r"^\s*(-?\d*)\s*:\s*(-?\d*)\s*(?::\s*(-?\d*)\s*)?$")


def _as_int(text: str) -> int | None:
    return int(text) if text.strip() else None


def describe_selector_syntax() -> str:
    """One line telling what a layer selector may be."""
    return "an index (3, -1), a slice string ('1:-1', '::2'), a module-path glob ('model.layers.*'), 'all', or a list of these"


def validate_selector(selector: Selector, field: str) -> None:
    """Raise PlanError if `selector` is not of a supported form."""
    from rewrite.errors import PlanError

    items = selector if isinstance(selector, list | tuple) else [selector]
    for item in items:
        if item is None or isinstance(item, int) and not isinstance(item, bool):
            continue
        if isinstance(item, str):
            continue
        raise PlanError(field, f"bad layer selector {item!r}; expected {describe_selector_syntax()}")


def select_layers(selector: Selector, layer_paths: Sequence[str]) -> list[int]:
    """Indices into `layer_paths` chosen by `selector`, in order, without repeats."""
    n = len(layer_paths)
    if selector is None or selector == "all" or selector == "*":
        return list(range(n))
    items = selector if isinstance(selector, list | tuple) else [selector]
    chosen: list[int] = []
    for item in items:
        if isinstance(item, bool):
            raise ValueError(f"bad layer selector {item!r}")
        if isinstance(item, int):
            if not -n <= item < n:
                raise IndexError(f"layer index {item} out of range for {n} layers")
            chosen.append(item % n)
            continue
        text = str(item).strip()
        if text in ("all", "*"):
            chosen.extend(range(n))
            continue
        if re.fullmatch(r"-?\d+", text):
            chosen.extend(select_layers(int(text), layer_paths))
            continue
        m = _SLICE.match(text)
        if m:
            step = _as_int(m.group(3) or "")
            chosen.extend(range(n)[slice(_as_int(m.group(1)), _as_int(m.group(2)), step)])
            continue
        chosen.extend(i for i, path in enumerate(layer_paths) if fnmatch.fnmatchcase(path, text))
    seen: set[int] = set()
    return [i for i in chosen if not (i in seen or seen.add(i))]
