"""The decode-program fusions by name: their module-level switches, read when a decode program is built."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from types import ModuleType

from rewrite.decode import fuse_gated_mlp, fuse_norms, fuse_projections, fuse_rotary, state

SWITCHES: dict[str, tuple[ModuleType, str]] = {
    "projections": (fuse_projections, "FUSE_SIBLING_PROJECTIONS"),
    "norms": (fuse_norms, "FUSE_RMS_NORMS"),
    "rotary": (fuse_rotary, "FUSE_ROTARY"),
    "gated_activation": (fuse_gated_mlp, "FUSE_GATED_ACTIVATION"),
    "kv_write": (state, "FUSED_KV_WRITE"),
}
"""Each fusion's name and the (module, attribute) of its switch."""


def current() -> tuple[bool, ...]:
    """Every switch's value, in SWITCHES order (a decode program built now is built with these)."""
    return tuple(bool(getattr(module, name)) for module, name in SWITCHES.values())


def check_names(names: Iterable[str]) -> list[str]:
    """`names` as a list, each one of SWITCHES (ValueError naming the unknown ones and the choices otherwise)."""
    names = list(names)
    unknown = [name for name in names if name not in SWITCHES]
    if unknown:
        raise ValueError(f"unknown decode fusions {', '.join(unknown)}; choose from {', '.join(SWITCHES)}")
    return names


@contextlib.contextmanager
def fusions_on(names: Iterable[str]) -> Iterator[None]:
    """The fusions `names` switched on inside the block, every switch put back after it."""
    switches = [SWITCHES[name] for name in check_names(names)]
    before = [(module, name, getattr(module, name)) for module, name in switches]
    try:
        for module, name in switches:
            setattr(module, name, True)
        yield
    finally:
        for module, name, value in before:
            setattr(module, name, value)
