"""torch-rewrite: a compiler-style graph rewriter that makes PyTorch transformers cheaper at long context."""

from rewrite import ir_ops as _ir_ops  # noqa: F401  (registers the IR's abstract ops)
from rewrite.api import LazyOptimizedModule, optimize
from rewrite.capture_cache import CAPTURE_CACHE
from rewrite.errors import CaptureError, PassError, PlanError, RewriteError, VerificationError
from rewrite.optimized_module import OptimizedModule
from rewrite.plan import PassSpec, Plan

__version__ = "0.1.0"


def load(directory, model=None):
    """Load an OptimizedModule written by `OptimizedModule.save` (see rewrite.serialize.load_optimized)."""
    from rewrite.serialize import load_optimized

    return load_optimized(directory, model=model)


__all__ = [
    "CAPTURE_CACHE",
    "CaptureError",
    "LazyOptimizedModule",
    "OptimizedModule",
    "PassError",
    "PassSpec",
    "Plan",
    "PlanError",
    "RewriteError",
    "VerificationError",
    "load",
    "optimize",
]
