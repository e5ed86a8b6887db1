"""Replay a padding-free module from CUDA graphs, one graph per input shape and bucket of real tokens.

Eagerly, a padding-free module sizes every packed tensor by the number of real tokens T, so its
shapes change with each batch and each op pays its launch and Python cost: at a few thousand
tokens an encoder spends more time launching than computing. Under `token_capacity(C)` the module
packs exactly C tokens instead (the real ones, then filler no sequence holds), so a batch of the
same padded shape and any T <= C runs the same kernels on the same shapes: one CUDA graph serves a
whole bucket of token counts. A call reads T (one small device-to-host copy, as eager unpadding
does), rounds it up to a multiple of the bucket, copies the inputs into the graph's input buffers,
replays, and returns copies of the outputs. Already-packed input (a [1, T] row with cu_seqlens or
restarting position_ids) has no padding: its shapes are fixed by T (and, for position_ids, by the
sequence count, read back per call), and one graph serves each.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

from rewrite.errors import RewriteError
from rewrite.varlen.runtime import token_capacity

MODES = ("auto", "always", "never")


@dataclass(frozen=True)
class TokenBuckets:
    """How the `varlen` module may be replayed from CUDA graphs (the pass's `cuda_graphs` options).

    mode "auto" captures a shape the second time it is called (a shape seen once runs eagerly) and runs
    eagerly, with one warning, where capture fails; "always" captures on the first call and raises where
    capture fails; "never" always runs eagerly. Graphs are used only for calls without autograd, with every
    tensor input on a CUDA device. `bucket` rounds the real-token count up; at most `max_graphs` graphs are
    kept (least recently used dropped first).
    """

    mode: str = "auto"
    bucket: int = 256
    max_graphs: int = 8
    packed: str | None = None
    """Already-packed input: "cu_seqlens" or "position_ids" (None: a padded batch with a padding mask)."""
    packed_source: int | None = None
    """Flat input index of the packed input's cu_seqlens or position_ids."""
    token_input: int | None = None
    """Flat input index of a packed [1, T, ...] token input."""

    def sizes(self, flat_inputs: list[Any], real_tokens: Any) -> tuple[int, int, int | None]:
        """(real tokens, most tokens, sequences) of a call with these flat inputs (the sequence count only
        for restarting position_ids, where it fixes the layout's shape)."""
        if self.packed is None:
            keep = real_tokens.keep(flat_inputs)
            return int(keep.sum()), keep.numel(), None  # the one read back per call (as eager unpadding)
        assert self.token_input is not None and self.packed_source is not None
        total = int(flat_inputs[self.token_input].shape[1])
        if self.packed == "position_ids":
            return total, total, int((flat_inputs[self.packed_source] == 0).sum())
        return total, total, None


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    outputs: Any


class BucketedGraphs:
    """Calls `program(*args, **kwargs)`, from a CUDA graph where `policy` allows (see the module docstring).

    flat_inputs(args, kwargs) gives a call's inputs in the program's placeholder order; `real_tokens`
    (a `RealTokens`) tells a padded batch's real tokens.
    """

    def __init__(self, program: Callable[..., Any], policy: TokenBuckets,
                 flat_inputs: Callable[[tuple, dict[str, Any]], list[Any]], real_tokens: Any = None):
        if policy.packed is None and real_tokens is None:
            raise RewriteError("varlen graph replay of a padded batch needs the module's real-token description")
        self.program = program
        self.policy = policy
        self.flat_inputs = flat_inputs
        self.real_tokens = real_tokens
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.seen: set[tuple] = set()
        self.pool: Any = None
        self.failed: str | None = None
        self.replays = 0

    def __call__(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        flat, spec = pytree.tree_flatten((args, kwargs))
        tensors = [x for x in flat if isinstance(x, torch.Tensor)]
        if not self._eligible(tensors):
            return self.program(*args, **kwargs)
        real, most, sequences = self.policy.sizes(self.flat_inputs(args, kwargs), self.real_tokens)
        capacity = min(-(-max(real, 1) // self.policy.bucket) * self.policy.bucket, most)
        key = (spec, tuple(_describe(x) for x in flat), capacity, sequences)
        entry = self.graphs.get(key)
        if entry is None:
            if self.policy.mode == "auto" and key not in self.seen:
                if len(self.seen) > 4096:  # many one-off shapes: forget them rather than grow
                    self.seen.clear()
                self.seen.add(key)
                return self.program(*args, **kwargs)
            entry = self._capture(key, flat, spec, capacity, sequences)
            if entry is None:
                return self.program(*args, **kwargs)
        self.graphs.move_to_end(key)
        for static, given in zip(entry.inputs, tensors, strict=True):
            static.copy_(given)
        entry.graph.replay()
        self.replays += 1
        return pytree.tree_map_only(torch.Tensor, torch.clone, entry.outputs)

    def _eligible(self, tensors: list[torch.Tensor]) -> bool:
        if self.policy.mode == "never" or self.failed is not None or torch.is_grad_enabled():
            return False
        if torch.compiler.is_compiling() or not torch.cuda.is_available() or torch.cuda.is_current_stream_capturing():
            return False
        return bool(tensors) and all(t.is_cuda for t in tensors)

    def _capture(self, key: tuple, flat: list[Any], spec: pytree.TreeSpec, capacity: int,
                 sequences: int | None) -> _Graph | None:
        with torch.inference_mode(False):  # plain tensors: later calls may copy into them outside inference mode
            inputs = [x.clone() if isinstance(x, torch.Tensor) else x for x in flat]
        args, kwargs = pytree.tree_unflatten(inputs, spec)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), token_capacity(capacity, sequences):  # warm-up: kernels built
                self.program(*args, **kwargs)
            torch.cuda.current_stream().wait_stream(stream)
            with token_capacity(capacity, sequences), torch.cuda.graph(graph, pool=self.pool):
                outputs = self.program(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a program that cannot be captured runs eagerly, or says why
            torch.cuda.synchronize()
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if self.policy.mode == "always":
                raise RewriteError(
                    f"varlen.cuda_graphs: the padding-free module could not be captured in a CUDA graph ({reason}); "
                    "set the plan field 'varlen.cuda_graphs' to 'auto' (run eagerly where capture fails) or "
                    "'never'") from exc
            self.failed = reason
            warnings.warn(f"varlen: CUDA-graph capture failed ({reason}); this module now runs eagerly",
                          stacklevel=3)
            return None
        entry = _Graph(graph, [x for x in inputs if isinstance(x, torch.Tensor)], outputs)
        self.graphs[key] = entry
        while len(self.graphs) > self.policy.max_graphs:
            self.graphs.popitem(last=False)
        return entry


def _describe(x: Any) -> Any:
    """What of a flat input a graph is specialised on: a tensor's shape, strides, dtype and device; any
    other value itself."""
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.stride(), x.dtype, x.device)
    return ("value", type(x).__name__, repr(x))


__all__ = ["MODES", "BucketedGraphs", "TokenBuckets"]
