"""Plans are data: which passes run, in order, with which options; from dicts, YAML, TOML, JSON or Python."""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rewrite.errors import PlanError

KERNEL_MODES = ["auto", "triton", "reference"]
TOP_LEVEL_KEYS = ["passes", "kernels", "strict", "debug", "disable"]
PLAN_SUFFIXES = (".yaml", ".yml", ".toml", ".json", ".py")


def _registry():
    from rewrite.passes import PASSES

    return PASSES


@dataclass
class PassSpec:
    """One pass of a plan with its validated options."""

    name: str
    options: Any

    def to_data(self) -> dict[str, Any]:
        return {self.name: dataclasses.asdict(self.options)}


@dataclass
class Plan:
    """An ordered list of passes plus plan-wide settings."""

    passes: list[PassSpec] = field(default_factory=list)
    kernels: str = "auto"
    strict: bool = False
    debug: bool = False
    disable: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kernels not in KERNEL_MODES:
            raise PlanError("kernels", f"unknown kernel mode {self.kernels!r}", KERNEL_MODES)
        names = list(_registry())
        for name in self.disable:
            if name not in names:
                raise PlanError("disable", f"unknown pass {name!r}", names)

    @property
    def enabled_passes(self) -> list[PassSpec]:
        return [p for p in self.passes if p.name not in self.disable]

    def to_data(self) -> dict[str, Any]:
        """Plain data that `Plan.from_data` turns back into an equal plan."""
        return {
            "passes": [p.to_data() for p in self.passes],
            "kernels": self.kernels,
            "strict": self.strict,
            "debug": self.debug,
            "disable": list(self.disable),
        }

    @classmethod
    def from_data(cls, data: Any) -> Plan:
        """Validate plain data (dict / list of passes / None) into a Plan."""
        if isinstance(data, Plan):
            return data
        if data is None:
            return cls()
        if isinstance(data, list):
            data = {"passes": data}
        if isinstance(data, str):
            raise PlanError("<plan>", f"a plan is a mapping or a list of passes, got the string {data!r} "
                            "(pass names go in a list)")
        if not isinstance(data, dict):
            raise PlanError("<plan>", f"a plan is a mapping or a list of passes, got {type(data).__name__}")
        for key in data:
            if key not in TOP_LEVEL_KEYS:
                raise PlanError(str(key), "unknown top-level key", TOP_LEVEL_KEYS)
        raw_passes = data.get("passes") or []
        if not isinstance(raw_passes, list):
            raise PlanError("passes", "must be a list of {pass_name: {options}} entries")
        passes = [_parse_pass(entry, i) for i, entry in enumerate(raw_passes)]
        disable = data.get("disable") or []
        if isinstance(disable, str):
            disable = [disable]
        if not isinstance(disable, list):
            raise PlanError("disable", f"must be a pass name or a list of pass names, got {disable!r}", sorted(_registry()))
        for key, typ in (("strict", bool), ("debug", bool), ("kernels", str)):
            if key in data and not isinstance(data[key], typ):
                raise PlanError(key, f"must be a {typ.__name__}, got {data[key]!r}")
        return cls(
            passes=passes,
            kernels=data.get("kernels", "auto"),
            strict=bool(data.get("strict", False)),
            debug=bool(data.get("debug", False)),
            disable=list(disable),
        )

    @classmethod
    def load(cls, source: str | Path) -> Plan:
        """Read a plan from a .yaml/.yml/.toml/.json/.py file (a .py file defines `plan`)."""
        path = Path(source)
        if not path.exists():
            raise PlanError("<plan>", f"no plan file at {str(path)!r}")
        if not path.is_file():
            raise PlanError("<plan>", f"{str(path)!r} is not a file")
        suffix = path.suffix.lower()
        if suffix not in PLAN_SUFFIXES:
            raise PlanError("<plan>", f"unknown plan file type {suffix!r}", list(PLAN_SUFFIXES))
        try:
            text = path.read_text()
            if suffix in (".yaml", ".yml"):
                data = yaml.safe_load(text)
            elif suffix == ".toml":
                data = tomllib.loads(text)
            elif suffix == ".json":
                data = json.loads(text)
            else:
                namespace: dict[str, Any] = {}
                exec(compile(text, str(path), "exec"), namespace)
                if "plan" not in namespace:
                    raise PlanError("<plan>", f"{path} defines no variable named 'plan'")
                data = namespace["plan"]
        except PlanError:
            raise
        except Exception as exc:  # a parser's or the Python file's own error: say which file and why
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise PlanError("<plan>", f"cannot read {str(path)!r} as a {suffix[1:]} plan: "
                            f"{type(exc).__name__}: {reason}") from exc
        return cls.from_data(data)

    @classmethod
    def parse(cls, text: str, *, comma_names: bool = False) -> Plan:
        """A plan from a file path, or inline YAML/JSON text (`'{passes: [attention_normalize]}'`); with
        `comma_names`, also `pass_a,pass_b` (the CLI's short form)."""
        try:
            is_file = Path(text).suffix.lower() in PLAN_SUFFIXES or bool(text.strip()) and Path(text).exists()
        except OSError:  # too long to be a path
            is_file = False
        if is_file:
            return cls.load(text)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            reason = str(exc).splitlines()[0]
            raise PlanError("<plan>", f"not a plan file and not valid inline YAML ({reason})") from exc
        if isinstance(data, str) and comma_names:
            data = [name.strip() for name in data.split(",") if name.strip()]
        elif isinstance(data, str):
            raise PlanError("<plan>", f"{text!r} is not a plan file (no such file, or not a "
                            f"{'/'.join(PLAN_SUFFIXES)} suffix) and not a plan; pass names go in a list")
        return cls.from_data(data)

    def dump_yaml(self) -> str:
        return yaml.safe_dump(self.to_data(), sort_keys=False)


def _parse_pass(entry: Any, index: int) -> PassSpec:
    passes = _registry()
    field_name = f"passes[{index}]"
    if isinstance(entry, str):
        name, raw = entry, {}
    elif isinstance(entry, PassSpec):
        name, raw = entry.name, entry.options
    elif isinstance(entry, dict) and len(entry) == 1:
        name, raw = next(iter(entry.items()))
        raw = {} if raw is None else raw  # `- mixer:` in YAML: the defaults
    elif isinstance(entry, dict) and "name" in entry:
        name = entry["name"]
        raw = {k: v for k, v in entry.items() if k != "name"}
    else:
        raise PlanError(field_name, f"expected a pass name or {{name: {{options}}}}, got {entry!r}")
    if not isinstance(name, str) or name not in passes:
        raise PlanError(field_name, f"unknown pass {name!r}", sorted(passes))
    options_cls = passes[name].Options
    if isinstance(raw, options_cls):
        return entry if isinstance(entry, PassSpec) else PassSpec(name, raw)
    if not isinstance(raw, dict):
        names = sorted(f.name for f in dataclasses.fields(options_cls))
        raise PlanError(
            f"{field_name}.{name}",
            f"options must be a mapping of option names to values ({{{name}: {{option: value}}}}), a "
            f"{options_cls.__name__}, or nothing for the defaults; got {type(raw).__name__} {raw!r}", names)
    return PassSpec(name, build_options(options_cls, raw, f"{field_name}.{name}"))


def build_options(options_cls: type, raw: dict[str, Any], where: str) -> Any:
    """Construct a pass's options dataclass from a mapping, checking names, types and choices."""
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    hints = typing.get_type_hints(options_cls)
    for key, val in raw.items():
        if key not in fields:
            raise PlanError(f"{where}.{key}", "unknown option", sorted(fields))
        f = fields[key]
        choices = f.metadata.get("choices")
        if choices is not None and val not in choices:
            raise PlanError(f"{where}.{key}", f"bad value {val!r}", [repr(c) for c in choices])
        _check_type(hints.get(key), val, f"{where}.{key}")
    try:
        options = options_cls(**raw)
    except PlanError:
        raise
    except (TypeError, ValueError) as exc:
        raise PlanError(where, str(exc)) from exc
    validate = getattr(options, "validate", None)
    if callable(validate):
        validate(where)
    return options


def _check_type(hint: Any, val: Any, where: str) -> None:
    if hint is None or hint is Any:
        return
    origin = typing.get_origin(hint)
    allowed = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    for typ in allowed:
        base = typing.get_origin(typ) or typ
        if typ is type(None) and val is None:
            return
        if base is typing.Literal:
            if val in typing.get_args(typ):
                return
            continue
        if isinstance(base, type):
            if base is float and isinstance(val, int) and not isinstance(val, bool):
                return
            if base is int and isinstance(val, bool):
                continue
            if isinstance(val, base):
                return
    names = [getattr(t, "__name__", str(t)) for t in allowed]
    raise PlanError(where, f"bad value {val!r} of type {type(val).__name__}", names)
