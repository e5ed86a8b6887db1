"""Kind `bidirectional`: non-causal linear attention for encoders (every token sees every real token)."""

from __future__ import annotations

import torch

from rewrite.mixers.common import mix, padding_validity, split_feature_weights
from rewrite.mixers.transfer import observe


def bidirectional_mixer(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *feature_weights: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    feature_map: str = "identity",
    normalize: bool = False,
    mask_negated: bool = False,
    check_mask: bool = True,
    layer: str = "",
) -> torch.Tensor:
    """o_t = scale * phi(q_t) sum_s phi(k_s)^T v_s over every real key s (normalised if asked).

    Shapes as SDPA: q [B, H, L, D], k / v [B, Hkv, L, D], o [B, H, L, Dv]. Linear in L: the sum over
    keys is one [K, V] state per kv head. feature_weights: the (q, k) matrices of a learned feature map.
    """
    weights = split_feature_weights(feature_map, feature_weights, layer)
    valid = padding_validity(mask, q.shape[0], causal=False, negated=mask_negated, check=check_mask, layer=layer)
    out = mix(q, k, v, causal=False, scale=scale, feature_map=feature_map, normalize=normalize, valid=valid,
              feature_weights=weights)
    return observe(out, q, k, v, valid=valid, causal=False, scale=scale, layer=layer)
