"""Resolve a target spec (what the CLI rewrites) into a model and its example inputs.

A spec is one of:

- a built-in name from `examples.models.TARGETS`: `llama`, `bert`, `gpt2`, ...
- `path/to/file.py:factory`: a function in a Python file;
- `package.module:factory`: a function in an importable module;
- a folder holding a Hugging Face `config.json` (and weights, as `save_pretrained` writes them), or
  the path of such a config file: see `rewrite.hf_targets`. A folder named like a built-in is
  written as a path (`./llama`).

Each may end with `?key=value,key=value` (`&` also separates) to pass keyword arguments to the
factory: `llama?batch=4,length=128`. Values are read as YAML scalars (`4` is an int, `true` a
bool, `sdpa` a string). Quote the spec in a shell: `?` is a glob character.

Hugging Face targets take `?batch=,length=,padding=,seed=,attn=,dtype=` (rewrite.hf_targets).
A factory returns `(model, example_inputs)`, where example_inputs is a dict of keyword arguments,
a tuple/list of positional arguments or a single tensor; or `(model, args, kwargs)`.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from rewrite.errors import RewriteError

REPO_ROOT = Path(__file__).resolve().parent.parent


class TargetError(RewriteError):
    """A target spec names nothing loadable, or its factory failed or returned the wrong thing."""


@dataclass
class LoadedTarget:
    """A target's model, example inputs, and notes on how the model and the inputs were made (Hugging Face folders)."""

    model: torch.nn.Module
    args: tuple
    kwargs: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    inputs_note: str = ""


def builtin_targets() -> dict[str, Callable[..., Any]]:
    """`examples.models.TARGETS`, importing it from the repository checkout when not on sys.path."""
    try:
        module = importlib.import_module("examples.models")
        if hasattr(module, "TARGETS"):
            return dict(module.TARGETS)
    except ImportError:
        pass
    path = REPO_ROOT / "examples" / "models.py"
    if not path.exists():
        return {}
    return dict(getattr(_load_file(path, "rewrite_builtin_targets"), "TARGETS", {}))


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split `ref?key=value,...` into the reference and the factory's keyword arguments."""
    ref, _, query = spec.partition("?")
    params: dict[str, Any] = {}
    for item in query.replace("&", ",").split(","):
        if not item.strip():
            continue
        key, eq, raw = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise TargetError(f"target {spec!r}: expected key=value after '?', got {item!r}")
        params[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return ref.strip(), params


def _load_file(path: Path, name: str) -> Any:
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise TargetError(f"cannot import {str(path)!r} as Python")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # the file's own error: say which file, in one line
        sys.modules.pop(name, None)
        raise TargetError(f"importing {str(path)!r} raised {_one_line(exc)}") from exc
    return module


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _resolve(ref: str, spec: str) -> Callable[..., Any]:
    builtins = builtin_targets()
    if ":" not in ref:
        if ref in builtins:
            return builtins[ref]
        names = ", ".join(sorted(builtins)) or "(none: examples/models.py not found)"
        if "/" in ref or "\\" in ref or ref.lower().endswith(".json"):
            raise TargetError(
                f"target {spec!r}: no folder or file {ref!r}; a path target is a local folder holding a Hugging "
                f"Face config.json (and weights) or such a config file; nothing is downloaded: fetch a hub model "
                f"first (e.g. `hf download ORG/NAME --local-dir DIR`) or save it with save_pretrained"
            )
        raise TargetError(
            f"unknown target {spec!r}: not a built-in name or a folder; use a folder holding a Hugging Face "
            f"config.json, path/to/file.py:factory or package.module:factory, or one of: {names}"
        )
    where, _, attr = ref.rpartition(":")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where)
        if not path.exists():
            raise TargetError(f"target {spec!r}: no file {where!r}")
        module = _load_file(path.resolve(), f"rewrite_target_{path.stem}")
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise TargetError(f"target {spec!r}: cannot import module {where!r} ({exc})") from exc
    if not hasattr(module, attr):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise TargetError(f"target {spec!r}: {where!r} has no {attr!r}; callables there: {', '.join(found)}")
    factory = getattr(module, attr)
    if not callable(factory):
        raise TargetError(f"target {spec!r}: {attr!r} is not callable")
    return factory


def _split_inputs(result: Any, spec: str) -> tuple[torch.nn.Module, tuple, dict[str, Any]]:
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        raise TargetError(
            f"target {spec!r}: the factory must return (model, example_inputs) or (model, args, kwargs), "
            f"got {type(result).__name__}"
        )
    model = result[0]
    if not isinstance(model, torch.nn.Module):
        raise TargetError(f"target {spec!r}: the factory's model is a {type(model).__name__}, not an nn.Module")
    if len(result) == 3:
        return model, tuple(result[1] or ()), dict(result[2] or {})
    inputs = result[1]
    if isinstance(inputs, dict):
        return model, (), dict(inputs)
    if isinstance(inputs, list | tuple):
        return model, tuple(inputs), {}
    return model, (inputs,), {}


def resolve_target(spec: str) -> LoadedTarget:
    """The model and example inputs named by `spec` (see the module docstring), with notes on how they were made."""
    ref, params = parse_spec(spec)
    from rewrite.hf_targets import is_hf_reference, load_hf_target

    written_as_builtin = ref in builtin_targets() and not any(sep in ref for sep in "/\\")
    if not written_as_builtin and is_hf_reference(ref):
        hf = load_hf_target(ref, params)
        return LoadedTarget(hf.model, (), hf.kwargs, hf.notes, hf.inputs_note)
    factory = _resolve(ref, spec)
    try:
        inspect.signature(factory).bind(**params)
    except TypeError as exc:
        accepted = ", ".join(inspect.signature(factory).parameters) or "none"
        shadowed = f"; a folder {ref!r} exists too: write ./{ref} to load it" if written_as_builtin and is_hf_reference(
            ref) else ""
        raise TargetError(f"target {spec!r}: {exc} (the factory takes: {accepted}){shadowed}") from exc
    except ValueError:  # no signature (a builtin): let the call decide
        pass
    try:
        result = factory(**params)
    except RewriteError:
        raise
    except Exception as exc:  # e.g. a ?key=value of the wrong type: one line naming the factory and its arguments
        raise TargetError(f"target {spec!r}: the factory {ref!r} called with {params} raised {_one_line(exc)}") from exc
    return LoadedTarget(*_split_inputs(result, spec))


def load_target(spec: str) -> tuple[torch.nn.Module, tuple, dict[str, Any]]:
    """The model, positional and keyword example inputs named by `spec` (see the module docstring)."""
    loaded = resolve_target(spec)
    return loaded.model, loaded.args, loaded.kwargs


__all__ = ["LoadedTarget", "TargetError", "builtin_targets", "load_target", "parse_spec", "resolve_target"]
