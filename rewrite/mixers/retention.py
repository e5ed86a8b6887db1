"""Kind `retention`: causal linear attention with a constant, learned decay per kv head (RetNet-like).

The decay of kv head h is gamma_h = sigmoid(decay_logit[h]), a new parameter; its log,
logsigmoid(decay_logit), is always <= 0 however training moves the parameter.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rewrite.mixers.common import (
    check_packed,
    mask_log_decay,
    mix,
    mix_step,
    padding_validity,
    split_feature_weights,
)
from rewrite.mixers.transfer import observe


def init_decay_logit(kv_heads: int, decay_min: float, decay_max: float) -> torch.Tensor:
    """[kv_heads] logits of decays spread geometrically in 1 - gamma from `decay_min` to `decay_max`."""
    lo, hi = -math.log2(1 - decay_min), -math.log2(1 - decay_max)
    exponents = torch.linspace(lo, hi, kv_heads, dtype=torch.float64) if kv_heads > 1 else torch.tensor([lo])
    gamma = 1 - torch.exp2(-exponents.double())
    return torch.log(gamma / (1 - gamma)).float()


def retention_mixer(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay_logit: torch.Tensor,
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
    """o_t = scale * sum_{s <= t} gamma^(t - s) (phi(q_t) . phi(k_s)) v_s, gamma per kv head.

    Shapes as SDPA: q [B, H, L, D], k / v [B, Hkv, L, D], decay_logit [Hkv], o [B, H, L, Dv]. With
    padding, the decay becomes per token so padded tokens do not decay the state. cu_seqlens [N + 1]:
    packed sequences in B == 1 (no mask), the state reset at each sequence start.
    """
    weights = split_feature_weights(feature_map, feature_weights, layer)
    check_packed(q, mask, cu_seqlens, layer)
    log_decay = F.logsigmoid(decay_logit.float())
    valid = padding_validity(mask, q.shape[0], causal=True, negated=mask_negated, check=check_mask, layer=layer)
    if valid is None:
        g, decay = log_decay, "constant"
    else:
        batch, _, length, _ = k.shape
        g, decay = mask_log_decay(log_decay.expand(batch, length, -1), valid), "scalar"
    out = mix(
        q, k, v, g=g, decay=decay, causal=True, scale=scale, feature_map=feature_map, normalize=normalize,
        valid=valid, feature_weights=weights, cu_seqlens=cu_seqlens,
    )
    return observe(out, q, k, v, valid=valid, causal=True, scale=scale, layer=layer, cu_seqlens=cu_seqlens,
                   teacher_qk=teacher_qk)


def retention_mixer_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay_logit: torch.Tensor,
    *feature_weights: torch.Tensor,
    state: torch.Tensor | None = None,
    scale: float | None = None,
    feature_map: str = "identity",
    normalize: bool = False,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`retention_mixer` for a few new tokens (SDPA layout) from `state`; returns (o, new state).

    inplace: `state` is updated in place and returned (the decode path passes it).
    """
    weights = split_feature_weights(feature_map, feature_weights, "retention step")
    return mix_step(q, k, v, state, g=F.logsigmoid(decay_logit.float()), decay="constant", scale=scale,
                    feature_map=feature_map, normalize=normalize, feature_weights=weights, inplace=inplace)
