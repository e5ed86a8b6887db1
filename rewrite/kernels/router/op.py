"""The `rewrite::route` op: schema, fake, autograd, CPU reference and CUDA Triton implementation."""

import torch

from .._triton import load_triton_module
from .reference import route_backward_reference, route_reference

_TRITON = "rewrite.kernels.router.triton_kernels"


@torch.library.custom_op("rewrite::route", mutates_args=())
def route_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Skip probability per row of x [B, L, D], active-first row order and active count."""
    return route_reference(x, weight, bias, threshold)


@route_op.register_kernel("cuda")
def _route_cuda(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return load_triton_module(_TRITON).route_forward(x, weight, bias, threshold)


@route_op.register_fake
def _route_fake(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch = x.shape[0]
    return (
        x.new_empty((batch,), dtype=torch.promote_types(x.dtype, torch.float32)),
        x.new_empty((batch,), dtype=torch.int64),
        x.new_empty((), dtype=torch.int64),
    )


@torch.library.custom_op("rewrite::route_backward", mutates_args=())
def route_backward_op(
    dprob: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, prob: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dx, dweight, dbias) of `rewrite::route`'s probability."""
    return route_backward_reference(dprob, x, weight, prob)


@route_backward_op.register_fake
def _route_backward_fake(
    dprob: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, prob: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(weight), prob.new_empty((1,))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, _threshold = inputs
    ctx.save_for_backward(x, weight, output[0])
    ctx.bias_dtype = bias.dtype


def _backward(ctx, dprob: torch.Tensor, _dorder, _dcount):
    x, weight, prob = ctx.saved_tensors
    if dprob is None:
        return None, None, None, None
    dx, dweight, dbias = route_backward_op(dprob, x, weight, prob)
    return dx, dweight, dbias.to(ctx.bias_dtype), None


route_op.register_autograd(_backward, setup_context=_setup_context)
