"""The `rewrite::delta_rule*` ops: schemas, fakes, autograd, CPU references, CUDA kernels.

Low-level: arguments are assumed valid (the public functions in `api.py` check them).
"""

import torch

from .._triton import load_triton_module
from ..launch_math import chunk_count
from ..saving import backward_will_run
from .chunked_reference import chunked_backward, chunked_forward
from .naive import naive_delta_rule

_FORWARD = "rewrite.kernels.delta_rule.triton_forward"
_BACKWARD = "rewrite.kernels.delta_rule.triton_backward"
_STEP = "rewrite.kernels.delta_rule.triton_step"
_CHUNK = 64  # triton_forward.CHUNK (the fake of `rewrite::delta_rule_saving` shapes the kept buffers with it)

# Keep the forward's W, U, b, h and T (float32, CUDA) for the backward instead of recomputing them there (read at every
# call of `delta_rule`; off by default until timed on a GPU). Used only when autograd will need them (grad mode on and
# an input requiring grad): inference runs `rewrite::delta_rule` and keeps nothing. Extra memory per layer, held from
# the forward to the backward, for L tokens (B * T, or the packed length), Hkv kv heads, head dims K, V, chunk C = 64
# and n_c = ceil(L / C) chunks (+ N sequences when packed):
#     4 * Hkv * (L * (K + V + [1 if gated]) + n_c * (K * V + C * C)) bytes
# (W, U, b; h per chunk, T per chunk): 302 MB at L = 8K and 4.84 GB at 128K for Hkv = 16, K = V = 128.
SAVE_FOR_BACKWARD = False
"""Whether the autograd forward keeps W, U, b, h and T for the backward instead of the backward recomputing them:
H100, B=1, H=16, D=128: fwd+bwd 3.04 vs 3.59 ms at 8K and 43.2 vs 51.3 at 128K, for 288 MB / 4.6 GB held per
layer between forward and backward (NOTES_delta_swa_conv.md). Read at every call."""


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
    """(dq, dk, dv, dbeta, dg, d_initial_state); dg / d_initial_state are empty [0] when g / initial_state are None.

    d_final_state empty [0] stands for zeros (the final state was not used)."""
    return _backward_reference(do, d_final_state, q, k, v, beta, g, scale, initial_state, cu_seqlens)


def _backward_reference(do, d_final_state, q, k, v, beta, g, scale, initial_state, cu_seqlens):
    if d_final_state.numel() == 0:
        n = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
        d_final_state = q.new_zeros(n, k.shape[2], k.shape[-1], v.shape[-1], dtype=state_dtype(q.dtype))
    dq, dk, dv, dbeta, dg, dh0 = chunked_backward(do, d_final_state, q, k, v, beta, g, scale, initial_state, cu_seqlens)
    return dq, dk, dv, dbeta, _empty_if_none(dg, q), _empty_if_none(dh0, q)


def _backward_triton(do, d_final_state, q, k, v, beta, g, scale, initial_state, cu_seqlens, saved=None):
    grads = load_triton_module(_BACKWARD).chunk_backward(
        do, d_final_state, q, k, v, beta, g, scale, initial_state, cu_seqlens, saved=saved
    )
    dq, dk, dv, dbeta, dg, dh0 = grads
    return dq, dk, dv, dbeta, _empty_if_none(dg, q), _empty_if_none(dh0, q)


@delta_rule_backward_op.register_kernel("cuda")
def _backward_cuda(do, d_final_state, q, k, v, beta, g, scale, initial_state, cu_seqlens):
    return _backward_triton(do, d_final_state, q, k, v, beta, g, scale, initial_state, cu_seqlens)


@delta_rule_backward_op.register_fake
def _backward_fake(do, d_final_state, q, k, v, beta, g, scale, initial_state, cu_seqlens):
    dg = q.new_empty(0) if g is None else torch.empty_like(g)
    dh0 = q.new_empty(0) if initial_state is None else torch.empty_like(initial_state)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(beta), dg, dh0


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, beta, g, scale, initial_state, cu_seqlens = inputs
    ctx.save_for_backward(q, k, v, beta, g, initial_state, cu_seqlens, *output[2:])
    ctx.mark_non_differentiable(*output[2:])  # the kept buffers of `rewrite::delta_rule_saving`
    ctx.set_materialize_grads(False)  # an unused final state: no zeros allocated and read
    ctx.scale = scale


def _backward(ctx, do, d_final_state, *_):
    q, k, v, beta, g, initial_state, cu_seqlens, *kept = ctx.saved_tensors
    if do is None and d_final_state is None:
        return None, None, None, None, None, None, None, None
    d_final_state = q.new_empty(0) if d_final_state is None else d_final_state.contiguous()
    if do is None:
        do = q.new_zeros(*q.shape[:-1], v.shape[-1])
    args = (do.contiguous(), d_final_state, q, k, v, beta, g, ctx.scale, initial_state, cu_seqlens)
    if kept:
        dq, dk, dv, dbeta, dg, dh0 = delta_rule_backward_saved_op(*args, *kept)
    else:
        dq, dk, dv, dbeta, dg, dh0 = delta_rule_backward_op(*args)
    dg = None if g is None else dg
    dh0 = None if initial_state is None else dh0
    return dq, dk, dv, dbeta, dg, None, dh0, None


delta_rule_op.register_autograd(_backward, setup_context=_setup_context)


def _unkept(q: torch.Tensor) -> torch.Tensor:
    """An empty float32 buffer: one `rewrite::delta_rule_saving` did not keep."""
    return q.new_empty(0, dtype=torch.float32)


@torch.library.custom_op("rewrite::delta_rule_saving", mutates_args=())
def delta_rule_saving_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`rewrite::delta_rule` (o, final state) plus what its backward would recompute: (w, u, b, h, t), float32.

    On CUDA they are the Triton forward's buffers (`triton_forward.chunk_forward(..., save=True)`; b is empty [0]
    without g); elsewhere all five are empty [0] (the reference backward recomputes). Training only
    (`SAVE_FOR_BACKWARD`); the autograd backward passes them to `rewrite::delta_rule_backward_saved`."""
    o, final = chunked_forward(q, k, v, beta, g, scale, initial_state, cu_seqlens)
    return o, final, *(_unkept(q) for _ in range(5))


@delta_rule_saving_op.register_kernel("cuda")
def _saving_cuda(q, k, v, beta, g, scale, initial_state, cu_seqlens):
    o, final, (w, u, b, h, t) = load_triton_module(_FORWARD).chunk_forward(
        q, k, v, beta, g, scale, initial_state, cu_seqlens, save=True
    )
    return o, final, w, u, _unkept(q) if b is None else b, h, t


def kept_shapes(q, k, v, g, cu_seqlens) -> list[tuple]:
    """Shapes of the five float32 buffers (w, u, b, h, t) that `rewrite::delta_rule_saving` returns on CUDA
    (`triton_forward.chunk_forward(..., save=True)`; b is [0] without g). Their bytes are SAVE_FOR_BACKWARD's cost."""
    batch, length = q.shape[:2]
    kv_heads, dk, dv = k.shape[2], k.shape[-1], v.shape[-1]
    rows, chunks = batch * length, chunk_count(batch, length, cu_seqlens, _CHUNK)
    return [(rows, kv_heads, dk), (rows, kv_heads, dv), (0,) if g is None else (rows, kv_heads),
            (chunks, kv_heads, dk, dv), (chunks, kv_heads, _CHUNK, _CHUNK)]


@delta_rule_saving_op.register_fake
def _saving_fake(q, k, v, beta, g, scale, initial_state, cu_seqlens):
    o, final = _forward_fake(q, k, v, beta, g, scale, initial_state, cu_seqlens)
    if q.device.type != "cuda":
        return o, final, *(_unkept(q) for _ in range(5))
    return o, final, *(q.new_empty(shape, dtype=torch.float32) for shape in kept_shapes(q, k, v, g, cu_seqlens))


delta_rule_saving_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("rewrite::delta_rule_backward_saved", mutates_args=())
def delta_rule_backward_saved_op(
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
    w: torch.Tensor,
    u: torch.Tensor,
    b: torch.Tensor,
    h: torch.Tensor,
    t: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`rewrite::delta_rule_backward` given the buffers `rewrite::delta_rule_saving` kept (not recomputed on CUDA;
    ignored by the reference)."""
    return _backward_reference(do, d_final_state, q, k, v, beta, g, scale, initial_state, cu_seqlens)


@delta_rule_backward_saved_op.register_kernel("cuda")
def _backward_saved_cuda(do, d_final_state, q, k, v, beta, g, scale, initial_state, cu_seqlens, w, u, b, h, t):
    saved = (w, u, None if g is None else b, h, t) if t.dim() == 4 else None
    return _backward_triton(do, d_final_state, q, k, v, beta, g, scale, initial_state, cu_seqlens, saved)


@delta_rule_backward_saved_op.register_fake
def _backward_saved_fake(do, d_final_state, q, k, v, beta, g, scale, initial_state, cu_seqlens, w, u, b, h, t):
    return _backward_fake(do, d_final_state, q, k, v, beta, g, scale, initial_state, cu_seqlens)


def saves_for_backward(*inputs: torch.Tensor | None) -> bool:
    """Whether `delta_rule` runs `rewrite::delta_rule_saving`: SAVE_FOR_BACKWARD (read here, at every call), grad mode
    on and an input requiring grad (so inference keeps nothing)."""
    return SAVE_FOR_BACKWARD and backward_will_run(*inputs)


def delta_rule_forward(q, k, v, beta, g, scale, initial_state, cu_seqlens) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, final state) by `rewrite::delta_rule`, or by `rewrite::delta_rule_saving` when `saves_for_backward`."""
    if saves_for_backward(q, k, v, beta, g, initial_state):
        o, final, *_ = delta_rule_saving_op(q, k, v, beta, g, scale, initial_state, cu_seqlens)
        return o, final
    return delta_rule_op(q, k, v, beta, g, scale, initial_state, cu_seqlens)


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
