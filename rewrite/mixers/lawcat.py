"""Kind `lawcat`: causal short conv on q and k, then normalised gated linear attention (LAWCAT).

New per-site parameters `q_conv` [H*D, W] and `k_conv` [Hkv*D, W]: depthwise causal convs over
the channels of q and k, initialised to the identity (last tap 1), so the mixer starts as `gla`
on the site's q and k. The gates come from the convolved keys as in `gla`; normalisation follows
the pass's `normalize` (on by default for positive feature maps).
"""

from __future__ import annotations

import torch

from rewrite.mixers.common import (
    check_packed,
    flatten_heads,
    mask_log_decay,
    mix,
    mix_step,
    padding_validity,
    split_feature_weights,
    unflatten_heads,
    zero_padding,
)
from rewrite.mixers.gla import key_gate
from rewrite.mixers.transfer import observe


def _conv(
    x: torch.Tensor, weight: torch.Tensor, cache: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal depthwise conv over the channels of x [B, heads, L, D] (within each sequence of cu_seqlens)."""
    from rewrite.kernels.short_conv import short_conv  # loaded on first use

    y, final = short_conv(flatten_heads(x), weight.to(x.dtype), cache=cache, output_final_cache=cache is not None,
                          cu_seqlens=cu_seqlens)
    return unflatten_heads(y, x.shape[1]), final


def lawcat_mixer(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_conv: torch.Tensor,
    k_conv: torch.Tensor,
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
    """q' = conv(q), k' = conv(k), then `gla` on (q', k', v); SDPA layout in and out.

    Padded tokens (from `mask`) enter the convs as zeros and neither write nor decay the state.
    cu_seqlens [N + 1]: packed sequences in B == 1 (no mask); each sequence's conv window starts with
    zeros and its state from zero.
    """
    weights = split_feature_weights(feature_map, feature_weights, layer)
    check_packed(q, mask, cu_seqlens, layer)
    valid = padding_validity(mask, q.shape[0], causal=True, negated=mask_negated, check=check_mask, layer=layer)
    qc, _ = _conv(zero_padding(q, valid), q_conv, cu_seqlens=cu_seqlens)
    kc, _ = _conv(zero_padding(k, valid), k_conv, cu_seqlens=cu_seqlens)
    g = mask_log_decay(key_gate(kc, gate, gate_normalizer), valid)
    out = mix(qc, kc, v, g=g, decay=gate, causal=True, scale=scale, feature_map=feature_map, normalize=normalize,
              valid=valid, feature_weights=weights, cu_seqlens=cu_seqlens)
    return observe(out, q, k, v, valid=valid, causal=True, scale=scale, layer=layer, cu_seqlens=cu_seqlens,
                   teacher_qk=teacher_qk)


def lawcat_mixer_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_conv: torch.Tensor,
    k_conv: torch.Tensor,
    *feature_weights: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    gate: str = "vector",
    gate_normalizer: float = 16.0,
    scale: float | None = None,
    feature_map: str = "identity",
    normalize: bool = False,
    inplace: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`lawcat_mixer` for a few new tokens (SDPA layout) from `state`; returns (o, new state).

    The state is (q conv cache [B, W-1, H*D], k conv cache [B, W-1, Hkv*D], linear-attention state
    [B, Hkv, K, Dv (+1)] float32); None starts a sequence. inplace: the linear-attention state is updated
    in place (the conv caches are new tensors). Inference only.
    """
    weights = split_feature_weights(feature_map, feature_weights, "lawcat step")
    if state is None:
        state = (
            q.new_zeros(q.shape[0], q_conv.shape[1] - 1, q_conv.shape[0]),
            k.new_zeros(k.shape[0], k_conv.shape[1] - 1, k_conv.shape[0]),
            None,
        )
    q_cache, k_cache, la_state = state
    qc, q_cache = _conv(q, q_conv, q_cache)
    kc, k_cache = _conv(k, k_conv, k_cache)
    o, la_state = mix_step(qc, kc, v, la_state, g=key_gate(kc, gate, gate_normalizer), decay=gate, scale=scale,
                           feature_map=feature_map, normalize=normalize, feature_weights=weights,
                           inplace=inplace and la_state is not None)
    return o, (q_cache, k_cache, la_state)
