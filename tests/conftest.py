"""Shared test set-up: Triton's CPU interpreter, warning filters, and helpers to run built-in targets."""

from __future__ import annotations

import inspect
import os
import warnings
from typing import Any

import torch

if not torch.cuda.is_available():
    # Triton reads this when a kernel is decorated, so it must be set before any kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.utils._pytree as pytree  # noqa: E402

# torch's own pytree code deep-copies LeafSpec objects during export, which warns on every capture.
_TORCH_NOISE = r".*isinstance\(treespec, LeafSpec\).*"
warnings.filterwarnings("ignore", message=_TORCH_NOISE, category=FutureWarning)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("filterwarnings", f"ignore:{_TORCH_NOISE}:FutureWarning")


def split_example(example: Any) -> tuple[tuple, dict[str, Any]]:
    """A target's example inputs as (args, kwargs)."""
    if isinstance(example, tuple):
        return example, {}
    return (), dict(example)


def reference_kwargs(model: torch.nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Keywords to call the original model with so that it returns what the optimized one does.

    Hugging Face models return a KV cache by default; the optimized module is captured without one.
    """
    if getattr(model, "config", None) is not None and "use_cache" in inspect.signature(model.forward).parameters:
        return {"use_cache": False, **kwargs}
    return kwargs


def run_original(model: torch.nn.Module, example: Any) -> Any:
    """Call the original model on a target's example inputs."""
    args, kwargs = split_example(example)
    return model(*args, **reference_kwargs(model, kwargs))


def run(module: torch.nn.Module, example: Any) -> Any:
    """Call an (optimized) module on a target's example inputs."""
    args, kwargs = split_example(example)
    return module(*args, **kwargs)


def tensor_leaves(out: Any) -> list[torch.Tensor]:
    """Every tensor in an output tree (tuples, dicts, Hugging Face ModelOutput)."""
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


def main_output(out: Any) -> torch.Tensor:
    """The output a user looks at: logits, else last hidden state, else the first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    return tensor_leaves(out)[0]


def scalar_loss(out: Any, mask: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """A scalar depending on every floating output element (random fixed weights, so no symmetry hides a bug).

    With `mask` (a [batch, seq] attention mask), outputs at padded positions are left out, as a training
    loss leaves them out: a padded query that may attend to nothing has no meaningful gradient (Hugging
    Face's eager and SDPA attentions disagree on it by orders of magnitude).
    """
    g = torch.Generator().manual_seed(seed)
    total = torch.zeros(())
    for leaf in tensor_leaves(out):
        if leaf.is_floating_point():
            weights = torch.randn(leaf.shape, generator=g, dtype=leaf.dtype).to(leaf.device)
            if mask is not None and leaf.dim() >= 2 and tuple(leaf.shape[:2]) == tuple(mask.shape):
                keep = mask.to(leaf.dtype).reshape(*mask.shape, *([1] * (leaf.dim() - 2)))
                weights = weights * keep
            total = total + (leaf * weights).sum()
    return total


def parameter_grads(
    module: torch.nn.Module, out: Any, mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor | None]:
    """Gradients of `scalar_loss(out, mask)` with respect to each named parameter of `module`."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(scalar_loss(out, mask), [p for _, p in named], allow_unused=True)
    return {n: g for (n, _), g in zip(named, grads)}


def _real(leaf: Any, mask: torch.Tensor | None) -> Any:
    if mask is None or not isinstance(leaf, torch.Tensor) or leaf.dim() < 2:
        return leaf
    if tuple(leaf.shape[:2]) != tuple(mask.shape):
        return leaf
    return leaf[mask.bool()]


def assert_outputs_close(
    got: Any, want: Any, *, mask: torch.Tensor | None = None, atol: float = 1e-5, rtol: float = 1e-5
) -> None:
    """Same output structure and every tensor leaf within tolerance.

    With `mask` ([batch, seq]), per-token outputs are compared at real (unpadded) tokens only: what a
    padded query computes is unspecified (Hugging Face's eager and SDPA attentions differ there).
    """
    got_leaves, got_spec = pytree.tree_flatten(got)
    want_leaves, want_spec = pytree.tree_flatten(want)
    assert got_spec == want_spec, f"output structure differs:\n{got_spec}\nvs\n{want_spec}"
    for g, w in zip(got_leaves, want_leaves):
        if isinstance(w, torch.Tensor):
            torch.testing.assert_close(_real(g, mask), _real(w, mask), atol=atol, rtol=rtol)
        else:
            assert g == w


@pytest.fixture
def quiet():
    """Silence warnings a test provokes on purpose (a pass matching nothing, say)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
