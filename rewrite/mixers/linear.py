"""Kind `linear`: causal feature-mapped linear attention, no decay, no new parameters."""

from __future__ import annotations

import torch

from rewrite.mixers.common import check_packed, mix, mix_step, padding_validity, split_feature_weights
from rewrite.mixers.transfer import observe


def linear_mixer(
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
    """o_t = scale * sum_{s <= t} (phi(q_t) . phi(k_s)) v_s over real keys (normalised if asked).

    Shapes as SDPA: q [B, H, L, D], k / v [B, Hkv, L, D] (GQA without repeating), o [B, H, L, Dv].
    feature_weights: the (q, k) matrices of a learned feature map (`hedgehog`), else nothing.
    cu_seqlens [N + 1]: packed sequences in B == 1 (no mask), the state reset at each sequence start.
    """
    weights = split_feature_weights(feature_map, feature_weights, layer)
    check_packed(q, mask, cu_seqlens, layer)
    valid = padding_validity(mask, q.shape[0], causal=True, negated=mask_negated, check=check_mask, layer=layer)
    out = mix(q, k, v, causal=True, scale=scale, feature_map=feature_map, normalize=normalize, valid=valid,
              feature_weights=weights, cu_seqlens=cu_seqlens)
    return observe(out, q, k, v, valid=valid, causal=True, scale=scale, layer=layer, cu_seqlens=cu_seqlens,
                   teacher_qk=teacher_qk)


def linear_mixer_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *feature_weights: torch.Tensor,
    state: torch.Tensor | None = None,
    scale: float | None = None,
    feature_map: str = "identity",
    normalize: bool = False,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`linear_mixer` for a few new tokens (SDPA layout, t tokens) from `state`; returns (o, new state).

    The state is [B, Hkv, K, Dv (+ 1 when normalising)] float32; None starts a sequence. inplace: `state`
    is updated in place and returned (the decode path passes it).
    """
    weights = split_feature_weights(feature_map, feature_weights, "linear step")
    return mix_step(q, k, v, state, scale=scale, feature_map=feature_map, normalize=normalize,
                    feature_weights=weights, inplace=inplace)
