"""The `rewrite::rms_norm` op (schema, fake, autograd, CPU reference and CUDA Triton implementations) and the
forward-only `rewrite::rms_norm_cast`, which keeps a Hugging Face model's cast order."""

import torch

from .._triton import load_triton_module
from .reference import rms_norm_backward_reference, rms_norm_cast_reference, rms_norm_reference

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


CAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""The dtypes `rms_norm_cast` takes for x, weight and its output."""


@torch.library.custom_op("rewrite::rms_norm_cast", mutates_args=())
def rms_norm_cast_op(
    x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float, round_normed: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """RMSNorm over the last dimension of x with a Hugging Face model's cast order (forward only)."""
    return rms_norm_cast_reference(x, weight, eps, weight_offset, round_normed, out_dtype)


@rms_norm_cast_op.register_kernel("cuda")
def _rms_norm_cast_cuda(
    x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float, round_normed: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return load_triton_module(_TRITON).rms_norm_cast_forward(x, weight, eps, weight_offset, round_normed, out_dtype)


@rms_norm_cast_op.register_fake
def _rms_norm_cast_fake(
    x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float, round_normed: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=out_dtype)


def _no_backward(ctx, grad: torch.Tensor):
    raise RuntimeError("rewrite::rms_norm_cast is forward only (it serves decode programs); use rewrite::rms_norm "
                       "(`rewrite.kernels.rms_norm`) where a gradient is needed")


rms_norm_cast_op.register_autograd(_no_backward)


def rms_norm_cast(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, weight_offset: float = 0.0,
    round_normed: bool = False, out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """RMSNorm over the last dimension with the cast order of a Hugging Face model (forward only).

    `normed = xf * rsqrt(mean(xf**2) + eps)` with `xf = x.float()`; rounded to x's dtype first when
    `round_normed`; then `normed * (weight.float() + weight_offset)` in float32, rounded to `out_dtype`
    (default x's dtype). Llama-style norms (`weight * normed.to(x.dtype)`) are `round_normed=True` with
    `out_dtype` the promoted dtype of weight and x; Gemma's (`normed * (1 + weight.float())`, cast back)
    are `weight_offset=1.0`; OLMo2's (`(weight * normed).to(x.dtype)`) are the defaults.
    """
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"rms_norm_cast: weight must have shape [{x.shape[-1]}] (the last dimension of x), "
            f"got {tuple(weight.shape)}"
        )
    for name, dtype in (("x", x.dtype), ("weight", weight.dtype), ("out_dtype", out_dtype)):
        if dtype not in CAST_DTYPES:
            raise ValueError(f"rms_norm_cast: {name} must be float32, float16 or bfloat16, got {dtype}")
    return rms_norm_cast_op(x, weight, float(eps), float(weight_offset), bool(round_normed), out_dtype)
