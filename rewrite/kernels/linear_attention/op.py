"""The `rewrite::linear_attention*` ops: schemas, fakes, autograd, CPU references, CUDA Triton kernels.

Low-level: arguments are assumed valid (the public functions in `api.py` check them).
"""

import torch

from .. import eager_direct
from .._triton import load_triton_module
from ..launch_math import chunk_count
from ..saving import backward_will_run
from .chunked_reference import chunked_backward, chunked_forward
from .feature_maps import log_decay_from_keys
from .naive import naive_step

_FORWARD = "rewrite.kernels.linear_attention.triton_forward"
_BACKWARD = "rewrite.kernels.linear_attention.triton_backward"
_STEP = "rewrite.kernels.linear_attention.triton_step"
_CHUNK = 64  # triton_forward.CHUNK (the fake of `rewrite::linear_attention_saving` shapes the kept states with it)

# v9 (NOTES.md): keep the causal forward's chunk states h for the backward instead of recomputing
# them there (`triton_forward.chunk_states`: chunk terms + scan for the vector decay, one sequential kernel for the
# others). Read at every call of `linear_attention`; on by default (H100, bf16: fwd+bwd 3.40 -> 2.89 ms at 8K with
# H=16, D=128, 11.8 -> 10.7 at 32K; with the parallel cumsum 4.65 -> 4.05 ms at 32K with H=32 / Hkv=8 / D=64, and a
# linearized 16-layer model's compiled training step 319 -> 312 ms); False trades that time for the memory below,
# recomputing h in the backward. Used only when autograd will
# need them (grad mode on and an input requiring grad) and causal (the non-causal path is PyTorch's, with no states):
# inference runs `rewrite::linear_attention` and keeps nothing. While saving, the forward computes h as the backward's
# recompute does (float32 operands with a decay, `wide`), so the gradients are those of the recompute; its output then
# comes from those states (o differs from the default forward's by rounding only). Extra memory per layer, held from
# the forward to the backward, for n_c chunks (B * ceil(T / 64), or ceil(T / 64) + N when packed), Hkv kv heads, head
# dims K, V:   4 * n_c * Hkv * K * V bytes   (float32 h [n_c, Hkv, K, V]; the final state, an output, is kept too):
# 67 MB at B = 1, T = 32K, Hkv = 8, K = V = 64; 537 MB at B = 1, T = 32K, Hkv = 16, K = V = 128.
SAVE_STATES = True


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the recurrent state for inputs of `dtype`: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _empty_if_none(x: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0) if x is None else x


# The ops' `key_gate` argument: 0.0, g holds log-decays as `naive.py` defines them; > 0 (decay "vector" only), g holds
# the raw keys [B, T, Hkv, K] (in the keys' dtype) and the log-decay is logsigmoid(g) / key_gate
# (`feature_maps.log_decay_from_keys`): the Triton kernels compute it from g as they load it, so the float32
# log-decays are never written to memory; the backward ops then return the gradient w.r.t. those raw keys.


def _log_decay(g: torch.Tensor | None, key_gate: float) -> torch.Tensor | None:
    """The log-decays g stands for: g itself, or the key gate of the raw keys g when key_gate > 0."""
    return log_decay_from_keys(g, "vector", key_gate) if key_gate else g


def _key_gate_grad(d_log_decay: torch.Tensor | None, keys: torch.Tensor, key_gate: float) -> torch.Tensor | None:
    """d loss / d keys from d loss / d log-decay under the key gate: d logsigmoid(x) / dx = sigmoid(-x), in float32
    (float64 for float64 keys), returned in the keys' dtype."""
    if d_log_decay is None:
        return None
    wide = torch.promote_types(keys.dtype, torch.float32)
    return (d_log_decay.to(wide) * torch.sigmoid(-keys.to(wide)) / key_gate).to(keys.dtype)


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
    key_gate: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, T, H, V], final state [N, Hkv, K, V]); see `naive.py` for the definition. key_gate > 0: g holds
    the raw keys of the vector decay's key gate (see `_log_decay`)."""
    return _forward_reference(q, k, v, g, decay, scale, initial_state, cu_seqlens, causal, key_gate)


def _forward_reference(q, k, v, g, decay, scale, initial_state, cu_seqlens, causal, key_gate=0.0):
    return chunked_forward(q, k, v, _log_decay(g, key_gate), decay, scale, initial_state, cu_seqlens, causal)


@linear_attention_op.register_kernel("cuda")
def _forward_cuda(q, k, v, g, decay, scale, initial_state, cu_seqlens, causal, key_gate=0.0):
    if not causal:  # two matmuls: PyTorch is already as fast as a custom kernel
        return _forward_reference(q, k, v, g, decay, scale, initial_state, cu_seqlens, causal, key_gate)
    return load_triton_module(_FORWARD).chunk_forward(
        q, k, v, g, decay, scale, initial_state, cu_seqlens, key_gate=key_gate
    )


@linear_attention_op.register_fake
def _forward_fake(q, k, v, g, decay, scale, initial_state, cu_seqlens, causal, key_gate=0.0):
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
    key_gate: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dg, d_initial_state); dg / d_initial_state are empty [0] when g / initial_state are None.
    key_gate > 0: dg is the gradient w.r.t. the raw keys g (see `_log_decay`)."""
    return _backward_reference(do, d_final_state, q, k, v, g, decay, scale, initial_state, cu_seqlens, causal,
                               key_gate)


def _backward_reference(do, d_final_state, q, k, v, g, decay, scale, initial_state, cu_seqlens, causal, key_gate):
    grads = chunked_backward(do, d_final_state, q, k, v, _log_decay(g, key_gate), decay, scale, initial_state,
                             cu_seqlens, causal)
    return _op_grads(grads, q, g, key_gate)


def _op_grads(grads, q, g, key_gate) -> tuple[torch.Tensor, ...]:
    """The backward ops' outputs from (dq, dk, dv, d log-decay, d_initial_state): dg w.r.t. the op's g input
    (the raw keys under the key gate), empty [0] for an absent g or initial state."""
    dq, dk, dv, dg, dh0 = grads
    if key_gate:
        dg = _key_gate_grad(dg, g, key_gate)
    return dq, dk, dv, _empty_if_none(dg, q), _empty_if_none(dh0, q)


@linear_attention_backward_op.register_kernel("cuda")
def _backward_cuda(do, d_final_state, q, k, v, g, decay, scale, initial_state, cu_seqlens, causal, key_gate=0.0):
    if not causal:
        return _backward_reference(do, d_final_state, q, k, v, g, decay, scale, initial_state, cu_seqlens, causal,
                                   key_gate)
    grads = load_triton_module(_BACKWARD).chunk_backward(
        do, d_final_state, q, k, v, g, decay, scale, initial_state, cu_seqlens, key_gate=key_gate
    )
    return _op_grads(grads, q, g, key_gate)


@linear_attention_backward_op.register_fake
def _backward_fake(do, d_final_state, q, k, v, g, decay, scale, initial_state, cu_seqlens, causal, key_gate=0.0):
    dg = q.new_empty(0) if g is None else torch.empty_like(g)
    dh0 = q.new_empty(0) if initial_state is None else torch.empty_like(initial_state)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dg, dh0


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, g, decay, scale, initial_state, cu_seqlens, causal, key_gate = inputs
    ctx.save_for_backward(q, k, v, g, initial_state, cu_seqlens)
    ctx.decay, ctx.scale, ctx.causal, ctx.key_gate = decay, scale, causal, key_gate
    ctx.final_shape = output[1].shape


def _filled_grads(do, d_final_state, q, v, final_shape) -> tuple[torch.Tensor, torch.Tensor]:
    """(do, d_final_state) contiguous, zeros for an output whose gradient autograd did not materialise."""
    if d_final_state is None:
        d_final_state = q.new_zeros(final_shape, dtype=state_dtype(q.dtype))
    if do is None:
        do = q.new_zeros(*q.shape[:-1], v.shape[-1])
    return do.contiguous(), d_final_state.contiguous()


def _backward(ctx, do, d_final_state):
    q, k, v, g, initial_state, cu_seqlens = ctx.saved_tensors
    do, d_final_state = _filled_grads(do, d_final_state, q, v, ctx.final_shape)
    dq, dk, dv, dg, dh0 = linear_attention_backward_op(
        do,
        d_final_state,
        q,
        k,
        v,
        g,
        ctx.decay,
        ctx.scale,
        initial_state,
        cu_seqlens,
        ctx.causal,
        ctx.key_gate,
    )
    dg = None if g is None else dg
    dh0 = None if initial_state is None else dh0
    return dq, dk, dv, dg, None, None, dh0, None, None, None


linear_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _unkept(q: torch.Tensor) -> torch.Tensor:
    """An empty float32 buffer: states `rewrite::linear_attention_saving` did not keep."""
    return q.new_empty(0, dtype=torch.float32)


@torch.library.custom_op("rewrite::linear_attention_saving", mutates_args=())
def linear_attention_saving_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    decay: str,
    scale: float,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    key_gate: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal `rewrite::linear_attention` (o, final state) plus the states its backward would recompute: h, float32.

    On CUDA h is the Triton forward's states before every chunk, [chunks, Hkv, K, V] (`triton_forward.chunk_forward(
    ..., save=True)`, computed as the backward computes them); elsewhere h is empty [0] (the reference backward
    recomputes). Training only (`SAVE_STATES`); the autograd backward passes h and the final state to
    `rewrite::linear_attention_backward_saved`. key_gate as in `rewrite::linear_attention`."""
    return _saving_reference(q, k, v, g, decay, scale, initial_state, cu_seqlens, key_gate)


def _saving_reference(q, k, v, g, decay, scale, initial_state, cu_seqlens, key_gate=0.0):
    o, final = chunked_forward(q, k, v, _log_decay(g, key_gate), decay, scale, initial_state, cu_seqlens, True)
    return o, final, _unkept(q)


@linear_attention_saving_op.register_kernel("cuda")
def _saving_cuda(q, k, v, g, decay, scale, initial_state, cu_seqlens, key_gate=0.0):
    return load_triton_module(_FORWARD).chunk_forward(
        q, k, v, g, decay, scale, initial_state, cu_seqlens, save=True, key_gate=key_gate
    )


def kept_shape(q, k, v, cu_seqlens) -> tuple[int, int, int, int]:
    """Shape of the float32 states h that `rewrite::linear_attention_saving` returns on CUDA (the `Chunks` count:
    B * ceil(T / 64), or ceil(T / 64) + N when packed). Their bytes are SAVE_STATES' cost."""
    return chunk_count(*q.shape[:2], cu_seqlens, _CHUNK), k.shape[2], k.shape[-1], v.shape[-1]


@linear_attention_saving_op.register_fake
def _saving_fake(q, k, v, g, decay, scale, initial_state, cu_seqlens, key_gate=0.0):
    o, final = _forward_fake(q, k, v, g, decay, scale, initial_state, cu_seqlens, True)
    if q.device.type != "cuda":
        return o, final, _unkept(q)
    return o, final, q.new_empty(kept_shape(q, k, v, cu_seqlens), dtype=torch.float32)


def _saving_setup_context(ctx, inputs, output) -> None:
    q, k, v, g, decay, scale, initial_state, cu_seqlens, key_gate = inputs
    ctx.save_for_backward(q, k, v, g, initial_state, cu_seqlens, output[1], output[2])
    ctx.mark_non_differentiable(output[2])  # the kept states
    ctx.set_materialize_grads(False)  # no zeros the size of h for its (absent) gradient
    ctx.decay, ctx.scale, ctx.key_gate = decay, scale, key_gate


def _saving_backward(ctx, do, d_final_state, _):
    q, k, v, g, initial_state, cu_seqlens, final, h = ctx.saved_tensors
    if do is None and d_final_state is None:
        return None, None, None, None, None, None, None, None, None
    do, d_final_state = _filled_grads(do, d_final_state, q, v, final.shape)
    dq, dk, dv, dg, dh0 = linear_attention_backward_saved_op(
        do,
        d_final_state,
        q,
        k,
        v,
        g,
        ctx.decay,
        ctx.scale,
        initial_state,
        cu_seqlens,
        h,
        final,
        ctx.key_gate,
    )
    dg = None if g is None else dg
    dh0 = None if initial_state is None else dh0
    return dq, dk, dv, dg, None, None, dh0, None, None


linear_attention_saving_op.register_autograd(_saving_backward, setup_context=_saving_setup_context)


@torch.library.custom_op("rewrite::linear_attention_backward_saved", mutates_args=())
def linear_attention_backward_saved_op(
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
    h: torch.Tensor,
    final: torch.Tensor,
    key_gate: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal `rewrite::linear_attention_backward` given the states h and the final state that
    `rewrite::linear_attention_saving` returned (not recomputed on CUDA; ignored by the reference)."""
    return _backward_saved_reference(do, d_final_state, q, k, v, g, decay, scale, initial_state, cu_seqlens, h, final,
                                     key_gate)


def _backward_saved_reference(do, d_final_state, q, k, v, g, decay, scale, initial_state, cu_seqlens, h, final,
                              key_gate=0.0):
    return _backward_reference(do, d_final_state, q, k, v, g, decay, scale, initial_state, cu_seqlens, True,
                               key_gate)


@linear_attention_backward_saved_op.register_kernel("cuda")
def _backward_saved_cuda(do, d_final_state, q, k, v, g, decay, scale, initial_state, cu_seqlens, h, final,
                         key_gate=0.0):
    saved = (h, final) if h.dim() == 4 else None
    grads = load_triton_module(_BACKWARD).chunk_backward(
        do, d_final_state, q, k, v, g, decay, scale, initial_state, cu_seqlens, saved=saved, key_gate=key_gate
    )
    return _op_grads(grads, q, g, key_gate)


@linear_attention_backward_saved_op.register_fake
def _backward_saved_fake(do, d_final_state, q, k, v, g, decay, scale, initial_state, cu_seqlens, h, final,
                         key_gate=0.0):
    return _backward_fake(do, d_final_state, q, k, v, g, decay, scale, initial_state, cu_seqlens, True)


def saves_states(causal: bool, *inputs: torch.Tensor | None) -> bool:
    """Whether `linear_attention` runs `rewrite::linear_attention_saving`: SAVE_STATES (read here, at every call),
    causal, grad mode on and an input requiring grad (so inference keeps nothing)."""
    return SAVE_STATES and causal and backward_will_run(*inputs)


# The ops' implementations per device type, for eager calls that run them without the ops (`eager_direct`).
_FORWARD_IMPL = {"cuda": _forward_cuda, "cpu": _forward_reference}
_SAVING_IMPL = {"cuda": _saving_cuda, "cpu": _saving_reference}
_BACKWARD_SAVED_IMPL = {"cuda": _backward_saved_cuda, "cpu": _backward_saved_reference}


class _DirectSaving(torch.autograd.Function):
    """`rewrite::linear_attention_saving` with its autograd, run as one autograd.Function on the ops' device
    implementations: same kernels and results, without the custom ops' per-call dispatch (`eager_direct`)."""

    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, decay, scale, cu_seqlens, key_gate):
        device = q.device.type
        o, final, h = _SAVING_IMPL[device](q, k, v, g, decay, scale, initial_state, cu_seqlens, key_gate)
        ctx.save_for_backward(q, k, v, g, initial_state, cu_seqlens, final, h)
        ctx.set_materialize_grads(False)
        ctx.decay, ctx.scale, ctx.key_gate = decay, scale, key_gate
        return o, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, d_final_state):
        q, k, v, g, initial_state, cu_seqlens, final, h = ctx.saved_tensors
        if do is None and d_final_state is None:
            return (None,) * 9
        do, d_final_state = _filled_grads(do, d_final_state, q, v, final.shape)
        dq, dk, dv, dg, dh0 = _BACKWARD_SAVED_IMPL[q.device.type](
            do, d_final_state, q, k, v, g, ctx.decay, ctx.scale, initial_state, cu_seqlens, h, final, ctx.key_gate
        )
        return dq, dk, dv, None if g is None else dg, None if initial_state is None else dh0, None, None, None, None


EAGER_DIRECT = True
"""True: eager calls on plain CUDA tensors run the ops' implementations without the `rewrite::linear_attention*`
custom ops (`eager_direct.runs_direct`: not under torch.compile / export, no tensor subclass, dispatch or function
mode, functorch transform or autocast), through `_DirectSaving` when autograd will run a backward; same kernels,
same results bit for bit. Read at every call. On since its H100 timing (2026-12-07, B=1, H=16, D=128, bf16,
`python -m benchmarks.linear_attention --host-split`, both paths in one process): eager fwd+bwd 1.56 vs 1.91 ms
(vector) and 1.10 vs 1.41 ms (no decay) at 2K, 2.27 vs 2.53 and 1.20 vs 1.32 ms at 8K, a tie at 32K where the
kernels dominate; the host's enqueue time at 8K (vector) 1.68 vs 2.16 ms. NOTES.md, "Host time"."""


def linear_attention_forward(q, k, v, g, decay, scale, initial_state, cu_seqlens, causal, key_gate=0.0):
    """(o, final state) by `rewrite::linear_attention`, or by `rewrite::linear_attention_saving` when `saves_states`;
    an eager call runs the same implementation without the op where `EAGER_DIRECT` allows it.
    key_gate > 0: g holds the raw keys of the vector decay's key gate (see `_log_decay`)."""
    saving = saves_states(causal, q, k, v, g, initial_state)
    direct = EAGER_DIRECT and eager_direct.runs_direct(q, k, v, g, initial_state, cu_seqlens)
    if saving:
        if direct:
            return _DirectSaving.apply(q, k, v, g, initial_state, decay, scale, cu_seqlens, key_gate)
        o, final, _ = linear_attention_saving_op(q, k, v, g, decay, scale, initial_state, cu_seqlens, key_gate)
        return o, final
    if direct and not backward_will_run(q, k, v, g, initial_state):
        device = q.device.type
        return _FORWARD_IMPL[device](q, k, v, g, decay, scale, initial_state, cu_seqlens, causal, key_gate)
    return linear_attention_op(q, k, v, g, decay, scale, initial_state, cu_seqlens, causal, key_gate)


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
