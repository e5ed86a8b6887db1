"""Kind `bidirectional`: non-causal linear attention for encoders (every token sees every real token)."""

from __future__ import annotations

import torch

from rewrite.mixers.common import check_packed, mix, padding_validity, split_feature_weights
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
    cu_seqlens: torch.Tensor | None = None,
    teacher_qk: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """o_t = scale * phi(q_t) sum_s phi(k_s)^T v_s over every real key s (normalised if asked).

    Shapes as SDPA: q [B, H, L, D], k / v [B, Hkv, L, D], o [B, H, L, Dv]. Linear in L: the sum over
    keys is one [K, V] state per kv head. feature_weights: the (q, k) matrices of a learned feature map.
    cu_seqlens [N + 1]: packed sequences in B == 1 (no mask); each token sees the keys of its own sequence.
    """
    weights = split_feature_weights(feature_map, feature_weights, layer)
    check_packed(q, mask, cu_seqlens, layer)
    valid = padding_validity(mask, q.shape[0], causal=False, negated=mask_negated, check=check_mask, layer=layer)
    out = mix(q, k, v, causal=False, scale=scale, feature_map=feature_map, normalize=normalize, valid=valid,
              feature_weights=weights, cu_seqlens=cu_seqlens)
    return observe(out, q, k, v, valid=valid, causal=False, scale=scale, layer=layer, cu_seqlens=cu_seqlens,
                   teacher_qk=teacher_qk)
