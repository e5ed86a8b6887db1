"""Public linear-attention functions: argument checks, feature maps, key gates, then the ops."""

import torch

from . import checks
from .feature_maps import apply_feature_map, log_decay_from_keys
from .op import (
    linear_attention_forward,
    linear_attention_step_inplace_op,
    linear_attention_step_op,
    state_dtype,
)

KERNEL_KEY_GATE = False
"""`linear_attention(..., key_gate_normalizer=N)` with decay "vector": True, the chunked kernels compute the
log-decay logsigmoid(k) / N from the raw keys as they read them (the ops get g = the raw keys and key_gate = N, so
no float32 [B, T, Hkv, K] log-decay tensor is written and read back; the backward still returns the raw keys'
gradient through both the attention and the gate); False, the log-decay is computed with PyTorch ops before the
op (`feature_maps.log_decay_from_keys`), as before. Read at every call. The scalar key gate and the decode steps
(`linear_attention_step`) always use the PyTorch form. Off until it is timed and checked on a GPU (NOTES.md, "Key gate
in the kernels"; `benchmarks.linear_attention`'s sweep variant "key gate in kernels")."""


def _prepare(q, k, g, decay, scale, feature_map, key_gate_normalizer, kernel_gate=False):
    """(q, k after the feature map, g, decay, scale, key_gate) for the ops: g holds the raw keys and key_gate the
    normalizer when `kernel_gate` and the key gate is the vector one, else g holds log-decays and key_gate is 0."""
    checks.check_choice("feature_map", feature_map, checks.FEATURE_MAPS)
    decay = checks.infer_decay(g, decay, key_gate_normalizer is not None)
    key_gate = 0.0
    if key_gate_normalizer is not None:
        if g is not None:
            raise ValueError("linear_attention: pass either g or key_gate_normalizer, not both")
        if not key_gate_normalizer > 0:
            raise ValueError(f"linear_attention: key_gate_normalizer must be > 0, got {key_gate_normalizer}")
        if kernel_gate and decay == "vector":
            g, key_gate = k, float(key_gate_normalizer)  # the raw keys, before the feature map
        else:
            g = log_decay_from_keys(k, decay, key_gate_normalizer)
    checks.check_decay(g, decay, q, k)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    # contiguous here, where torch.compile sees it: the op reads [B, T, heads, D] rows, and a compiled
    # caller then writes its producer (RoPE, feature map, gate) in that layout instead of copying after it
    q, k = apply_feature_map(q, feature_map).contiguous(), apply_feature_map(k, feature_map).contiguous()
    return q, k, None if g is None else g.contiguous(), decay, scale, key_gate


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    decay: str | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    causal: bool = True,
    feature_map: str = "identity",
    key_gate_normalizer: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Linear attention with optional decay; returns (o [B, T, H, V], final state [N, Hkv, K, V] or None).

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t per kv head; o_t = scale * q_t S_t, where q head h
    reads kv head h // (H / Hkv) (GQA/MQA without repeating k and v).

    q [B, T, H, K]; k [B, T, Hkv, K]; v [B, T, Hkv, V]. g holds log-decays (<= 0):
    decay "none" (g None), "constant" (g [Hkv]), "scalar" (g [B, T, Hkv]), "vector"
    (g [B, T, Hkv, K]); left as None, decay is read from g's shape. scale defaults to K**-0.5.
    initial_state [N, Hkv, K, V] and the final state are float32 (float64 for float64 inputs).
    cu_seqlens [N + 1] packs N sequences into B == 1; each starts from its own initial state.
    causal=False (decay "none" only): every token sees all tokens of its sequence.
    feature_map ("identity", "softmax", "elu", "relu") is applied to q and k.
    key_gate_normalizer: derive g from the raw keys instead of passing it (see
    `feature_maps.log_decay_from_keys`); decay defaults to "vector" then. With `KERNEL_KEY_GATE` the vector
    gate is computed inside the kernels from the raw keys; the scalar one always before them.
    """
    checks.check_qkv(q, k, v)
    if not isinstance(causal, bool):
        raise ValueError(f"linear_attention: causal must be a bool, got {causal!r}")
    q, k, g, decay, scale, key_gate = _prepare(q, k, g, decay, scale, feature_map, key_gate_normalizer,
                                               KERNEL_KEY_GATE)
    if not causal and decay != "none":
        raise ValueError(
            f'linear_attention: causal=False is defined only for decay="none", got decay="{decay}"'
        )
    n = checks.check_cu_seqlens(cu_seqlens, q)
    checks.check_state("initial_state", initial_state, n, k, v)
    if initial_state is not None:
        initial_state = initial_state.to(state_dtype(q.dtype))
    o, final_state = linear_attention_forward(q, k, v.contiguous(), g, decay, scale, initial_state, cu_seqlens,
                                              causal, key_gate)
    return o, (final_state if output_final_state else None)


PRECOMPUTED_NORMALIZER = "compiled"
"""When an in-place normalised step (`linear_attention_step(normalize=True, inplace=True)`) computes the
running key sums z itself, with elementwise ops before the kernel: "compiled" (only under torch.compile,
which fuses them into the ops producing k and g, so they cost no kernel), "always" or "never". Without
them the step runs the functional kernel (which keeps z itself) and copies the new state into `state`:
the in-place kernel cannot keep z, every V tile of a kv head reads it while one of them writes it."""
PRECOMPUTED_NORMALIZER_CHOICES = ("compiled", "always", "never")


def running_key_sums(state: torch.Tensor, k: torch.Tensor, g: torch.Tensor | None, decay: str) -> torch.Tensor:
    """z after each token, [B, t, Hkv, K] in the state's dtype, from the state's last column (z before the
    tokens): z_s = exp(g_s) * z_{s-1} + k_s, the decayed running sum of the (feature-mapped) keys."""
    z = state[..., -1]
    sums = []
    for s in range(k.shape[1]):
        if decay == "constant":
            z = z * g.exp()[:, None].to(z.dtype)
        elif decay == "scalar":
            z = z * g[:, s].exp()[..., None].to(z.dtype)
        elif decay == "vector":
            z = z * g[:, s].exp().to(z.dtype)
        z = z + k[:, s].to(z.dtype)
        sums.append(z)
    return torch.stack(sums, dim=1)


def _precompute_normalizer() -> bool:
    choice = PRECOMPUTED_NORMALIZER
    if choice not in PRECOMPUTED_NORMALIZER_CHOICES:
        raise ValueError(f"PRECOMPUTED_NORMALIZER must be one of {PRECOMPUTED_NORMALIZER_CHOICES}, got {choice!r}")
    return choice == "always" or (choice == "compiled" and torch.compiler.is_compiling())


def linear_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    decay: str | None = None,
    scale: float | None = None,
    state: torch.Tensor | None = None,
    feature_map: str = "identity",
    key_gate_normalizer: float | None = None,
    normalize: bool = False,
    eps: float = 1e-6,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a few new tokens per sequence from a state; returns (o [B, t, H, V], new state [B, Hkv, K, V]).

    Same arguments and state layout as `linear_attention` with causal=True and no cu_seqlens:
    q [B, t, H, K], k [B, t, Hkv, K], v [B, t, Hkv, V], g as there with T = t. state None
    starts from zeros. Chaining steps over a sequence gives the `linear_attention` outputs and
    final state. Inference only (no autograd).

    normalize: the state has one more column, [B, Hkv, K, V + 1], the running sum z of phi(k) (what
    `linear_attention` keeps for v with a column of ones appended), and o = scale * phi(q) S /
    (scale * phi(q) z + eps), divided in the kernel. inplace: `state` (required, contiguous, float32 /
    float64 as `linear_attention` keeps it) receives the new state and is returned; the decode path
    uses it so that no copy of the state follows the kernel.
    """
    checks.check_qkv(q, k, v)
    q, k, g, decay, scale, _ = _prepare(q, k, g, decay, scale, feature_map, key_gate_normalizer)
    v = v.contiguous()  # where torch.compile sees it, as q and k
    extra = 1 if normalize else 0
    checks.check_state("state", state, q.shape[0], k, v, extra)
    dtype = state_dtype(q.dtype)
    if inplace:
        if state is None or state.dtype != dtype or not state.is_contiguous():
            raise ValueError(f"linear_attention: an in-place step needs a contiguous {dtype} state, got "
                             f"{None if state is None else (state.dtype, tuple(state.stride()))}")
        if not normalize or _precompute_normalizer():
            z = running_key_sums(state, k, g, decay) if normalize else None
            return linear_attention_step_inplace_op(q, k, v, g, decay, scale, state, z, eps), state
        o, new_state = linear_attention_step_op(q, k, v, g, decay, scale, state, True, eps)
        state.copy_(new_state)
        return o, state
    if state is None:
        shape = (q.shape[0], k.shape[2], k.shape[-1], v.shape[-1] + extra)
        state = q.new_zeros(shape, dtype=dtype)
    return linear_attention_step_op(q, k, v, g, decay, scale, state.to(dtype), normalize, eps)
