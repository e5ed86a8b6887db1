"""Capture a model as an ATen-level FX graph with `torch.export` (non-strict, dynamic dims)."""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from rewrite.analysis.mask_probe import annotate_mask_causality
from rewrite.capture_cache import CAPTURE_CACHE, model_key, same_key
from rewrite.empty_concats import drop_empty_concats
from rewrite.errors import CaptureError
from rewrite.score_masks import canonicalize_score_masks


@dataclass
class Captured:
    """A captured graph plus what is needed to call it and to tell when it must be captured again."""

    graph_module: fx.GraphModule
    injected_kwargs: dict[str, Any] = field(default_factory=dict)
    static_dims: list[tuple[int, int, int]] = field(default_factory=list)  # (flat input, dim, size)
    constants: dict[int, Any] = field(default_factory=dict)  # flat input -> value fixed at capture
    in_spec: Any = None
    kwarg_order: list[str] = field(default_factory=list)  # keyword names in the order the capture saw them
    example_specs: Any = None  # (args, kwargs) with each tensor replaced by a TensorSpec
    cache_off_in_config: bool = False  # the trace ran with the Hugging Face config's use_cache switched off


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one example tensor input (enough to rebuild an example input)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def example(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """An input of this spec: ones for integers and bools (valid ids and masks), randn for floats."""
        if self.dtype.is_floating_point or self.dtype.is_complex:
            return torch.randn(self.shape, dtype=self.dtype, device=device)
        return torch.ones(self.shape, dtype=self.dtype, device=device)


def example_specs(args: tuple, kwargs: dict[str, Any]) -> Any:
    """(args, kwargs) with every tensor replaced by its TensorSpec."""
    return pytree.tree_map(
        lambda x: TensorSpec(tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else x, (tuple(args), kwargs)
    )


def examples_from_specs(specs: Any, device: torch.device | str = "cpu") -> tuple[tuple, dict[str, Any]]:
    """Example (args, kwargs) rebuilt from `example_specs` output."""
    args, kwargs = pytree.tree_map(
        lambda x: x.example(device) if isinstance(x, TensorSpec) else x,
        specs,
        is_leaf=lambda x: isinstance(x, TensorSpec),
    )
    return tuple(args), dict(kwargs)


def order_kwargs(kwargs: dict[str, Any], order: list[str]) -> dict[str, Any]:
    """`kwargs` with names in `order` first, in that order (the pytree spec depends on key order)."""
    rank = {name: i for i, name in enumerate(order)}
    return dict(sorted(kwargs.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def _hf_defaults(model: torch.nn.Module, kwargs: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """(keyword arguments a Hugging Face model needs to be capturable: no cache objects as outputs, whether its
    config's `use_cache` must be switched off instead: a forward that takes no `use_cache` hands **kwargs to an
    inner model that reads the config's default, as GraniteMoE does; export cannot take the flag through
    **kwargs)."""
    injected: dict[str, Any] = {}
    config = getattr(model, "config", None)
    if config is None:
        return injected, False
    params = inspect.signature(model.forward).parameters
    if "use_cache" in params and "use_cache" not in kwargs:
        injected["use_cache"] = False
    if "return_dict" in params and "return_dict" not in kwargs:
        injected["return_dict"] = True
    return injected, "use_cache" not in params and getattr(config, "use_cache", None) is not None


def _dynamic_spec(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return {i: Dim.AUTO for i in range(x.dim())}
    if isinstance(x, list | tuple):
        return type(x)(_dynamic_spec(v) for v in x)
    if isinstance(x, dict):
        return {k: _dynamic_spec(v) for k, v in x.items()}
    return None


def _dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Every tensor dim dynamic (Dim.AUTO: export keeps it symbolic unless the model fixes it)."""
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    return {name: _dynamic_spec(value) for name, value in bound.arguments.items()}


@contextlib.contextmanager
def config_cache_off(model: torch.nn.Module, off: bool):
    """With `off`, the Hugging Face config's `use_cache` switched off while inside (see `_hf_defaults`): how a
    capture traced a model whose forward takes no `use_cache`, and so how that model is called to compare with
    what the capture computes (`rewrite.verify`). Without `off`, nothing changes."""
    cached = model.config.use_cache if off else None
    if off:
        model.config.use_cache = False
    try:
        yield
    finally:
        if off:
            model.config.use_cache = cached


@contextlib.contextmanager
def _capture_context(model: torch.nn.Module, cache_off_in_config: bool):
    """Turn off fused fast paths (nn.MultiheadAttention / TransformerEncoder) that hide attention, and, where
    asked, the Hugging Face config's `use_cache` (see `_hf_defaults`)."""
    mha = torch.backends.mha
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        with config_cache_off(model, cache_off_in_config):
            yield
    finally:
        mha.set_fastpath_enabled(was)


def _var_keyword_names(model: torch.nn.Module, kwargs: dict[str, Any]) -> list[str]:
    """Keywords of `kwargs` that the model's forward takes only through its **kwargs."""
    params = inspect.signature(model.forward).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    return [name for name in kwargs if name not in params]


def _explain(model: torch.nn.Module, exc: BaseException) -> str:
    name = type(model).__name__
    text = str(exc).strip().splitlines()
    first = next((line for line in text if line.strip()), type(exc).__name__)
    lower = str(exc).lower()
    if "data-dependent" in lower or "guardondatadependent" in type(exc).__name__.lower() or "could not guard on data-dependent" in lower:
        hint = (
            "the model branches or sizes a tensor on tensor *values* (data-dependent control flow). "
            "Make the branch depend on shapes or flags instead, mark it with torch.cond, or pass example "
            "inputs that take the branch you deploy and keep it fixed"
        )
    elif ("unsupported" in lower and ("output" in lower or "pytree" in lower or "type" in lower)) or (
        "not a known type" in lower or "register a pytree" in lower
    ):
        hint = (
            "the model returns or takes a type torch.export cannot flatten. Return tensors, tuples, "
            "lists, dicts or dataclasses registered with torch.utils._pytree; for Hugging Face models pass "
            "use_cache=False"
        )
    else:
        hint = "see the cause below; simplify the forward or pass example inputs that exercise the path you deploy"
    where = _user_line(text)
    at = f"\n  at: {where}" if where else ""
    return f"could not capture {name} as a graph: {first}{at}\n  what to do: {hint}"


def _user_line(lines: list[str]) -> str | None:
    """The model's source line torch.export blames ('File "m.py", line 7, in forward: if x.sum() > 0:')."""
    for i, line in enumerate(lines):
        if "the following call raised this error" in line.lower() and i + 2 < len(lines):
            return f"{lines[i + 1].strip()}: {lines[i + 2].strip()}"
    return None


def capture(model: torch.nn.Module, args: tuple = (), kwargs: dict[str, Any] | None = None, *,
            cache: bool = True) -> Captured:
    """Export `model` on the example inputs with every tensor dim dynamic where the model allows it; a model of a
    structure captured before (`rewrite.capture_cache`) gets a copy of that graph unless `cache` is False."""
    kwargs = dict(kwargs or {})
    injected, cache_off_in_config = _hf_defaults(model, kwargs)
    kwargs.update(injected)
    kwargs = order_kwargs(kwargs, list(inspect.signature(model.forward).parameters))
    if not any(isinstance(x, torch.Tensor) for x in pytree.tree_leaves((args, kwargs))):
        raise CaptureError(
            f"could not capture {type(model).__name__}: the example inputs hold no tensor. "
            "Pass example_inputs (a tuple of positional arguments) or example_kwargs (a dict)."
        )
    flat, in_spec = pytree.tree_flatten((tuple(args), kwargs))
    keyed = model_key(model, flat, in_spec) if cache and CAPTURE_CACHE.enabled else None
    gm = CAPTURE_CACHE.lookup(*keyed) if keyed is not None else None
    if gm is None:
        gm = _export(model, args, kwargs, cache_off_in_config)
        if keyed is not None and same_key(keyed, model_key(model, flat, in_spec)):  # the trace changed nothing
            CAPTURE_CACHE.store(*keyed, gm)
    annotate_mask_causality(gm, flat)
    static_dims = fixed_dims(gm, flat)
    constants = {i: leaf for i, leaf in enumerate(flat) if not isinstance(leaf, torch.Tensor)}
    return Captured(
        graph_module=gm,
        injected_kwargs=injected,
        static_dims=static_dims,
        constants=constants,
        in_spec=in_spec,
        kwarg_order=list(kwargs),
        example_specs=example_specs(tuple(args), kwargs),
        cache_off_in_config=cache_off_in_config,
    )


def _export(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any], cache_off_in_config: bool) -> fx.GraphModule:
    """`model` exported on the example inputs, as a graph module without export's guard call."""
    try:
        with _capture_context(model, cache_off_in_config), torch.no_grad():
            program = torch.export.export(
                model, tuple(args), kwargs, dynamic_shapes=_dynamic_shapes(model, tuple(args), kwargs), strict=False
            )
    except CaptureError:
        raise
    except Exception as exc:  # torch.export raises many types; translate them all
        through = _var_keyword_names(model, kwargs)
        if through:  # torch.export cannot match dynamic shapes to keywords that arrive through **kwargs
            config = " (on a Hugging Face model, set them on the config instead, e.g. model.config." \
                f"{through[0]} = ...)" if getattr(model, "config", None) is not None else ""
            raise CaptureError(
                f"could not capture {type(model).__name__} as a graph: the keyword argument(s) {', '.join(through)} "
                f"reach its forward only through **kwargs, which torch.export cannot give dynamic shapes "
                f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})\n"
                f"  what to do: leave them out of the example inputs{config}, or wrap the model in a module "
                "whose forward names them") from exc
        raise CaptureError(_explain(model, exc)) from exc
    gm = program.module()
    drop_guard_calls(gm)
    canonicalize_score_masks(gm)  # in-place / chained -inf fills of scores as the one fill the analysis reads
    drop_empty_concats(gm)  # a cache made inside the forward joins empty tensors to the keys
    return gm


def fixed_dims(gm: fx.GraphModule, flat: list[Any]) -> list[tuple[int, int, int]]:
    """(flat input, dim, size) for every tensor input dim the captured graph specialized."""
    out = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, (leaf, node) in enumerate(zip(flat, placeholders)):
        val = node.meta.get("val")
        if isinstance(leaf, torch.Tensor | TensorSpec) and isinstance(val, torch.Tensor):
            for d, size in enumerate(val.shape):
                if is_concrete_int(size):  # a plain int, or a SymInt export specialized to a constant
                    out.append((i, d, int(size)))
    return out


def drop_guard_calls(gm: fx.GraphModule) -> None:
    """Remove export's `_guards_fn` call: the optimized module checks its inputs itself."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards_fn") and not node.users:
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm.recompile()


def check_inputs(captured: Captured, args: tuple, kwargs: dict[str, Any]) -> str | None:
    """Why these inputs do not fit the captured graph (so it must be captured again), or None."""
    kwargs = order_kwargs({**captured.injected_kwargs, **kwargs}, captured.kwarg_order)
    flat, spec = pytree.tree_flatten((tuple(args), kwargs))
    if captured.in_spec is not None and spec != captured.in_spec:
        return "the call passes different arguments than the capture did"
    for i, fixed in captured.constants.items():
        if flat[i] != fixed:
            return f"input {i} is {flat[i]!r} but the capture fixed it to {fixed!r}"
    for i, d, size in captured.static_dims:
        leaf = flat[i]
        if not isinstance(leaf, torch.Tensor) or leaf.dim() <= d or leaf.shape[d] != size:
            got = tuple(leaf.shape) if isinstance(leaf, torch.Tensor) else type(leaf).__name__
            return f"input {i} has shape {got} but the capture fixed dim {d} to {size}"
    return None
