"""Kind `linear`: causal feature-mapped linear attention, no decay, no new parameters."""

from __future__ import annotations

import torch

from rewrite.mixers.common import mix, padding_validity


def linear_mixer(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    feature_map: str = "identity",
    normalize: bool = False,
    mask_negated: bool = False,
    check_mask: bool = True,
    layer: str = "",
) -> torch.Tensor:
    """o_t = scale * sum_{s <= t} (phi(q_t) . phi(k_s)) v_s over real keys (normalised if asked).

    Shapes as SDPA: q [B, H, L, D], k / v [B, Hkv, L, D] (GQA without repeating), o [B, H, L, Dv].
    """
    valid = padding_validity(mask, q.shape[0], causal=True, negated=mask_negated, check=check_mask, layer=layer)
    return mix(q, k, v, causal=True, scale=scale, feature_map=feature_map, normalize=normalize, valid=valid)
