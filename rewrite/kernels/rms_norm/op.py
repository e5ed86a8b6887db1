"""The `rewrite::rms_norm` op: schema, fake, autograd, CPU reference and CUDA Triton implementations."""

import torch

from .._triton import load_triton_module
from .reference import rms_norm_backward_reference, rms_norm_reference

_TRITON = "rewrite.kernels.rms_norm.triton_kernels"


@torch.library.custom_op("rewrite::rms_norm", mutates_args=())
def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of x, scaled by weight."""
    return rms_norm_reference(x, weight, eps)


@rms_norm_op.register_kernel("cuda")
def _rms_norm_cuda(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return load_triton_module(_TRITON).rms_norm_forward(x, weight, eps)


@rms_norm_op.register_fake
def _rms_norm_fake(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("rewrite::rms_norm_backward", mutates_args=())
def rms_norm_backward_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (dx, dweight) of `rewrite::rms_norm`."""
    return rms_norm_backward_reference(dy, x, weight, eps)


@rms_norm_backward_op.register_kernel("cuda")
def _rms_norm_backward_cuda(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return load_triton_module(_TRITON).rms_norm_backward(dy, x, weight, eps)


@rms_norm_backward_op.register_fake
def _rms_norm_backward_fake(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(weight)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _backward(ctx, dy: torch.Tensor):
    x, weight = ctx.saved_tensors
    dx, dweight = rms_norm_backward_op(dy, x, weight, ctx.eps)
    return dx, dweight, None


rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension: x / sqrt(mean(x**2) + eps) * weight, in x's dtype."""
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"rms_norm: weight must have shape [{x.shape[-1]}] (the last dimension of x), "
            f"got {tuple(weight.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"rms_norm: x must be a floating-point tensor, got {x.dtype}")
    return rms_norm_op(x, weight, float(eps))
