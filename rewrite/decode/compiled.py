"""The one-token decode step compiled by torch.compile (Inductor), so that its elementwise ops fuse.

What is compiled is the program's FX graph module (`DecodeProgram.compile_source`: `graph_module` without the
norm and rotary fusions, which Inductor does itself), called as the program calls it, with a `DecodeState` in static mode (`state.start_static()`, as for a CUDA graph).
Dynamo traces the sites' Python, the state's methods included, into one graph whose inputs are the
parameters, the token ids and positions, and every tensor the state holds; the state's in-place
updates (KV-cache writes, recurrent states) are mutations of those inputs, which the compiled code
writes back. The project's kernels are torch.library custom ops and stay ops in the graph. In static
mode the sites read no Python value that changes from one step to the next, so one compilation
serves every step of a state, and every later state of the same batch size (and capacity, where the
program keeps a full KV cache: shapes are static). Layer-skip routed blocks read the decisions held
from the prefill (how many rows run each block is a Python int): a state with other decisions
compiles anew.

Compiled with `fullgraph=True` and `dynamic=False`: a graph break, or a recompilation between two
steps of one state, raises a `RewriteError`; nothing falls back to eager silently. On CUDA the
compiled step is captured in the CUDA graph (`GraphedStep(..., compiled=True)`); on the CPU it is
called at each step.
"""

from __future__ import annotations

import contextlib

import torch
from torch._dynamo.exc import FailOnRecompileLimitHit, TorchDynamoException

from rewrite.decode.program import DecodeProgram
from rewrite.decode.state import DecodeState
from rewrite.errors import RewriteError

RECOMPILE_MESSAGE = "Detected recompile when torch.compile stance is 'fail_on_recompile'"
"""How torch words the error of a recompilation under the `fail_on_recompile` stance."""


class CompiledStep:
    """Runs the compiled program on one new token per sequence of `state` (static mode); the first
    call compiles (or reuses an earlier compilation), later calls must reuse it. Call `state.begin(1)`
    before and `state.advance()` after each call, as for the eager program."""

    def __init__(self, program: DecodeProgram, state: DecodeState):
        self.program = program
        self.state = state
        self.calls = 0

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        state = self.state
        if not state.static:
            raise RewriteError("a compiled decode step needs the state in static mode: call state.start_static() "
                               "after the prefill")
        if tuple(ids.shape) != (state.batch, 1):
            raise RewriteError(f"a compiled decode step takes one token per sequence, [{state.batch}, 1], got "
                               f"token ids of shape {tuple(ids.shape)}")
        self.calls += 1
        first = self.calls == 1
        stance = contextlib.nullcontext() if first else torch.compiler.set_stance("fail_on_recompile")
        try:
            with stance:
                return self.program.run(self.program.compiled_module(), ids, positions, state)
        except FailOnRecompileLimitHit as exc:
            raise RewriteError(f"compile_step: the decode step of {self.program.model_name} was compiled "
                               f"{torch._dynamo.config.recompile_limit} times already (once per batch size, per capacity "
                               "with a full KV cache and per set of held layer-skip decisions), "
                               "torch._dynamo.config.recompile_limit; raise it to "
                               "compile more shapes") from exc
        except TorchDynamoException as exc:
            raise RewriteError(f"compile_step: torch.compile could not compile the decode step of "
                               f"{self.program.model_name} as one graph: {_first_lines(exc)}") from exc
        except RuntimeError as exc:
            if RECOMPILE_MESSAGE not in str(exc):
                raise
            raise RewriteError(f"compile_step: the compiled decode step of {self.program.model_name} would recompile "
                               f"between two steps of one state (a site reads a value that changes per step): "
                               f"{_first_lines(exc, 6)}") from exc


def _first_lines(exc: BaseException, count: int = 3) -> str:
    return "\n".join(str(exc).strip().splitlines()[:count])
