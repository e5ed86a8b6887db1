"""Public linear-attention functions: argument checks, feature maps, key gates, then the ops."""

import torch

from . import checks
from .feature_maps import apply_feature_map, log_decay_from_keys
from .op import linear_attention_op, linear_attention_step_op, state_dtype


def _prepare(q, k, g, decay, scale, feature_map, key_gate_normalizer):
    checks.check_choice("feature_map", feature_map, checks.FEATURE_MAPS)
    decay = checks.infer_decay(g, decay, key_gate_normalizer is not None)
    if key_gate_normalizer is not None:
        if g is not None:
            raise ValueError("linear_attention: pass either g or key_gate_normalizer, not both")
        if not key_gate_normalizer > 0:
            raise ValueError(f"linear_attention: key_gate_normalizer must be > 0, got {key_gate_normalizer}")
        g = log_decay_from_keys(k, decay, key_gate_normalizer)
    checks.check_decay(g, decay, q, k)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    # contiguous here, where torch.compile sees it: the op reads [B, T, heads, D] rows, and a compiled
    # caller then writes its producer (RoPE, feature map, gate) in that layout instead of copying after it
    q, k = apply_feature_map(q, feature_map).contiguous(), apply_feature_map(k, feature_map).contiguous()
    return q, k, None if g is None else g.contiguous(), decay, scale


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
    `feature_maps.log_decay_from_keys`); decay defaults to "vector" then.
    """
    checks.check_qkv(q, k, v)
    if not isinstance(causal, bool):
        raise ValueError(f"linear_attention: causal must be a bool, got {causal!r}")
    q, k, g, decay, scale = _prepare(q, k, g, decay, scale, feature_map, key_gate_normalizer)
    if not causal and decay != "none":
        raise ValueError(
            f'linear_attention: causal=False is defined only for decay="none", got decay="{decay}"'
        )
    n = checks.check_cu_seqlens(cu_seqlens, q)
    checks.check_state("initial_state", initial_state, n, k, v)
    if initial_state is not None:
        initial_state = initial_state.to(state_dtype(q.dtype))
    o, final_state = linear_attention_op(q, k, v.contiguous(), g, decay, scale, initial_state, cu_seqlens, causal)
    return o, (final_state if output_final_state else None)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a few new tokens per sequence from a state; returns (o [B, t, H, V], new state [B, Hkv, K, V]).

    Same arguments and state layout as `linear_attention` with causal=True and no cu_seqlens:
    q [B, t, H, K], k [B, t, Hkv, K], v [B, t, Hkv, V], g as there with T = t. state None
    starts from zeros. Chaining steps over a sequence gives the `linear_attention` outputs and
    final state. Inference only (no autograd).
    """
    checks.check_qkv(q, k, v)
    q, k, g, decay, scale = _prepare(q, k, g, decay, scale, feature_map, key_gate_normalizer)
    checks.check_state("state", state, q.shape[0], k, v)
    if state is None:
        state = q.new_zeros(q.shape[0], k.shape[2], k.shape[-1], v.shape[-1], dtype=state_dtype(q.dtype))
    return linear_attention_step_op(q, k, v, g, decay, scale, state.to(state_dtype(q.dtype)))
