"""Kind `gla`: gated linear attention with gates computed from the keys, no new parameters (Liger-style).

The log-gate is `rewrite.kernels.linear_attention`'s key gate: logsigmoid(k) / normalizer per key dim
("vector") or logsigmoid(mean_K k) / normalizer per head ("scalar"), from the keys as the attention
site sees them (after RoPE / QK-norm where the model applies them), before the feature map.
"""

from __future__ import annotations

import torch

from rewrite.mixers.common import mask_log_decay, mix, padding_validity


def gla_mixer(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    gate: str = "vector",
    gate_normalizer: float = 16.0,
    scale: float | None = None,
    feature_map: str = "identity",
    normalize: bool = False,
    mask_negated: bool = False,
    check_mask: bool = True,
    layer: str = "",
) -> torch.Tensor:
    """S_t = diag(exp(g_t)) S_{t-1} + phi(k_t)^T v_t, o_t = scale * phi(q_t) S_t, g_t from k_t.

    Shapes as SDPA: q [B, H, L, D], k / v [B, Hkv, L, D], o [B, H, L, Dv].
    """
    from rewrite.kernels.linear_attention.feature_maps import log_decay_from_keys  # loaded on first use

    valid = padding_validity(mask, q.shape[0], causal=True, negated=mask_negated, check=check_mask, layer=layer)
    g = mask_log_decay(log_decay_from_keys(k.transpose(1, 2), gate, gate_normalizer), valid)
    return mix(
        q, k, v, g=g, decay=gate, causal=True, scale=scale, feature_map=feature_map, normalize=normalize,
        valid=valid,
    )
