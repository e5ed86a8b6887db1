"""Save an OptimizedModule to a folder (plan, weights, exported program, meta) and load it back.

Layout of the folder:

- `plan.yaml`: the plan, as `Plan.dump_yaml()` writes it;
- `weights.safetensors`: the module's state dict (tied weights stored once);
- `program.pt2`: the rewritten program as a `torch.export` program, re-exported on example inputs
  rebuilt from the capture's recorded shapes and dtypes, every dim dynamic where the graph allows;
- `routed/<layer>.pt2` (programs with `layer_skip`'s routed blocks): each routed block's body, exported
  on its own; `program.pt2` then holds stand-in ops for the routers and blocks (`rewrite.routing.saving`);
- `meta.json`: format version, source class, mode, example input specs, what the capture injected, the
  routed blocks.

`load_optimized(folder, model)` optimizes `model` again by the saved plan and loads the weights into
it; `load_optimized(folder)` runs `program.pt2` without the source model (it cannot capture again).
"""

from __future__ import annotations

import importlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from rewrite.capture import (
    Captured,
    TensorSpec,
    _dynamic_shapes,
    drop_guard_calls,
    examples_from_specs,
    fixed_dims,
)
from rewrite.errors import RewriteError
from rewrite.optimized_module import OptimizedModule, ensure_module
from rewrite.pipeline import PipelineReport
from rewrite.plan import Plan
from rewrite.real_tokens import RealTokens
from rewrite.routing.saving import (
    SavedBlock,
    body_examples,
    export_body,
    has_routed_blocks,
    program_for_export,
    restore_routed_blocks,
)

FORMAT = 1
PLAN_FILE = "plan.yaml"
WEIGHTS_FILE = "weights.safetensors"
PROGRAM_FILE = "program.pt2"
META_FILE = "meta.json"
ROUTED_DIR = "routed"


def _specs_to_json(specs: Any) -> dict[str, Any]:
    leaves, spec = pytree.tree_flatten(specs, is_leaf=lambda x: isinstance(x, TensorSpec))
    out = []
    for leaf in leaves:
        if isinstance(leaf, TensorSpec):
            out.append({"shape": list(leaf.shape), "dtype": str(leaf.dtype).removeprefix("torch.")})
        elif leaf is None or isinstance(leaf, bool | int | float | str):
            out.append({"value": leaf})
        else:
            raise RewriteError(f"cannot save an example input of type {type(leaf).__name__}")
    return {"spec": pytree.treespec_dumps(spec), "leaves": out}


def _specs_from_json(data: dict[str, Any]) -> Any:
    leaves = [
        TensorSpec(tuple(x["shape"]), getattr(torch, x["dtype"])) if "shape" in x else x["value"]
        for x in data["leaves"]
    ]
    return pytree.tree_unflatten(leaves, pytree.treespec_loads(data["spec"]))


def _tied_groups(module: torch.nn.Module) -> list[list[str]]:
    """Names of state entries that share one tensor (tied weights), groups of two or more."""
    by_id: dict[int, list[str]] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        by_id.setdefault(id(tensor), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _export_program(om: OptimizedModule, captured: Captured, directory: Path) -> tuple[
        torch.export.ExportedProgram, list[SavedBlock]]:
    """The program exported on the capture's example inputs, and its routed blocks (their bodies written
    under `directory`/routed, see `rewrite.routing.saving`)."""
    device = next((p.device for p in om.parameters()), torch.device("cpu"))
    args, kwargs = examples_from_specs(captured.example_specs, device)
    program = om.program
    routed: list[SavedBlock] = []
    if has_routed_blocks(program):
        examples = body_examples(program, args, kwargs)
        program, blocks = program_for_export(program)
        (directory / ROUTED_DIR).mkdir()
        for block, saved in blocks:
            torch.export.save(export_body(om.program, block, examples[block.layer]),
                              str(directory / ROUTED_DIR / saved.file))
            routed.append(saved)
    with torch.no_grad():
        exported = torch.export.export(
            program, args, kwargs, dynamic_shapes=_dynamic_shapes(program, args, kwargs), strict=False
        )
    return exported, routed


def save_optimized(om: OptimizedModule, directory: Path) -> Path:
    """Write plan, weights, program and meta of `om` into `directory` (created if missing)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    captured: Captured = om.__dict__["_captured"]
    (directory / PLAN_FILE).write_text(om.plan.dump_yaml())
    safetensors.torch.save_model(om, str(directory / WEIGHTS_FILE))
    program_error = None
    routed: list[SavedBlock] = []
    shutil.rmtree(directory / ROUTED_DIR, ignore_errors=True)  # a previous save's blocks
    try:
        exported, routed = _export_program(om, captured, directory)
        torch.export.save(exported, str(directory / PROGRAM_FILE))
    except Exception as exc:  # the plan and weights are still useful with the source model
        program_error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        warnings.warn(f"could not export the program; saved plan and weights only ({program_error})", stacklevel=2)
        (directory / PROGRAM_FILE).unlink(missing_ok=True)
        shutil.rmtree(directory / ROUTED_DIR, ignore_errors=True)
        routed = []
    source = om.source
    from rewrite import __version__

    meta = {
        "format": FORMAT,
        "rewrite_version": __version__,
        "torch_version": torch.__version__,
        "source_class": f"{type(source).__module__}.{type(source).__qualname__}" if source is not None else None,
        "source_module": type(source).__module__ if source is not None else None,
        "training": om.training,
        "injected_kwargs": captured.injected_kwargs,
        "cache_off_in_config": captured.cache_off_in_config,
        "kwarg_order": captured.kwarg_order,
        "example_inputs": _specs_to_json(captured.example_specs),
        "state_keys": list(om.state_dict()),
        "tied": _tied_groups(om),
        "program_error": program_error,
        "routed_blocks": [block.to_json() for block in routed],
        "real_tokens": None if om.real_tokens is None else om.real_tokens.to_json(),
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def _read_meta(directory: Path) -> dict[str, Any]:
    path = directory / META_FILE
    if not directory.is_dir():
        raise RewriteError(f"{directory} is not a folder (rewrite.load takes the folder OptimizedModule.save wrote)")
    if not path.exists():
        raise RewriteError(f"{directory} holds no {META_FILE}: not a folder written by OptimizedModule.save")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise RewriteError(f"{path} is not readable JSON ({type(exc).__name__}: {exc})") from exc
    if not isinstance(meta, dict):
        raise RewriteError(f"{path} is not the meta.json OptimizedModule.save writes (not a JSON object)")
    if meta.get("format") != FORMAT:
        raise RewriteError(f"{path}: format {meta.get('format')!r}, this version reads format {FORMAT}")
    return meta


def _user_examples(meta: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Example inputs as the user passed them (without the keywords the capture injected)."""
    args, kwargs = examples_from_specs(_specs_from_json(meta["example_inputs"]))
    for name in meta["injected_kwargs"]:
        kwargs.pop(name, None)
    return args, kwargs


def _read_weights(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a saved weights file; RewriteError when it is missing or not a safetensors file."""
    if not path.is_file():
        raise RewriteError(f"{path.parent} holds no {path.name}: the saved weights are missing")
    try:
        return safetensors.torch.load_file(str(path), device=device)
    except Exception as exc:  # safetensors raises its own error type for a damaged file
        raise RewriteError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})") from exc


def _check_shapes(om: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """RewriteError naming the saved entries whose shapes differ from `om`'s (a model of another config)."""
    mine = om.state_dict()
    wrong = [f"{k}: saved {tuple(v.shape)}, model {tuple(mine[k].shape)}"
             for k, v in state.items() if k in mine and v.shape != mine[k].shape]
    if wrong:
        raise RewriteError(f"the weights in {path} do not fit this model ({len(wrong)} shapes differ): "
                           + "; ".join(wrong[:5]))


def _load_with_model(directory: Path, model: torch.nn.Module, meta: dict[str, Any]) -> OptimizedModule:
    from rewrite.api import optimize

    plan = Plan.load(directory / PLAN_FILE)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    args, kwargs = _user_examples(meta)
    args, kwargs = pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, (args, kwargs))
    saved = _read_weights(directory / WEIGHTS_FILE)
    om = optimize(model, plan, args, example_kwargs=kwargs)
    _check_shapes(om, saved, directory / WEIGHTS_FILE)
    missing, unexpected = safetensors.torch.load_model(om, str(directory / WEIGHTS_FILE), strict=False)
    if missing or unexpected:
        raise RewriteError(
            f"the weights in {directory} do not fit this model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return om


def _load_program(directory: Path, meta: dict[str, Any]) -> OptimizedModule:
    path = directory / PROGRAM_FILE
    if not path.exists():
        why = meta.get("program_error") or "the file is missing"
        raise RewriteError(f"{directory} has no program to run ({why}); load it with rewrite.load(path, model=...)")
    if meta.get("source_module"):
        try:  # output classes (Hugging Face ModelOutput) register their pytree names on import
            importlib.import_module(meta["source_module"])
        except ImportError:
            pass
    try:
        gm = torch.export.load(str(path)).module()
    except Exception as exc:  # a damaged or foreign file: zipfile / pickle / export errors
        raise RewriteError(f"{path} is not a readable exported program ({type(exc).__name__}: {exc}); "
                           "load it with rewrite.load(path, model=...) to rebuild it from the source model") from exc
    drop_guard_calls(gm)
    if meta.get("routed_blocks"):
        restore_routed_blocks(gm, _load_routed_bodies(directory, meta["routed_blocks"]))
    specs = _specs_from_json(meta["example_inputs"])
    flat_specs = pytree.tree_leaves(specs, is_leaf=lambda x: isinstance(x, TensorSpec))
    args, kwargs = examples_from_specs(specs)
    captured = Captured(
        graph_module=gm,
        injected_kwargs=dict(meta["injected_kwargs"]),
        static_dims=fixed_dims(gm, flat_specs),
        constants={i: leaf for i, leaf in enumerate(flat_specs) if not isinstance(leaf, TensorSpec)},
        in_spec=pytree.tree_flatten((args, kwargs))[1],
        kwarg_order=list(meta["kwarg_order"]),
        example_specs=specs,
        cache_off_in_config=bool(meta.get("cache_off_in_config", False)),
    )
    saved_tokens = meta.get("real_tokens")
    report = PipelineReport(saved_real_tokens=None if saved_tokens is None else RealTokens.from_json(saved_tokens))
    om = OptimizedModule(gm, captured, Plan.load(directory / PLAN_FILE), report, source=None)
    om.train(bool(meta["training"]))
    om.__dict__["_captured_training"] = om.training
    _restore_ties(om, meta["tied"])
    _restore_persistence(om, set(meta["state_keys"]))
    _load_weights(om, directory / WEIGHTS_FILE, meta["tied"])
    return om


def _load_routed_bodies(directory: Path, described: list[dict[str, Any]]) -> dict[str, tuple[SavedBlock, Any]]:
    """Per routed layer, its description in meta.json and its loaded body; RewriteError naming the layer
    whose body file is missing or unreadable."""
    out = {}
    for data in described:
        saved = SavedBlock.from_json(data)
        path = directory / ROUTED_DIR / saved.file
        if not path.is_file():
            raise RewriteError(f"{directory} lacks {ROUTED_DIR}/{saved.file}, the body of routed block {saved.layer}; "
                               "load it with rewrite.load(path, model=...)")
        try:
            body = torch.export.load(str(path)).module()
        except Exception as exc:  # a damaged or foreign file: zipfile / pickle / export errors
            raise RewriteError(f"{path} (routed block {saved.layer}) is not a readable exported program "
                               f"({type(exc).__name__}: {exc}); load it with rewrite.load(path, model=...)") from exc
        drop_guard_calls(body)
        # a plain GraphModule, without export's input-range check: the body runs on any number of running rows,
        # fewer than the smallest batch the export allows included, as the saved module's body did
        out[saved.layer] = (saved, fx.GraphModule(body, body.graph, class_name="RoutedBody"))
    return out


def _restore_ties(om: torch.nn.Module, tied: list[list[str]]) -> None:
    """Register tied names the exported program dropped (it keeps one name per shared tensor)."""
    for group in tied:
        state = dict(om.named_parameters(remove_duplicate=False)) | dict(om.named_buffers(remove_duplicate=False))
        present = [n for n in group if n in state]
        if not present:
            continue
        tensor = state[present[0]]
        for name in group:
            if name in state:
                continue
            owner, _, leaf = name.rpartition(".")
            holder = ensure_module(om, owner)
            if isinstance(tensor, torch.nn.Parameter):
                holder.register_parameter(leaf, tensor)
            else:
                holder.register_buffer(leaf, tensor)


def _restore_persistence(om: torch.nn.Module, state_keys: set[str]) -> None:
    """Buffers the saved module kept out of its state dict stay out of it (export forgets the flag)."""
    for name, _ in list(om.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        module = om.get_submodule(owner) if owner else om
        if name in state_keys:
            module._non_persistent_buffers_set.discard(leaf)
        else:
            module._non_persistent_buffers_set.add(leaf)


def _load_weights(om: torch.nn.Module, path: Path, tied: list[list[str]]) -> None:
    """Copy saved tensors into `om` by name; a tied name saved under another name of its group counts."""
    saved = _read_weights(path, device=str(next(om.parameters()).device))
    for group in tied:
        present = [n for n in group if n in saved]
        for name in group:
            if present:
                saved.setdefault(name, saved[present[0]])
    wanted = om.state_dict(keep_vars=True)
    missing = [name for name, p in om.named_parameters() if name not in saved]
    if missing:
        raise RewriteError(f"{path} lacks parameters the program reads: {missing[:5]}")
    state = {k: saved[k] for k in wanted if k in saved}
    _check_shapes(om, state, path)
    om.load_state_dict(state, strict=False)


def load_optimized(directory: str | Path, model: torch.nn.Module | None = None) -> OptimizedModule:
    """Load what `save_optimized` wrote: with `model`, optimize it again; without, run the saved program."""
    directory = Path(directory)
    if model is not None and not isinstance(model, torch.nn.Module):
        raise RewriteError(f"rewrite.load(model=...) takes the source nn.Module, got {type(model).__name__}")
    meta = _read_meta(directory)
    if model is not None:
        return _load_with_model(directory, model, meta)
    return _load_program(directory, meta)
