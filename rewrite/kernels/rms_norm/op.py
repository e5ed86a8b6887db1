"""The `rewrite::rms_norm` op (schema, fake, autograd, CPU reference and CUDA Triton implementations), the
forward-only `rewrite::rms_norm_cast`, which keeps a Hugging Face model's cast order, and the forward-only
`rewrite::add_rms_norm_cast`, the residual add before such a norm and the norm in one call."""

import torch

from .._triton import load_triton_module
from .reference import (
    add_rms_norm_cast_reference,
    rms_norm_backward_reference,
    rms_norm_cast_reference,
    rms_norm_reference,
)

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


def _check_cast_arguments(op: str, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> None:
    """Raise a ValueError naming `op` when weight is not a [width] vector or a dtype is not one of CAST_DTYPES."""
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"{op}: weight must have shape [{x.shape[-1]}] (the last dimension of x), got {tuple(weight.shape)}"
        )
    for name, dtype in (("x", x.dtype), ("weight", weight.dtype), ("out_dtype", out_dtype)):
        if dtype not in CAST_DTYPES:
            raise ValueError(f"{op}: {name} must be float32, float16 or bfloat16, got {dtype}")


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


def _no_backward(ctx, *grads: torch.Tensor):
    raise RuntimeError("rewrite::rms_norm_cast and rewrite::add_rms_norm_cast are forward only (they serve decode "
                       "programs); use rewrite::rms_norm (`rewrite.kernels.rms_norm`) where a gradient is needed")


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
    _check_cast_arguments("rms_norm_cast", x, weight, out_dtype)
    return rms_norm_cast_op(x, weight, float(eps), float(weight_offset), bool(round_normed), out_dtype)


@torch.library.custom_op("rewrite::add_rms_norm_cast", mutates_args=())
def add_rms_norm_cast_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float,
    round_normed: bool, out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual in x's dtype, `rms_norm_cast` of that sum) (forward only)."""
    return add_rms_norm_cast_reference(x, residual, weight, eps, weight_offset, round_normed, out_dtype)


@add_rms_norm_cast_op.register_kernel("cuda")
def _add_rms_norm_cast_cuda(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float,
    round_normed: bool, out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    return load_triton_module(_TRITON).add_rms_norm_cast_forward(x, residual, weight, eps, weight_offset,
                                                                 round_normed, out_dtype)


@add_rms_norm_cast_op.register_fake
def _add_rms_norm_cast_fake(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float,
    round_normed: bool, out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=out_dtype)


add_rms_norm_cast_op.register_autograd(_no_backward)


def add_rms_norm_cast(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
    weight_offset: float = 0.0, round_normed: bool = False, out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(total, rms_norm_cast(total, weight, eps, ...))` with `total = x + residual` rounded to x's dtype as
    `aten.add` rounds it (forward only): a decoder layer's residual add and the norm that reads it, in one call.
    x and residual must have the same dtype and shape; the other arguments are `rms_norm_cast`'s."""
    if residual.dtype != x.dtype or residual.shape != x.shape:
        raise ValueError(
            f"add_rms_norm_cast: residual must have x's dtype and shape {x.dtype} {tuple(x.shape)}, got "
            f"{residual.dtype} {tuple(residual.shape)}"
        )
    out_dtype = x.dtype if out_dtype is None else out_dtype
    _check_cast_arguments("add_rms_norm_cast", x, weight, out_dtype)
    return add_rms_norm_cast_op(x, residual, weight, float(eps), float(weight_offset), bool(round_normed), out_dtype)
