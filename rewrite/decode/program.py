"""The decode program of an optimized module: a second capture of the source model, run through
the same plan with `stateful` threading, called with token ids, positions and a `DecodeState`."""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree

from rewrite.capture import capture, order_kwargs
from rewrite.decode import fuse_gated_mlp, fuse_norms, fuse_projections, fuse_rotary
from rewrite.decode import state as decode_state
from rewrite.decode.fuse_projections import FusedWeights
from rewrite.decode.program_meta import DecodeSignature
from rewrite.decode.state import DecodeState
from rewrite.decode.step_check import PROMPT_TOKENS, check_step_matches_prefill
from rewrite.errors import CaptureError, RewriteError
from rewrite.routing.graph import routed_calls

EXAMPLE_BATCH = 2
EXAMPLE_LENGTH = 8
"""Shape of the token ids the decode program is captured with (both dims stay dynamic)."""


def model_window(source: torch.nn.Module) -> tuple[int | None, list[int] | str]:
    """(sliding window, layers it applies to) from a Hugging Face config (`sliding_window` with `layer_types`, or
    GPT-Neo's `window_size` with `attention_layers`); (None, "all") without one or when it windows no layer."""
    config = getattr(source, "config", None)
    kinds = getattr(config, "attention_layers", None)  # GPT-Neo: "global" / "local" per layer, window_size
    if isinstance(kinds, list | tuple) and isinstance(getattr(config, "window_size", None), int):
        local = [i for i, kind in enumerate(kinds) if kind == "local"]
        return (config.window_size, local) if local else (None, "all")
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or getattr(config, "use_sliding_window", True) is False:
        return None, "all"
    types = getattr(config, "layer_types", None)
    if isinstance(types, list | tuple):
        layers = getattr(config, "num_hidden_layers", None)
        if isinstance(layers, int):
            types = types[:layers]  # the model reads layer_types[i] for its layers only
        windowed = [i for i, kind in enumerate(types) if kind == "sliding_attention"]
        return (window, windowed) if windowed else (None, "all")  # no layer keeps the window
    return window, "all"


STEP_INDUCTOR_OPTIONS: dict[str, Any] = {"coordinate_descent_tuning": True}
"""Inductor options of the compiled decode step (`torch.compile(..., options=...)`), read when a program first
compiles its step. Default: coordinate-descent tuning of Inductor's Triton kernels (measured on an H100: the
batch-1 step of a 16-layer Llama-shaped gla model 1.300 -> 0.972 ms; BENCHMARKS.md); `{}` gives Inductor's
defaults. CUDA graphs stay the decode loop's own (`GraphedStep`): do not set `triton.cudagraphs` here."""


LAYOUT_PASSES = ("varlen",)
"""Passes about how a padded or packed batch is laid out, left out of decode programs: the decode state
already keeps each sequence's real tokens apart (slots, validity), and a padding-free graph would leave the
stateful pass no attention to thread."""


def _decode_plan(plan: Any, source: torch.nn.Module) -> Any:
    """`plan` with the `stateful` pass last and threading (its other options kept; the model's own
    sliding window filled in when the plan sets none), without the LAYOUT_PASSES."""
    from rewrite.passes import PASSES
    from rewrite.plan import PassSpec

    passes, options = [], None
    for spec in plan.enabled_passes:
        if spec.name == "stateful":
            options = spec.options
        elif spec.name not in LAYOUT_PASSES:
            passes.append(spec)
    options = PASSES["stateful"].Options() if options is None else options
    changes: dict[str, Any] = {"thread": True}
    if options.sliding_window is None:
        window, layers = model_window(source)
        if window is not None:
            changes.update(sliding_window=window, window_layers=layers)
    passes.append(PassSpec("stateful", dataclasses.replace(options, **changes)))
    return dataclasses.replace(plan, passes=passes, strict=False, debug=False, disable=[])


def _logits(out: Any, where: str) -> torch.Tensor:
    """The logits tensor [B, T, V] of a language model's output (a tensor, `.logits`, or a tuple's first)."""
    if isinstance(out, torch.Tensor):
        found = out
    elif getattr(out, "logits", None) is not None:
        found = out.logits
    elif isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        found = out[0]
    else:
        raise RewriteError(f"{where}: the model returned {type(out).__name__}; generate() needs logits [B, T, vocab] "
                           "(a tensor, an output with .logits, or a tuple whose first item is the logits)")
    if found.dim() != 3:
        raise RewriteError(f"{where}: the model's logits have shape {tuple(found.shape)}; generate() needs "
                           "[batch, tokens, vocab]")
    return found


def _vocab_size(source: torch.nn.Module) -> int:
    """How many token ids the model embeds (its config's vocab size, else its first embedding's rows; 1 if unknown)."""
    size = getattr(getattr(source, "config", None), "vocab_size", None)
    if isinstance(size, int) and size > 0:
        return size
    embedding = next((m for m in source.modules() if isinstance(m, torch.nn.Embedding)), None)
    return embedding.num_embeddings if embedding is not None else 1


def _program_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of a program's graph over the same parameters whose layer-skip routed blocks have their own bodies."""
    twin = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name="DecodeProgram")
    for call in routed_calls(twin):
        call.node.target = call.block.with_body_copy()
    twin.recompile()
    return twin


def _fuse_with_routed_bodies(gm: fx.GraphModule, fuse: Callable[[fx.GraphModule], int]) -> int:
    """`fuse` applied to the program and to the body of each layer-skip routed block; how many it fused."""
    return fuse(gm) + sum(fuse(call.block.body) for call in routed_calls(gm))


@dataclasses.dataclass(frozen=True)
class ThreadedCapture:
    """A language model captured on token ids and threaded with decode state by a plan's pipeline, before any decode
    fusion: what the programs of one (module, plan, device, dtype) start from, whichever fusions they make."""

    graph_module: fx.GraphModule
    report: Any
    signature: DecodeSignature
    injected: dict[str, Any]
    kwarg_order: list[str]


class DecodeProgram:
    """Calls the threaded program: `(token ids [B, T], positions [B, T], state) -> logits [B, T, V]`."""

    def __init__(self, source: torch.nn.Module, plan: Any, parameters: dict[str, torch.Tensor],
                 threaded: ThreadedCapture | None = None):
        """The program of `source` under `plan` over `parameters`, with the decode fusions their switches ask for;
        `threaded`: the capture to start from (`thread`; made here when None)."""
        self.model_name = type(source).__name__
        params = inspect.signature(source.forward).parameters
        self.ids_keyword = "input_ids" if "input_ids" in params else None
        self.takes_positions = "position_ids" in params
        fresh = threaded is None
        if threaded is None:
            threaded = self.thread(source, plan, parameters)
        self.threaded = threaded
        self.report = threaded.report
        signature = threaded.signature
        # a plain GraphModule over the same state (export's module checks its inputs against the capture's), with
        # its own graph and routed bodies: the fusions below rewrite them, the threaded capture stays as it was
        self.graph_module: fx.GraphModule = _program_copy(threaded.graph_module)
        self.fused: FusedWeights | None = None
        if fuse_projections.FUSE_SIBLING_PROJECTIONS:
            self.fused = fuse_projections.fuse_sibling_projections(self.graph_module)
        self.compile_source: fx.GraphModule = self.graph_module
        """What `compiled_module` compiles: the program without the norm, rotary and gated-activation fusions,
        whose chains Inductor fuses itself together with their neighbours (an opaque op call would split those
        kernels)."""
        self.fused_norms = self.fused_rotations = self.fused_gated_activations = 0
        gated = fuse_gated_mlp.FUSE_GATED_ACTIVATION
        if fuse_norms.FUSE_RMS_NORMS or fuse_rotary.FUSE_ROTARY or gated:
            self.compile_source = _program_copy(self.graph_module)
        if fuse_norms.FUSE_RMS_NORMS:
            self.fused_norms = _fuse_with_routed_bodies(self.graph_module, fuse_norms.fuse_rms_norms)
        if fuse_rotary.FUSE_ROTARY:
            self.fused_rotations = _fuse_with_routed_bodies(self.graph_module, fuse_rotary.fuse_rotary_embeddings)
        if gated:
            self.fused_gated_activations = _fuse_with_routed_bodies(self.graph_module,
                                                                    fuse_gated_mlp.fuse_gated_activations)
        self.fused_kv_write = decode_state.FUSED_KV_WRITE
        """Whether the program's KV-cache sites write keys and values by one op call (`DecodeState.fused_kv_write`)."""
        self.signature = signature
        self.injected = threaded.injected
        self.kwarg_order = threaded.kwarg_order
        self._compiled: torch.nn.Module | None = None
        if fresh and not signature.routed_layers:  # a routed prompt one token shorter may route otherwise
            self._check_step(source)

    def _check_step(self, source: torch.nn.Module) -> None:
        """Refuse a program whose one-token step computes other values than its prefill (`step_check`)."""
        vocab = _vocab_size(source)
        ids = (torch.arange(1, PROMPT_TOKENS + 1, device=self.device) * 7919 % vocab)[None, :]
        with torch.no_grad():
            check_step_matches_prefill(self.threaded.graph_module, self.run, self.new_state, ids, self.model_name)

    def thread(self, source: torch.nn.Module, plan: Any, parameters: dict[str, torch.Tensor]) -> ThreadedCapture:
        """`source` captured on token ids and threaded with decode state by `plan`'s pipeline, before any fusion."""
        from rewrite.pipeline import run_pipeline

        device = next(iter(parameters.values())).device if parameters else torch.device("cpu")
        ids = torch.zeros(EXAMPLE_BATCH, EXAMPLE_LENGTH, dtype=torch.long, device=device)
        args, kwargs = self._inputs(ids, torch.arange(EXAMPLE_LENGTH, device=device).expand(EXAMPLE_BATCH, -1))
        was_training = source.training
        source.train(False)
        try:
            captured = capture(source, args, kwargs)
        except CaptureError as exc:
            raise RewriteError(
                f"generate() could not capture {self.model_name} on token ids [batch, tokens]: {exc}. It needs a "
                "language model taking token ids (as `input_ids` or its first argument) and returning logits"
            ) from exc
        finally:
            source.train(was_training)
        fixed = [size for _, dim, size in captured.static_dims if dim == 1]
        if fixed:
            raise RewriteError(
                f"generate() needs {self.model_name} captured for any number of tokens, but the capture fixed the "
                f"token dim to {fixed[0]} (Python code sized by the tokens, such as a loop over them in a reference "
                "selective scan); its decode step could not take one token at a time")
        gm = captured.graph_module
        report = run_pipeline(gm, _decode_plan(plan, source), existing_state=parameters, source=source)
        signature = gm.meta.get("decode")
        if not isinstance(signature, DecodeSignature):
            raise RewriteError(f"{self.model_name} has no attention or mixer site to carry state; generate() has "
                               "nothing to decode incrementally")
        return ThreadedCapture(gm, report, signature, captured.injected_kwargs, captured.kwarg_order)

    @property
    def positions_in_graph(self) -> bool:
        """Whether the model computes positions itself (then all rows of a batch share them)."""
        return bool(self.signature.positions_in_graph)

    @property
    def routed_layers(self) -> list[str]:
        """The layer-skip routed blocks, whose decisions are made at prefill and held while decoding."""
        return list(self.signature.routed_layers)

    @property
    def code(self) -> str:
        """The threaded program as readable Python."""
        return self.graph_module.code

    def _inputs(self, ids: torch.Tensor, positions: torch.Tensor) -> tuple[tuple, dict[str, Any]]:
        kwargs: dict[str, Any] = {}
        if self.takes_positions:
            kwargs["position_ids"] = positions
        if self.ids_keyword is None:
            return (ids,), kwargs
        return (), {self.ids_keyword: ids, **kwargs}

    def new_state(self, batch: int, capacity: int) -> DecodeState:
        """An empty state for `batch` sequences of up to `capacity` tokens (prompt and new ones); it keeps
        a per-slot mask only when a site of the program has a full softmax KV cache."""
        return DecodeState(batch=batch, capacity=capacity, device=self.device, slot_mask=self.signature.slot_mask)

    @property
    def device(self) -> torch.device:
        """Where the program's parameters live (the CPU for a program without any)."""
        return next(iter(self.graph_module.parameters()), torch.zeros(0)).device

    def compiled_module(self) -> torch.nn.Module:
        """The graph module compiled by torch.compile (Inductor, one whole graph, static shapes), made on
        first use and shared by every state; see `rewrite.decode.compiled`."""
        if self._compiled is None:
            options = dict(STEP_INDUCTOR_OPTIONS) or None
            if options and options.get("triton.cudagraphs"):
                raise ValueError("STEP_INDUCTOR_OPTIONS: the decode loop captures the step in its own CUDA graph; "
                                 "leave triton.cudagraphs off")
            self._compiled = torch.compile(self.compile_source, backend="inductor", dynamic=False, fullgraph=True,
                                           options=options)
        return self._compiled

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, state: DecodeState) -> torch.Tensor:
        return self.run(self.graph_module, ids, positions, state)

    def sync_weights(self, everything: bool = False) -> None:
        """Bring the fused projections' concatenated weights up to date with the model's (see
        `FusedWeights.sync`); nothing to do without them."""
        if self.fused is not None:
            self.fused.sync(everything)

    def run(self, module: Any, ids: torch.Tensor, positions: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Logits of `module` (the graph module or its compiled form) called the program's way on
        token ids [B, T], positions [B, T] and `state`. With fused projections, their weights are
        copied again first where the model's changed (all of them at a state's first call)."""
        if self.fused is not None:
            self.fused.sync(everything=state.length == 0)
        args, kwargs = self._inputs(ids, positions)
        kwargs = order_kwargs({**self.injected, **kwargs}, self.kwarg_order)
        if self.signature.in_spec is not None:
            flat = fx_pytree.tree_flatten_spec((args, kwargs), self.signature.in_spec)
        else:
            flat = list(args) + list(kwargs.values())
        state.forget_call()  # what a call makes for itself (a visible mask) is made by this call
        state.fused_kv_write = self.fused_kv_write
        out = module(*flat, state)
        if self.signature.out_spec is not None:
            out = pytree.tree_unflatten(list(out) if isinstance(out, tuple | list) else [out], self.signature.out_spec)
        return _logits(out, self.model_name)
