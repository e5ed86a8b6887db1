"""The `rewrite::short_conv*` ops: schemas, fakes, autograd, CPU references, CUDA Triton kernels.

Low-level: arguments are assumed valid (`api.short_conv` checks them).
"""

import torch

from .._triton import load_triton_module
from .reference import short_conv_backward_reference, short_conv_reference

_TRITON = "rewrite.kernels.short_conv.triton_kernels"


def _empty_if_none(x: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0) if x is None else x


@torch.library.custom_op("rewrite::short_conv", mutates_args=())
def short_conv_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    silu: bool,
    cache: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [B, T, D], final cache [N, W-1, D]); see `reference.py` for the definition."""
    return short_conv_reference(x, weight, bias, silu, cache, cu_seqlens)


@short_conv_op.register_kernel("cuda")
def _forward_cuda(x, weight, bias, silu, cache, cu_seqlens):
    return load_triton_module(_TRITON).short_conv_forward(x, weight, bias, silu, cache, cu_seqlens)


@short_conv_op.register_fake
def _forward_fake(x, weight, bias, silu, cache, cu_seqlens):
    n = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return torch.empty_like(x), x.new_empty(n, weight.shape[1] - 1, x.shape[2])


@torch.library.custom_op("rewrite::short_conv_backward", mutates_args=())
def short_conv_backward_op(
    dy: torch.Tensor,
    d_final_cache: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    silu: bool,
    cache: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias, dcache); dbias / dcache are empty [0] when bias / cache are None."""
    dx, dw, db, dc = short_conv_backward_reference(dy, d_final_cache, x, weight, bias, silu, cache, cu_seqlens)
    return dx, dw, _empty_if_none(db, x), _empty_if_none(dc, x)


@short_conv_backward_op.register_kernel("cuda")
def _backward_cuda(dy, d_final_cache, x, weight, bias, silu, cache, cu_seqlens):
    grads = load_triton_module(_TRITON).short_conv_backward(dy, d_final_cache, x, weight, bias, silu, cache, cu_seqlens)
    dx, dw, db, dc = grads
    return dx, dw, _empty_if_none(db, x), _empty_if_none(dc, x)


@short_conv_backward_op.register_fake
def _backward_fake(dy, d_final_cache, x, weight, bias, silu, cache, cu_seqlens):
    db = x.new_empty(0) if bias is None else torch.empty_like(bias)
    dc = x.new_empty(0) if cache is None else torch.empty_like(cache)
    return torch.empty_like(x), torch.empty_like(weight), db, dc


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, silu, cache, cu_seqlens = inputs
    ctx.save_for_backward(x, weight, bias, cache, cu_seqlens)
    ctx.silu = silu
    ctx.final_shape = output[1].shape


def _backward(ctx, dy, d_final_cache):
    x, weight, bias, cache, cu_seqlens = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    if d_final_cache is None:
        d_final_cache = x.new_zeros(ctx.final_shape)
    dx, dw, db, dc = short_conv_backward_op(
        dy.contiguous(), d_final_cache.contiguous(), x, weight, bias, ctx.silu, cache, cu_seqlens
    )
    return dx, dw, (None if bias is None else db), None, (None if cache is None else dc), None


short_conv_op.register_autograd(_backward, setup_context=_setup_context)
