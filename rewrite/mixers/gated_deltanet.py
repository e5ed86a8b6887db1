"""Kind `gated_deltanet`: the gated delta rule on the pretrained q / k / v (Gated DeltaNet).

Per kv head, S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T and o_t = scale * q_t S_t,
with q and k feature-mapped then L2-normalised over the head dim. The write strength beta_t and the
log-decay g_t come from the keys the site sees through new per-kv-head parameters:

    beta_t = sigmoid(k_t . beta_weight[h] + beta_bias[h])
    g_t    = logsigmoid(k_t . gate_weight[h] + gate_bias[h])

The weights start at 0, so at initialisation beta and the decay are constants per kv head
(`beta_bias` from the pass's `beta_init`, `gate_bias` spread like retention's decays).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rewrite.mixers.common import (
    check_packed,
    default_scale,
    featurize,
    padding_validity,
    split_feature_weights,
)
from rewrite.mixers.transfer import observe


def _l2(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1, eps=1e-6).to(x.dtype)


def delta_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    beta_weight: torch.Tensor,
    beta_bias: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor,
    feature_map: str,
    feature_weights: tuple[torch.Tensor | None, torch.Tensor | None],
    valid: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k) in the kernel's layout [B, L, heads, K], beta and g [B, L, Hkv] (0 at padded tokens)."""
    kf = k.float()
    beta = torch.sigmoid(torch.einsum("bhld,hd->blh", kf, beta_weight.float()) + beta_bias.float())
    g = F.logsigmoid(torch.einsum("bhld,hd->blh", kf, gate_weight.float()) + gate_bias.float())
    if valid is not None:
        keep = valid[:, :, None].to(beta.dtype)
        beta, g = beta * keep, g * keep
    qf = _l2(featurize(q, feature_map, feature_weights[0])).transpose(1, 2)
    kf2 = _l2(featurize(k, feature_map, feature_weights[1])).transpose(1, 2)
    return qf, kf2, beta, g


def gated_deltanet_mixer(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta_weight: torch.Tensor,
    beta_bias: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor,
    *feature_weights: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    feature_map: str = "identity",
    mask_negated: bool = False,
    check_mask: bool = True,
    layer: str = "",
    cu_seqlens: torch.Tensor | None = None,
    teacher_qk: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Gated delta rule in SDPA layout: q [B, H, L, D], k / v [B, Hkv, L, D] -> o [B, H, L, Dv].

    beta_weight / gate_weight [Hkv, D], beta_bias / gate_bias [Hkv]; padded tokens (from `mask`)
    neither write nor decay the state. cu_seqlens [N + 1]: packed sequences in B == 1 (no mask), the
    state reset at each sequence start.
    """
    from rewrite.kernels.delta_rule import delta_rule  # loaded on first use

    weights = split_feature_weights(feature_map, feature_weights, layer)
    check_packed(q, mask, cu_seqlens, layer)
    valid = padding_validity(mask, q.shape[0], causal=True, negated=mask_negated, check=check_mask, layer=layer)
    qk, kk, beta, g = delta_inputs(q, k, beta_weight, beta_bias, gate_weight, gate_bias, feature_map, weights, valid)
    o, _ = delta_rule(qk, kk, v.transpose(1, 2), beta, g, scale=default_scale(q, scale), cu_seqlens=cu_seqlens)
    return observe(o.transpose(1, 2), q, k, v, valid=valid, causal=True, scale=scale, layer=layer,
                   cu_seqlens=cu_seqlens, teacher_qk=teacher_qk)


def gated_deltanet_mixer_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta_weight: torch.Tensor,
    beta_bias: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor,
    *feature_weights: torch.Tensor,
    state: torch.Tensor | None = None,
    scale: float | None = None,
    feature_map: str = "identity",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`gated_deltanet_mixer` for a few new tokens (SDPA layout) from `state` [B, Hkv, K, Dv] float32.

    Returns (o [B, H, t, Dv], new state); None starts a sequence. Inference only.
    """
    from rewrite.kernels.delta_rule import delta_rule_step  # loaded on first use

    weights = split_feature_weights(feature_map, feature_weights, "gated_deltanet step")
    qk, kk, beta, g = delta_inputs(q, k, beta_weight, beta_bias, gate_weight, gate_bias, feature_map, weights, None)
    o, state = delta_rule_step(qk, kk, v.transpose(1, 2), beta, g, scale=default_scale(q, scale), state=state)
    return o.transpose(1, 2), state
