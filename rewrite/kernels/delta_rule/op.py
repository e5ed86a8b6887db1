"""The `rewrite::delta_rule*` ops: schemas, fakes, autograd, CPU references, CUDA kernels.

Low-level: arguments are assumed valid (the public functions in `api.py` check them).
"""

import torch

from .._triton import load_triton_module
from .chunked_reference import chunked_backward, chunked_forward
from .naive import naive_delta_rule

_FORWARD = "rewrite.kernels.delta_rule.triton_forward"
_BACKWARD = "rewrite.kernels.delta_rule.triton_backward"
_STEP = "rewrite.kernels.delta_rule.triton_step"


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the recurrent state for inputs of `dtype`: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _empty_if_none(x: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0) if x is None else x


@torch.library.custom_op("rewrite::delta_rule", mutates_args=())
def delta_rule_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, T, H, V], final state [N, Hkv, K, V]); see `naive.py` for the definition."""
    return chunked_forward(q, k, v, beta, g, scale, initial_state, cu_seqlens)


@delta_rule_op.register_kernel("cuda")
def _forward_cuda(q, k, v, beta, g, scale, initial_state, cu_seqlens):
    return load_triton_module(_FORWARD).chunk_forward(q, k, v, beta, g, scale, initial_state, cu_seqlens)


@delta_rule_op.register_fake
def _forward_fake(q, k, v, beta, g, scale, initial_state, cu_seqlens):
    batch, length, heads, _ = q.shape
    n = batch if cu_seqlens is None else cu_seqlens.shape[0] - 1
    o = q.new_empty(batch, length, heads, v.shape[-1])
    return o, q.new_empty(n, k.shape[2], k.shape[-1], v.shape[-1], dtype=state_dtype(q.dtype))


@torch.library.custom_op("rewrite::delta_rule_backward", mutates_args=())
def delta_rule_backward_op(
    do: torch.Tensor,
    d_final_state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dbeta, dg, d_initial_state); dg / d_initial_state are empty [0] when g / initial_state are None."""
    dq, dk, dv, dbeta, dg, dh0 = chunked_backward(do, d_final_state, q, k, v, beta, g, scale, initial_state, cu_seqlens)
    return dq, dk, dv, dbeta, _empty_if_none(dg, q), _empty_if_none(dh0, q)


@delta_rule_backward_op.register_kernel("cuda")
def _backward_cuda(do, d_final_state, q, k, v, beta, g, scale, initial_state, cu_seqlens):
    grads = load_triton_module(_BACKWARD).chunk_backward(
        do, d_final_state, q, k, v, beta, g, scale, initial_state, cu_seqlens
    )
    dq, dk, dv, dbeta, dg, dh0 = grads
    return dq, dk, dv, dbeta, _empty_if_none(dg, q), _empty_if_none(dh0, q)


@delta_rule_backward_op.register_fake
def _backward_fake(do, d_final_state, q, k, v, beta, g, scale, initial_state, cu_seqlens):
    dg = q.new_empty(0) if g is None else torch.empty_like(g)
    dh0 = q.new_empty(0) if initial_state is None else torch.empty_like(initial_state)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(beta), dg, dh0


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, beta, g, scale, initial_state, cu_seqlens = inputs
    ctx.save_for_backward(q, k, v, beta, g, initial_state, cu_seqlens)
    ctx.scale = scale
    ctx.final_shape = output[1].shape


def _backward(ctx, do, d_final_state):
    q, k, v, beta, g, initial_state, cu_seqlens = ctx.saved_tensors
    if d_final_state is None:
        d_final_state = q.new_zeros(ctx.final_shape, dtype=state_dtype(q.dtype))
    if do is None:
        do = q.new_zeros(*q.shape[:-1], v.shape[-1])
    dq, dk, dv, dbeta, dg, dh0 = delta_rule_backward_op(
        do.contiguous(), d_final_state.contiguous(), q, k, v, beta, g, ctx.scale, initial_state, cu_seqlens
    )
    dg = None if g is None else dg
    dh0 = None if initial_state is None else dh0
    return dq, dk, dv, dbeta, dg, None, dh0, None


delta_rule_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("rewrite::delta_rule_step", mutates_args=())
def delta_rule_step_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recurrent decode over a few tokens: (o [B, t, H, V], new state [B, Hkv, K, V]). Inference only."""
    return naive_delta_rule(q, k, v, beta, g, scale=scale, initial_state=state)


@delta_rule_step_op.register_kernel("cuda")
def _step_cuda(q, k, v, beta, g, scale, state):
    return load_triton_module(_STEP).recurrent_step(q, k, v, beta, g, scale, state)


@delta_rule_step_op.register_fake
def _step_fake(q, k, v, beta, g, scale, state):
    return q.new_empty(*q.shape[:-1], v.shape[-1]), torch.empty_like(state)
