"""Kind `mamba2`: a Mamba-2 state-space mixer initialised from the attention weights (Mamba-in-the-Llama).

The attention's values are the SSM input x, its keys B and its queries C (the o projection stays
the output projection). New per-site parameters, as Mamba-2 has them:

- `conv_weight` [C, W]: a causal depthwise conv over the channels of x, B and C (C = Hkv*Dv + Hkv*D
  + H*D), initialised to the identity (last tap 1) so the mixer starts as attention-shaped;
- `dt_weight` [Hkv, Dv], `dt_bias` [Hkv]: the step dt_t = softplus(x_t . dt_weight[h] + dt_bias[h]),
  with dt_weight = 0 and dt_bias = softplus^-1 of steps spread log-uniformly in [dt_min, dt_max];
- `a_log` [Hkv]: A = -exp(a_log) with A spread in [a_min, a_max] (Mamba-2's range);
- `skip` [H]: the skip D x_t, starting at 0.

h_t = exp(dt_t A) h_{t-1} + dt_t B_t^T x_t and y_t = scale * C_t h_t + D x_t per head; q heads read
kv head h // (H / Hkv) as in GQA. It runs on the linear-attention kernel with a per-token scalar
decay (k scaled by dt) and the short-conv kernel. No feature map, no normaliser.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rewrite.mixers.common import (
    check_packed,
    default_scale,
    flatten_heads,
    padding_validity,
    zero_padding,
)
from rewrite.mixers.transfer import observe


def init_dt_bias(kv_heads: int, dt_min: float, dt_max: float) -> torch.Tensor:
    """[kv_heads] biases whose softplus spreads log-uniformly from dt_min to dt_max."""
    dt = torch.exp(torch.linspace(math.log(dt_min), math.log(dt_max), kv_heads, dtype=torch.float64))
    return (dt + torch.log(-torch.expm1(-dt))).float()  # softplus^-1(dt)


def init_a_log(kv_heads: int, a_min: float, a_max: float) -> torch.Tensor:
    """[kv_heads] log of A's magnitude spread linearly from a_min to a_max."""
    return torch.log(torch.linspace(a_min, a_max, kv_heads, dtype=torch.float64)).float()


def init_identity_conv(channels: int, width: int) -> torch.Tensor:
    """[channels, width] causal conv taps that pass each channel through unchanged."""
    w = torch.zeros(channels, width)
    w[:, -1] = 1.0
    return w


def _ssm(
    xbc: torch.Tensor,
    kv_heads: int,
    heads: int,
    key_dim: int,
    dt_weight: torch.Tensor,
    dt_bias: torch.Tensor,
    a_log: torch.Tensor,
    valid: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """From the conv output [B, L, C]: x [B, L, Hkv, P], B scaled by dt [B, L, Hkv, N], C [B, L, H, N], g [B, L, Hkv]."""
    value_dim = (xbc.shape[-1] - (kv_heads + heads) * key_dim) // kv_heads
    x, b, c = xbc.split([kv_heads * value_dim, kv_heads * key_dim, heads * key_dim], dim=-1)
    x, b, c = x.unflatten(-1, (kv_heads, -1)), b.unflatten(-1, (kv_heads, -1)), c.unflatten(-1, (heads, -1))
    dt = F.softplus(torch.einsum("blhd,hd->blh", x.float(), dt_weight.float()) + dt_bias.float())
    if valid is not None:
        dt = dt * valid[:, :, None].to(dt.dtype)
    g = -torch.exp(a_log.float()) * dt
    return x, (b.float() * dt[..., None]).to(b.dtype), c, g


def _channels(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.cat([flatten_heads(v), flatten_heads(k), flatten_heads(q)], dim=-1)


def _skip(o: torch.Tensor, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    groups = o.shape[2] // x.shape[2]
    return o + x.repeat_interleave(groups, dim=2) * skip.to(o.dtype)[:, None]


def mamba2_mixer(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    conv_weight: torch.Tensor,
    dt_weight: torch.Tensor,
    dt_bias: torch.Tensor,
    a_log: torch.Tensor,
    skip: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    mask_negated: bool = False,
    check_mask: bool = True,
    layer: str = "",
    cu_seqlens: torch.Tensor | None = None,
    teacher_qk: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mamba-2 SSM in SDPA layout: q (C) [B, H, L, D], k (B) / v (x) [B, Hkv, L, D] -> o [B, H, L, D].

    Padded tokens (from `mask`) enter the conv as zeros and neither write nor decay the state.
    cu_seqlens [N + 1]: packed sequences in B == 1 (no mask); each sequence's conv window starts with
    zeros and its SSM state from zero.
    """
    from rewrite.kernels.linear_attention import linear_attention  # loaded on first use
    from rewrite.kernels.short_conv import short_conv

    check_packed(q, mask, cu_seqlens, layer)
    valid = padding_validity(mask, q.shape[0], causal=True, negated=mask_negated, check=check_mask, layer=layer)
    heads, kv_heads = q.shape[1], k.shape[1]
    xbc = _channels(zero_padding(q, valid), zero_padding(k, valid), zero_padding(v, valid))
    xbc, _ = short_conv(xbc, conv_weight.to(xbc.dtype), cu_seqlens=cu_seqlens)
    x, b, c, g = _ssm(xbc, kv_heads, heads, k.shape[-1], dt_weight, dt_bias, a_log, valid)
    o, _ = linear_attention(c, b, x, g, decay="scalar", scale=default_scale(q, scale), cu_seqlens=cu_seqlens)
    o = _skip(o, x, skip).transpose(1, 2)
    return observe(o, q, k, v, valid=valid, causal=True, scale=scale, layer=layer, cu_seqlens=cu_seqlens,
                   teacher_qk=teacher_qk)


def mamba2_mixer_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    conv_weight: torch.Tensor,
    dt_weight: torch.Tensor,
    dt_bias: torch.Tensor,
    a_log: torch.Tensor,
    skip: torch.Tensor,
    *,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """`mamba2_mixer` for a few new tokens (SDPA layout) from `state`; returns (o, new state).

    The state is (conv cache [B, W-1, C] in q's dtype, SSM state [B, Hkv, D, D] float32); None
    starts a sequence. Inference only.
    """
    from rewrite.kernels.linear_attention import linear_attention_step  # loaded on first use
    from rewrite.kernels.short_conv import short_conv

    conv_cache, ssm_state = state if state is not None else (None, None)
    heads, kv_heads = q.shape[1], k.shape[1]
    xbc = _channels(q, k, v)
    if conv_cache is None:
        conv_cache = xbc.new_zeros(xbc.shape[0], conv_weight.shape[1] - 1, xbc.shape[-1])
    xbc, conv_cache = short_conv(xbc, conv_weight.to(xbc.dtype), cache=conv_cache, output_final_cache=True)
    x, b, c, g = _ssm(xbc, kv_heads, heads, k.shape[-1], dt_weight, dt_bias, a_log, None)
    o, ssm_state = linear_attention_step(c, b, x, g, decay="scalar", scale=default_scale(q, scale), state=ssm_state)
    return _skip(o, x, skip).transpose(1, 2), (conv_cache, ssm_state)
