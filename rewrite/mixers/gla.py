"""Kind `gla`: gated linear attention with gates computed from the keys, no new parameters (Liger-style).

The log-gate is `rewrite.kernels.linear_attention`'s key gate: logsigmoid(k) / normalizer per key dim
("vector") or logsigmoid(mean_K k) / normalizer per head ("scalar"), from the keys as the attention
site sees them (after RoPE / QK-norm where the model applies them), before the feature map. A
learned feature map that widens the keys repeats the per-dim gate over the new dims. Without padding
the vector gate is computed inside the kernels from the keys they read
(`rewrite.kernels.linear_attention.api.KERNEL_KEY_GATE`).
"""

from __future__ import annotations

import torch

from rewrite.mixers.common import (
    LEARNED_FEATURE_MAPS,
    check_packed,
    mask_log_decay,
    mix,
    mix_step,
    padding_validity,
    split_feature_weights,
)
from rewrite.mixers.transfer import observe


def key_gate(k: torch.Tensor, gate: str, gate_normalizer: float) -> torch.Tensor:
    """Log-decays from keys k [B, Hkv, L, D]: [B, L, Hkv, D] ("vector") or [B, L, Hkv] ("scalar")."""
    from rewrite.kernels.linear_attention.feature_maps import log_decay_from_keys  # loaded on first use

    return log_decay_from_keys(k.transpose(1, 2), gate, gate_normalizer)


def gla_mixer(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *feature_weights: torch.Tensor,
    mask: torch.Tensor | None = None,
    gate: str = "vector",
    gate_normalizer: float = 16.0,
    scale: float | None = None,
    feature_map: str = "identity",
    normalize: bool = False,
    mask_negated: bool = False,
    check_mask: bool = True,
    layer: str = "",
    cu_seqlens: torch.Tensor | None = None,
    teacher_qk: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """S_t = diag(exp(g_t)) S_{t-1} + phi(k_t)^T v_t, o_t = scale * phi(q_t) S_t, g_t from k_t.

    Shapes as SDPA: q [B, H, L, D], k / v [B, Hkv, L, D], o [B, H, L, Dv]. cu_seqlens [N + 1]: packed
    sequences in B == 1 (no mask), the state reset at each sequence start.
    """
    weights = split_feature_weights(feature_map, feature_weights, layer)
    check_packed(q, mask, cu_seqlens, layer)
    valid = padding_validity(mask, q.shape[0], causal=True, negated=mask_negated, check=check_mask, layer=layer)
    # without padding the vector gate is the kernels' own (from the raw keys as they read them): no float32
    # [B, L, Hkv, D] log-decay is written; padding needs the masked log-decay, a learned map its widened gate
    in_kernels = valid is None and gate == "vector" and feature_map not in LEARNED_FEATURE_MAPS
    g = None if in_kernels else mask_log_decay(key_gate(k, gate, gate_normalizer), valid)
    out = mix(
        q, k, v, g=g, decay=gate, causal=True, scale=scale, feature_map=feature_map, normalize=normalize,
        valid=valid, feature_weights=weights, cu_seqlens=cu_seqlens,
        key_gate_normalizer=gate_normalizer if in_kernels else None,
    )
    return observe(out, q, k, v, valid=valid, causal=True, scale=scale, layer=layer, cu_seqlens=cu_seqlens,
                   teacher_qk=teacher_qk)


def gla_mixer_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *feature_weights: torch.Tensor,
    state: torch.Tensor | None = None,
    gate: str = "vector",
    gate_normalizer: float = 16.0,
    scale: float | None = None,
    feature_map: str = "identity",
    normalize: bool = False,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`gla_mixer` for a few new tokens (SDPA layout) from `state`; returns (o, new state).

    inplace: `state` is updated in place and returned (the decode path passes it).
    """
    weights = split_feature_weights(feature_map, feature_weights, "gla step")
    return mix_step(q, k, v, state, g=key_gate(k, gate, gate_normalizer), decay=gate, scale=scale,
                    feature_map=feature_map, normalize=normalize, feature_weights=weights, inplace=inplace)
