"""The one-token decode step replayed from a CUDA graph (one graph per decode state).

Capturing records the step's kernels once; each replay reruns them on the same memory, which
removes the per-op launch and Python cost that dominates a small batch's decode step. The state
switches to `static` mode first: sites with a full KV cache attend over every slot (unfilled slots
are masked), and the slot of the new token lives in a device tensor the loop updates before each
replay. A program without a full KV cache reads nothing sized by the context, so its step is the
same work at every context length.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rewrite.decode.program import DecodeProgram
from rewrite.decode.state import DecodeState
from rewrite.errors import RewriteError


class GraphedStep:
    """Runs `program` on one new token per sequence; the first call warms up eagerly, the second
    captures the graph, later calls replay it. Call `state.begin(1)` before and `state.advance()`
    after each call, as for the eager program. With `compiled`, the step captured is the program
    compiled by torch.compile (`rewrite.decode.compiled.CompiledStep`; it compiles at the warm-up)."""

    def __init__(self, program: DecodeProgram, state: DecodeState, *, compiled: bool = False):
        if state.device.type != "cuda":
            raise RewriteError(f"CUDA graphs need the model on a CUDA device, not {state.device}")
        self.program = program
        self.state = state
        self.run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
        if compiled:
            from rewrite.decode.compiled import CompiledStep

            self.run = CompiledStep(program, state)
        else:
            self.run = lambda ids, positions: program(ids, positions, state)
        self.ids = torch.zeros(state.batch, 1, dtype=torch.long, device=state.device)
        self.positions = torch.zeros_like(self.ids)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.calls = 0

    def start(self) -> None:
        """Switch the state to static mode (after the prefill, before the first `begin(1)`)."""
        self.state.start_static()

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.program.sync_weights()  # a replay runs no Python of the program: fused weights follow the model here
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        self.calls += 1
        if self.calls == 1:  # warm-up: real work, on a side stream as capture requires
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                out = self.run(self.ids, self.positions)
            torch.cuda.current_stream().wait_stream(stream)
            return out
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self.run(self.ids, self.positions)
        self.graph.replay()
        assert self.logits is not None
        return self.logits
