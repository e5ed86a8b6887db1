"""The core every linear mixer shares: layout change, feature map, padding, normalisation, kernel call.

Mixers take and return SDPA's layout (q [B, H, L, D], k / v [B, Hkv, L, D], o [B, H, L, Dv]) so they
drop in where attention was; the kernel `rewrite.kernels.linear_attention` wants [B, L, H, D].

Normalisation (for positive feature maps): o_t = (phi(q_t) S_t) / (phi(q_t) z_t + eps), where z_t is
the state's running (decayed) sum of phi(k_s). It costs no second kernel call: a column of ones is
appended to v, so the kernel's last output column is the denominator.
"""

from __future__ import annotations

import torch

from rewrite.mixers.masks import check_mask_form, key_validity

FEATURE_MAPS = {"identity": "identity", "elu1": "elu", "relu": "relu", "softmax": "softmax"}
"""Feature-map names of the pass -> names of the kernel (`elu1` is elu(x) + 1)."""

POSITIVE_FEATURE_MAPS = ("elu1", "relu", "softmax")
EPS = 1e-6


def default_scale(q: torch.Tensor, scale: float | None) -> float:
    """The site's softmax scale, or 1/sqrt(head dim) as SDPA uses when the site has none."""
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def mix(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    decay: str = "none",
    causal: bool = True,
    scale: float | None = None,
    feature_map: str = "identity",
    normalize: bool = False,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Linear attention in SDPA layout: q [B, H, L, D], k [B, Hkv, L, D], v [B, Hkv, L, Dv] -> [B, H, L, Dv].

    o_t = scale * phi(q_t) S_t with S_t = diag(exp(g_t)) S_{t-1} + phi(k_t)^T v_t (causal) or the
    sum over every token (not causal); divided by the same with v = 1 when `normalize`.
    valid [B, L] (bool) marks real tokens: padded ones neither write the state nor decay it.
    g is in the kernel's layout ([Hkv], [B, L, Hkv] or [B, L, Hkv, K]).
    """
    from rewrite.kernels.linear_attention import linear_attention  # loaded on first use, not with the pass

    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if normalize:
        vt = torch.cat([vt, vt.new_ones(*vt.shape[:-1], 1)], dim=-1)
    if valid is not None:
        vt = vt * valid[:, :, None, None].to(vt.dtype)
    o, _ = linear_attention(
        qt, kt, vt, g, decay=decay, scale=default_scale(q, scale), causal=causal,
        feature_map=FEATURE_MAPS[feature_map],
    )
    if normalize:
        o = o[..., :-1] / (o[..., -1:] + EPS)
    return o.transpose(1, 2)


def mask_log_decay(g: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Per-token log-decay g [B, L, Hkv(, K)] set to 0 (no decay) at padded tokens."""
    if valid is None:
        return g
    shape = valid.shape + (1,) * (g.dim() - 2)
    return g * valid.view(shape).to(g.dtype)


def padding_validity(
    mask: torch.Tensor | None, batch: int, *, causal: bool, negated: bool, check: bool, layer: str
) -> torch.Tensor | None:
    """[B, L] key validity from the site's mask (see `masks`), or None without a mask."""
    if mask is None:
        return None
    valid = key_validity(mask, batch, negated)
    if check:
        check_mask_form(mask, valid, causal, layer, negated)
    return valid
