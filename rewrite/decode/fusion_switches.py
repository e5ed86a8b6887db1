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


def defaults_on() -> list[str]:
    """The fusions on now (a decode program built now has these)."""
    return [name for name, on in zip(SWITCHES, current(), strict=True) if on]


@contextlib.contextmanager
def fusions_on(names: Iterable[str]) -> Iterator[None]:
    """The fusions `names` switched on inside the block (the others as they are), every switch put back after it."""
    with _switched({name: True for name in check_names(names)}):
        yield


@contextlib.contextmanager
def fusions_only(names: Iterable[str]) -> Iterator[None]:
    """Exactly the fusions `names` on inside the block, every other one off (`[]`: a program with no fusion), every
    switch put back after it."""
    wanted = set(check_names(names))
    with _switched({name: name in wanted for name in SWITCHES}):
        yield


@contextlib.contextmanager
def _switched(values: dict[str, bool]) -> Iterator[None]:
    before = [(module, attribute, getattr(module, attribute)) for module, attribute in
              (SWITCHES[name] for name in values)]
    try:
        for name, on in values.items():
            module, attribute = SWITCHES[name]
            setattr(module, attribute, on)
        yield
    finally:
        for module, attribute, value in before:
            setattr(module, attribute, value)
