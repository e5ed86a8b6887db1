"""Variants for benchmark runs: module constants (kernel launches) changed for one timing or run and restored
after, and the decode fusions a --fusions value names."""

from __future__ import annotations

import importlib
from typing import Any

Change = tuple[str, str, Any]
"""(module under the package, attribute, new value); a dict value updates the module's dict."""


def apply_changes(package: str, changes: list[Change]) -> list[tuple[Any, str, Any]]:
    """Set each attribute of `package`.<module> to its new value; returns what `restore` needs."""
    undo = []
    for module, attr, value in changes:
        mod = importlib.import_module(f"{package}.{module}")
        old = getattr(mod, attr)
        setattr(mod, attr, {**old, **value} if isinstance(old, dict) and isinstance(value, dict) else value)
        undo.append((mod, attr, old))
    return undo


def restore(undo: list[tuple[Any, str, Any]]) -> None:
    """Put back the values `apply_changes` replaced."""
    for mod, attr, old in reversed(undo):
        setattr(mod, attr, old)


def fusion_names(text: str) -> list[str]:
    """The decode fusions of a comma-separated --fusions value (`rewrite.decode.fusion_switches.SWITCHES`)."""
    from rewrite.decode.fusion_switches import check_names

    try:
        return check_names(part.strip() for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise SystemExit(f"--fusions: {exc}") from None
