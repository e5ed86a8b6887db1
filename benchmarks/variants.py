"""Variants for benchmark runs: module constants (kernel launches, decode fusions) changed for one timing or run and restored after."""

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


FUSIONS = {
    "projections": ("fuse_projections", "FUSE_SIBLING_PROJECTIONS"),
    "norms": ("fuse_norms", "FUSE_RMS_NORMS"),
    "rotary": ("fuse_rotary", "FUSE_ROTARY"),
}
"""Decode fusions --fusions may name: (module of rewrite.decode, its switch)."""


def fusion_names(text: str) -> list[str]:
    """The decode fusions of a comma-separated list, checked against FUSIONS."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in FUSIONS]
    if unknown:
        raise SystemExit(f"--fusions: unknown {', '.join(unknown)}; choose from {', '.join(FUSIONS)}")
    return names
