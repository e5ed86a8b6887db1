"""The `rewrite::linear_attention*` ops: schemas, fakes, autograd, CPU references, CUDA Triton kernels.

Low-level: arguments are assumed valid (the public functions in `api.py` check them).
"""

import torch

from .._triton import load_triton_module
from .chunked_reference import chunked_backward, chunked_forward
from .naive import naive_step

_FORWARD = "rewrite.kernels.linear_attention.triton_forward"
_BACKWARD = "rewrite.kernels.linear_attention.triton_backward"
_STEP = "rewrite.kernels.linear_attention.triton_step"


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the recurrent state for inputs of `dtype`: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _empty_if_none(x: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0) if x is None else x


@torch.library.custom_op("rewrite::linear_attention", mutates_args=())
def linear_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    decay: str,
    scale: float,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, T, H, V], final state [N, Hkv, K, V]); see `naive.py` for the definition."""
    return chunked_forward(q, k, v, g, decay, scale, initial_state, cu_seqlens, causal)


@linear_attention_op.register_kernel("cuda")
def _forward_cuda(q, k, v, g, decay, scale, initial_state, cu_seqlens, causal):
    if not causal:  # two matmuls: PyTorch is already as fast as a custom kernel
        return chunked_forward(q, k, v, g, decay, scale, initial_state, cu_seqlens, causal)
    return load_triton_module(_FORWARD).chunk_forward(q, k, v, g, decay, scale, initial_state, cu_seqlens)


@linear_attention_op.register_fake
def _forward_fake(q, k, v, g, decay, scale, initial_state, cu_seqlens, causal):
    batch, length, heads, _ = q.shape
    n = batch if cu_seqlens is None else cu_seqlens.shape[0] - 1
    o = q.new_empty(batch, length, heads, v.shape[-1])
    final = q.new_empty(n, k.shape[2], k.shape[-1], v.shape[-1], dtype=state_dtype(q.dtype))
    return o, final


@torch.library.custom_op("rewrite::linear_attention_backward", mutates_args=())
def linear_attention_backward_op(
    do: torch.Tensor,
    d_final_state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    decay: str,
    scale: float,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dg, d_initial_state); dg / d_initial_state are empty [0] when g / initial_state are None."""
    grads = chunked_backward(do, d_final_state, q, k, v, g, decay, scale, initial_state, cu_seqlens, causal)
    dq, dk, dv, dg, dh0 = grads
    return dq, dk, dv, _empty_if_none(dg, q), _empty_if_none(dh0, q)


@linear_attention_backward_op.register_kernel("cuda")
def _backward_cuda(do, d_final_state, q, k, v, g, decay, scale, initial_state, cu_seqlens, causal):
    if not causal:
        grads = chunked_backward(
            do, d_final_state, q, k, v, g, decay, scale, initial_state, cu_seqlens, causal
        )
    else:
        grads = load_triton_module(_BACKWARD).chunk_backward(
            do, d_final_state, q, k, v, g, decay, scale, initial_state, cu_seqlens
        )
    dq, dk, dv, dg, dh0 = grads
    return dq, dk, dv, _empty_if_none(dg, q), _empty_if_none(dh0, q)


@linear_attention_backward_op.register_fake
def _backward_fake(do, d_final_state, q, k, v, g, decay, scale, initial_state, cu_seqlens, causal):
    dg = q.new_empty(0) if g is None else torch.empty_like(g)
    dh0 = q.new_empty(0) if initial_state is None else torch.empty_like(initial_state)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dg, dh0


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, g, decay, scale, initial_state, cu_seqlens, causal = inputs
    ctx.save_for_backward(q, k, v, g, initial_state, cu_seqlens)
    ctx.decay, ctx.scale, ctx.causal = decay, scale, causal
    ctx.final_shape = output[1].shape


def _backward(ctx, do, d_final_state):
    q, k, v, g, initial_state, cu_seqlens = ctx.saved_tensors
    if d_final_state is None:
        d_final_state = q.new_zeros(ctx.final_shape, dtype=state_dtype(q.dtype))
    if do is None:
        do = torch.zeros_like(q[..., :1].expand(*q.shape[:-1], v.shape[-1]))
    dq, dk, dv, dg, dh0 = linear_attention_backward_op(
        do.contiguous(),
        d_final_state.contiguous(),
        q,
        k,
        v,
        g,
        ctx.decay,
        ctx.scale,
        initial_state,
        cu_seqlens,
        ctx.causal,
    )
    dg = None if g is None else dg
    dh0 = None if initial_state is None else dh0
    return dq, dk, dv, dg, None, None, dh0, None, None


linear_attention_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("rewrite::linear_attention_step", mutates_args=())
def linear_attention_step_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    decay: str,
    scale: float,
    state: torch.Tensor,
    normalize: bool = False,
    eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recurrent decode over a few tokens: (o [B, t, H, V], new state [B, Hkv, K, V (+ 1)]). Inference only.

    With `normalize` the state has one more column, the running sum z of k, and
    o = scale * q S / (scale * q z + eps) (see `naive_step`).
    """
    return naive_step(q, k, v, g, decay, scale, state, normalize, eps)


@linear_attention_step_op.register_kernel("cuda")
def _step_cuda(q, k, v, g, decay, scale, state, normalize=False, eps=0.0):
    return load_triton_module(_STEP).recurrent_step(q, k, v, g, decay, scale, state, normalize, eps)


@linear_attention_step_op.register_fake
def _step_fake(q, k, v, g, decay, scale, state, normalize=False, eps=0.0):
    return q.new_empty(*q.shape[:-1], v.shape[-1]), torch.empty_like(state)


@torch.library.custom_op("rewrite::linear_attention_step_", mutates_args=("state",))
def linear_attention_step_inplace_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    decay: str,
    scale: float,
    state: torch.Tensor,
    normalizer: torch.Tensor | None = None,
    eps: float = 0.0,
) -> torch.Tensor:
    """`linear_attention_step` writing the new state into `state` (contiguous, float32 / float64); returns o.

    Normalising: `normalizer` [B, t, Hkv, K] holds z (the running sum of k, the state's last column)
    after each of the t tokens, as the caller computed it; o = scale * q S / (scale * q z + eps) and the
    state's last column becomes the last z. None: no normalisation (the state has V columns). Used by
    the decode path, where torch.compile then writes the held state in place (no copy, no clone).
    """
    o, new_state = naive_step(q, k, v, g, decay, scale, state, normalizer is not None, eps, normalizer)
    state.copy_(new_state)
    return o


@linear_attention_step_inplace_op.register_kernel("cuda")
def _step_inplace_cuda(q, k, v, g, decay, scale, state, normalizer=None, eps=0.0):
    return load_triton_module(_STEP).recurrent_step_(q, k, v, g, decay, scale, state, normalizer, eps)


@linear_attention_step_inplace_op.register_fake
def _step_inplace_fake(q, k, v, g, decay, scale, state, normalizer=None, eps=0.0):
    return q.new_empty(*q.shape[:-1], v.shape[-1])
