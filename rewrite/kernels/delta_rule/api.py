"""Public delta-rule functions: argument checks, then the ops."""

import torch

from ..linear_attention import checks
from .op import delta_rule_forward, delta_rule_step_op, state_dtype

MAX_CHUNKED_KEY_DIM = 128
"""Largest key head dim of the chunked CUDA kernels: they hold [BK, BK] float32 blocks (the chunk transitions) in
shared memory with BK the whole key dim; an sm_90 compile (triton 3.6) of the state pass needs 589824 bytes at BK =
256 (295936 with one stage) against an H100's 232448, 163840 at 128 (as run on the H100s). The CPU reference takes
any K."""


def chunked_key_dim_refusal(key_dim: int, device: torch.device) -> str | None:
    """Why the chunked kernels cannot take keys of `key_dim` on `device`, or None when they can."""
    if device.type == "cuda" and key_dim > MAX_CHUNKED_KEY_DIM:
        return (f"key head dim {key_dim} is above the {MAX_CHUNKED_KEY_DIM} the delta rule's CUDA kernels take (their "
                "[K, K] float32 chunk blocks would not fit a GPU's shared memory)")
    return None


def _fail(name: str, message: str) -> None:
    raise ValueError(f"delta_rule: {name} {message}")


def _check_gates(beta: torch.Tensor, g: torch.Tensor | None, k: torch.Tensor) -> None:
    expected = tuple(k.shape[:3])
    for name, x in (("beta", beta), ("g", g)):
        if x is None:
            continue
        if tuple(x.shape) != expected:
            _fail(name, f"must have shape [B, T, Hkv] = {list(expected)}, got {list(x.shape)}")
        if not x.is_floating_point() or x.device != k.device:
            _fail(name, f"must be a floating-point tensor on {k.device}, got {x.dtype} on {x.device}")


def _checked(check, *args):
    """Run one of the linear-attention argument checks (same conventions), naming this function."""
    try:
        return check(*args)
    except ValueError as error:
        raise ValueError(str(error).replace("linear_attention:", "delta_rule:", 1)) from None


def _prepare(q, k, v, beta, g, scale, allow_neg_eigval):
    _checked(checks.check_qkv, q, k, v)
    _check_gates(beta, g, k)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return (beta * 2 if allow_neg_eigval else beta), scale


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    allow_neg_eigval: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Delta rule (DeltaNet; Gated DeltaNet with g); returns (o [B, T, H, V], final state [N, Hkv, K, V] or None).

    Per kv head, S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T (S is [K, V])
    and o_t = scale * q_t S_t, where q head h reads kv head h // (H / Hkv); see `naive.py`.
    q [B, T, H, K]; k [B, T, Hkv, K]; v [B, T, Hkv, V]; beta [B, T, Hkv] in [0, 1] (e.g. a
    sigmoid); g [B, T, Hkv] per-token log-decays (<= 0) or None. allow_neg_eigval doubles
    beta (range [0, 2]) so the transition can have eigenvalues down to -1. Keys should be
    L2-normalised by the caller; nothing here normalises them. scale defaults to K**-0.5.
    initial_state [N, Hkv, K, V] and the final state are float32 (float64 for float64 inputs).
    cu_seqlens [N + 1] packs N sequences into B == 1; each starts from its own initial state.
    """
    beta, scale = _prepare(q, k, v, beta, g, scale, allow_neg_eigval)
    n = _checked(checks.check_cu_seqlens, cu_seqlens, q)
    _checked(checks.check_state, "initial_state", initial_state, n, k, v)
    if initial_state is not None:
        initial_state = initial_state.to(state_dtype(q.dtype))
    o, final = delta_rule_forward(q, k, v, beta, g, scale, initial_state, cu_seqlens)
    return o, (final if output_final_state else None)


def delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    state: torch.Tensor | None = None,
    allow_neg_eigval: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a few new tokens per sequence from a state; returns (o [B, t, H, V], new state [B, Hkv, K, V]).

    Same arguments and state layout as `delta_rule` with no cu_seqlens (T = t). state None
    starts from zeros. Chaining steps gives `delta_rule`'s outputs and final state. Inference only.
    """
    beta, scale = _prepare(q, k, v, beta, g, scale, allow_neg_eigval)
    _checked(checks.check_state, "state", state, q.shape[0], k, v)
    if state is None:
        state = q.new_zeros(q.shape[0], k.shape[2], k.shape[-1], v.shape[-1], dtype=state_dtype(q.dtype))
    return delta_rule_step_op(q, k, v, beta, g, scale, state.to(state_dtype(q.dtype)))
