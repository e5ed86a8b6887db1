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


def _selects_every_layer(selector: Selector) -> bool:
    return selector is None or selector in ("all", "*")


def describe_layers(layer_paths: Sequence[str]) -> str:
    """The model's layers as an error message lists them (index: path; long lists shortened)."""
    if not layer_paths:
        return "the model has no numbered layers (the analysis finds none holding attention)"
    shown = [f"{i}: {path}" for i, path in enumerate(layer_paths)]
    if len(shown) > 8:
        shown = [*shown[:4], "...", *shown[-2:]]
    return f"the model's {len(layer_paths)} layers are {', '.join(shown)}"


def select_layers_for(selector: Selector, layer_paths: Sequence[str], field: str) -> list[int]:
    """Indices into `layer_paths` chosen by the plan field `field` (`passes[0].mixer.layers`), as `select_layers`;
    a PlanError naming the field, the model's layers and the selector forms when the selector is out of range or
    chooses no layer. `all` (the default) on a model without layers chooses none and is no error."""
    from rewrite.errors import PlanError

    try:
        chosen = select_layers(selector, layer_paths)
    except (IndexError, ValueError) as exc:
        raise PlanError(field, f"{exc}; {describe_layers(layer_paths)}; a selector is "
                        f"{describe_selector_syntax()}") from exc
    if not chosen and not _selects_every_layer(selector):
        raise PlanError(field, f"{selector!r} selects no layer: {describe_layers(layer_paths)}; a selector is "
                        f"{describe_selector_syntax()}")
    return chosen
