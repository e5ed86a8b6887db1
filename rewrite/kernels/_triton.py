"""Whether Triton can be used, and a clear error when it cannot."""

import importlib
import importlib.util
from types import ModuleType

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def load_triton_module(name: str) -> ModuleType:
    """Import a module that defines Triton kernels, or raise a RuntimeError naming the missing package."""
    if not TRITON_AVAILABLE:
        raise RuntimeError(
            f"{name} needs the 'triton' package to run on a CUDA tensor; install triton>=3.6 "
            "or move the tensors to the CPU, where the PyTorch reference runs"
        )
    return importlib.import_module(name)
