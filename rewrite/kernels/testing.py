"""Test helpers: run a Triton launcher against its reference on the current machine.

Without CUDA the launchers run on CPU tensors in Triton's interpreter. Triton chooses the
interpreter when `@triton.jit` runs, so kernel modules must be imported through
`load_launchers`, which sets TRITON_INTERPRET=1 for the rest of the process (Triton also reads it
when a kernel first runs) and re-imports a module that was first imported without it.
"""

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

import torch

from .alloc import poisoned

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def kernel_device() -> torch.device:
    """The device the Triton launchers run on here: CUDA if present, else the CPU (interpreted)."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _is_interpreted(module: ModuleType) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return any(isinstance(obj, InterpretedFunction) for obj in vars(module).values())


def load_launchers(name: str) -> ModuleType:
    """Import the Triton kernel module `name` so that its launchers run on `kernel_device()`."""
    if torch.cuda.is_available():
        return importlib.import_module(name)
    os.environ["TRITON_INTERPRET"] = "1"
    module = sys.modules.get(name)
    if module is None:
        return importlib.import_module(name)
    return module if _is_interpreted(module) else importlib.reload(module)


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor, scale: float | None = None) -> float:
    """max |actual - expected| / scale (default max |expected|), in float64; inf if actual is not finite.

    Pass `scale` when `expected` is a sum with cancellation: its rounding error is bounded by the
    sum of the magnitudes of the terms, not by the magnitude of the result.
    """
    a, e = actual.double(), expected.double()
    if not torch.isfinite(a).all():
        return float("inf")
    if e.numel() == 0:
        return 0.0
    scale = e.abs().max().item() if scale is None else scale
    return (a - e).abs().max().item() / max(scale, 1e-30)


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str = "output", scale: float | None = None
) -> None:
    """Fail unless shapes match and max_relative_error(actual, expected, scale) <= tol."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = max_relative_error(actual, expected, scale)
    assert err <= tol, f"{name}: max relative error {err:.3g} > {tol:.3g}"


def _to_double(x: object) -> object:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().double()
    return x


def check_launcher(
    launcher: Callable[..., object],
    reference: Callable[..., object],
    make_inputs: Callable[[torch.dtype, torch.device], Sequence[object]],
    *,
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.float16),
    tolerance: dict[torch.dtype, float] | None = None,
    trials: int = 2,
) -> None:
    """Check `launcher(*inputs)` against `reference(*inputs_in_float64)` on fresh random inputs.

    For each dtype and trial, `make_inputs(dtype, device)` draws new inputs; the launcher runs
    with every buffer it allocates through `alloc.new_empty` filled with NaN; each output
    (a tensor or a tuple of tensors; None entries skipped) must match the reference within
    `tolerance[dtype]` (default `TOLERANCE`).
    """
    tol = {**TOLERANCE, **(tolerance or {})}
    device = kernel_device()
    for dtype in dtypes:
        for trial in range(trials):
            inputs = make_inputs(dtype, device)
            with poisoned():
                actual = launcher(*inputs)
            expected = reference(*[_to_double(x) for x in inputs])
            if isinstance(actual, torch.Tensor):
                actual, expected = (actual,), (expected,)
            for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
                if a is None and e is None:
                    continue
                assert_close(a, e, tol[dtype], name=f"output {i} ({dtype}, trial {trial})")


def rewrite_ops_called(fn: Callable[[], object]) -> set[str]:
    """Names of the rewrite:: ops that `fn()` dispatches (top level, seen by a dispatch mode)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    names: list[str] = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            names.append(func.name())
            return func(*args, **(kwargs or {}))

    with Log():
        fn()
    return {name for name in names if name.startswith("rewrite::")}
