"""Captured graphs kept for models of the same structure, so that capturing one again costs a copy, not a trace.

torch.export's tracing is most of what `optimize` spends on a small model. A captured graph depends on the code
the model runs, on every value the code can read (module attributes, configs, flags), on the shapes, dtypes,
devices and aliasing of its state and of the example inputs, and on no tensor value of the state or inputs (export
guards none). The cache key describes all of these; a model holding something the key cannot describe (an object
of unknown layout, a bound method, a large unregistered tensor, a forward hook) is never cached. A hit is a copy
of the stored graph module in which the stored model's tensors are the new model's.

The cache cannot see module-level functions that a model's code calls: replacing one (monkeypatching) between two
captures of the same structure needs `CAPTURE_CACHE.clear()` or `CAPTURE_CACHE.enabled = False`.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import functools
import hashlib
import types
import warnings
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import torch
import torch.fx as fx

UNREGISTERED_TENSOR_ELEMENTS = 1 << 16  # unregistered tensors up to this size join the key by value
_DEPTH = 24  # deeper attribute nesting than this is not described


class _Undescribable(Exception):
    """A value the key cannot describe; the model is not cached."""


_SCALARS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.layout,
            torch.memory_format, torch.Size, range, slice, type(Ellipsis))
_ALWAYS_SAME_OBJECTS = (types.FunctionType, types.BuiltinFunctionType, types.ModuleType, type,
                        types.MethodDescriptorType, types.WrapperDescriptorType)


def _tensor_key(tensor: torch.Tensor) -> tuple:
    return (type(tensor), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype, tensor.device,
            tensor.requires_grad, tensor.layout)


class _Describer:
    """Walks a model's modules and attribute values into a hashable key, collecting the tensors it meets."""

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []  # state in walk order: what a hit rebinds
        self._tensor_index: dict[int, int] = {}
        self._active: set[int] = set()
        self._described: dict[int, Hashable] = {}  # objects met before in this walk (a config every layer holds)

    def tensor(self, tensor: torch.Tensor, by_value: bool) -> tuple:
        seen = self._tensor_index.get(id(tensor))
        if seen is not None:  # aliasing is part of the structure (tied weights)
            return ("same", seen)
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter, torch.nn.Buffer):
            raise _Undescribable(f"a tensor of type {type(tensor).__name__}")
        self._tensor_index[id(tensor)] = len(self.tensors)
        self.tensors.append(tensor)
        if not by_value:
            return _tensor_key(tensor)
        if tensor.numel() > UNREGISTERED_TENSOR_ELEMENTS:
            raise _Undescribable(f"an unregistered tensor of {tensor.numel()} elements")
        data = tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
        return (*_tensor_key(tensor), hashlib.blake2b(data, digest_size=16).digest())

    def value(self, value: Any, depth: int = 0) -> Hashable:
        if depth > _DEPTH:
            raise _Undescribable("attributes nested too deeply")
        if type(value) in _SCALARS:
            return (type(value), value)
        if isinstance(value, enum.Enum):
            return (type(value), value.name)
        if isinstance(value, _ALWAYS_SAME_OBJECTS):
            return ("object", value)  # compared by identity: the same code
        if isinstance(value, torch.Tensor):
            return ("tensor", self.tensor(value, by_value=True))
        if isinstance(value, functools.partial):
            return ("partial", self.value(value.func, depth + 1), self.value(value.args, depth + 1),
                    self.value(value.keywords, depth + 1))
        if id(value) in self._described:
            return self._described[id(value)]
        if id(value) in self._active:
            raise _Undescribable("a reference cycle among attributes")
        self._active.add(id(value))
        try:
            described = self._container(value, depth)
        finally:
            self._active.discard(id(value))
        self._described[id(value)] = described
        return described

    def _container(self, value: Any, depth: int) -> Hashable:
        kind = type(value)
        if isinstance(value, torch.nn.Module):  # held outside the module tree (a wrapped function, a shared module)
            return ("module", tuple(self.module(n, m, depth + 1)
                                    for n, m in value.named_modules(remove_duplicate=False)))
        if kind in (tuple, list) or (isinstance(value, tuple) and hasattr(value, "_fields")):
            return (kind, tuple(self.value(v, depth + 1) for v in value))
        if kind in (dict, OrderedDict):
            return (kind, tuple((self.value(k, depth + 1), self.value(v, depth + 1)) for k, v in value.items()))
        if kind in (set, frozenset):
            return (kind, frozenset(self.value(v, depth + 1) for v in value))
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return (kind, tuple((f.name, self.value(getattr(value, f.name), depth + 1))
                                for f in dataclasses.fields(value)))
        if _plain_object(value):  # configs and other objects whose state is their __dict__
            return (kind, self.value(vars(value), depth + 1))
        raise _Undescribable(f"a value of type {kind.__qualname__}")

    def module(self, name: str, module: torch.nn.Module, depth: int = 0) -> Hashable:
        hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
        if any(getattr(module, h, None) for h in hooks):
            raise _Undescribable(f"hooks on {name or 'the model'}")
        state = tuple(
            (key, self.tensor(t, by_value=False) if t is not None else None)
            for table in (module._parameters, module._buffers) for key, t in table.items()
        )
        skipped = {"_parameters", "_buffers", "_modules"}
        attributes = tuple(
            (key, self.value(v, depth + 1)) for key, v in module.__dict__.items()
            if key not in skipped and not (key.endswith("_hooks") or key.endswith("_hooks_with_kwargs"))
        )
        return (name, type(module), state, attributes)


_HEAP_TYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class made by a class statement (or an extension's type spec)


def _plain_object(value: Any) -> bool:
    """An instance of Python classes only (no C base, slots or binding metaclass): its whole state is `__dict__`."""
    if not hasattr(value, "__dict__"):
        return False
    for cls in type(value).__mro__[:-1]:
        meta = type(cls)
        if not cls.__flags__ & _HEAP_TYPE or "__slots__" in vars(cls):
            return False
        if meta is not type and (not meta.__flags__ & _HEAP_TYPE or "pybind11" in meta.__module__):
            return False
    return True


def model_key(model: torch.nn.Module, flat_inputs: list[Any], in_spec: Any) -> tuple[Hashable, list[torch.Tensor]] | None:
    """(the key of capturing `model` on these flattened example inputs, the model's tensors in key order), or None
    where something in the model or inputs cannot be described."""
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return None
    if any(type(x) is not torch.Tensor for x in flat_inputs if isinstance(x, torch.Tensor)):
        return None  # tensor subclasses as inputs
    describer = _Describer()
    try:
        modules = tuple(describer.module(name, m) for name, m in model.named_modules(remove_duplicate=False))
        model_tensors = len(describer.tensors)
        inputs = tuple(
            _tensor_key(x) if isinstance(x, torch.Tensor) else describer.value(x) for x in flat_inputs
        )
    except _Undescribable:
        return None
    globals_read = (torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled())  # (export runs no_grad)
    return (repr(in_spec), modules, inputs, globals_read), describer.tensors[:model_tensors]


def same_key(before: tuple[Hashable, list[torch.Tensor]], after: tuple[Hashable, list[torch.Tensor]] | None) -> bool:
    """Whether two `model_key` results describe the same model state: equal keys and the very same tensors (a
    tensor the trace replaced with an equal-shaped one is a change; tensors are never compared by value)."""
    return (after is not None and before[0] == after[0] and len(before[1]) == len(after[1])
            and all(a is b for a, b in zip(before[1], after[1], strict=True)))


@dataclasses.dataclass
class _Entry:
    graph_module: fx.GraphModule
    stand_ins: list[torch.Tensor]  # meta-device tensors in the stored module where the model's tensors were


def _stand_in(tensor: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="meta")
    if isinstance(tensor, torch.nn.Parameter):
        return torch.nn.Parameter(meta, requires_grad=tensor.requires_grad)
    return meta


def _copy(gm: fx.GraphModule, substitutes: dict[int, torch.Tensor]) -> fx.GraphModule:
    """A copy of `gm` holding `substitutes[id(t)]` where `gm` holds t, sharing no mutable node metadata with it
    (a graph's deep copy copies each node's meta dict but shares the lists and dicts inside)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's pytree specs warn when copied
        out = copy.deepcopy(gm, dict(substitutes))
    for node in out.graph.nodes:
        for key, value in node.meta.items():
            node.meta[key] = _fresh_containers(value)
    return out


def _fresh_containers(value: Any) -> Any:
    """`value` with every list and (ordered) dict in it copied; anything else (fake tensors, strings, types) shared."""
    if type(value) is list:
        return [_fresh_containers(v) for v in value]
    if type(value) in (dict, OrderedDict):
        return type(value)((k, _fresh_containers(v)) for k, v in value.items())
    return value


class CaptureCache:
    """The most recent captures by key (see the module docstring); `enabled` switches it off."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self.enabled = True
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()

    def lookup(self, key: Hashable, tensors: list[torch.Tensor]) -> fx.GraphModule | None:
        """A copy of the graph module stored under `key`, holding `tensors` where the stored model held its own."""
        entry = self._entries.get(key) if self.enabled else None
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return _copy(entry.graph_module, {id(s): t for s, t in zip(entry.stand_ins, tensors, strict=True)})

    def store(self, key: Hashable, tensors: list[torch.Tensor], gm: fx.GraphModule) -> None:
        """Keep a copy of `gm` (captured from the model whose tensors, in key order, are `tensors`) under `key`,
        unless it holds a tensor sharing memory with the model's but not one of them (a hit could not rebind it)."""
        if not self.enabled:
            return
        own = {id(t) for t in tensors}
        storages = {t.untyped_storage().data_ptr() for t in tensors if t.device.type != "meta" and t.numel()}
        held = [*gm.parameters(), *gm.buffers(), *(v for m in gm.modules() for v in vars(m).values()
                                                   if isinstance(v, torch.Tensor))]
        if any(id(t) not in own and t.device.type != "meta" and t.numel()
               and t.untyped_storage().data_ptr() in storages for t in held):
            return
        stand_ins = [_stand_in(t) for t in tensors]
        stored = _copy(gm, {id(t): s for t, s in zip(tensors, stand_ins, strict=True)})
        self._entries[key] = _Entry(stored, stand_ins)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every stored capture and the counts of hits and misses."""
        self._entries.clear()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)


CAPTURE_CACHE = CaptureCache()
