"""Kind `hybrid_swa`: sliding-window softmax plus linear attention over the tokens outside the window (LoLCATs).

Query t attends by softmax to the keys in its window ((t - window, t] and the first `sinks` real
tokens) and by gated linear attention to every earlier key outside it, both in one normalisation:

    o_t = (sum_{s in window} exp(q_t.k_s * scale) v_s + w_h sum_{s outside} phi(q_t).phi(k_s) d_ts v_s)
          / (sum_{s in window} exp(q_t.k_s * scale)   + w_h sum_{s outside} phi(q_t).phi(k_s) d_ts)

where d_ts is the gated decay (gates from the keys, as in `gla`) and w_h = sigmoid(linear_logit[h]) a
new parameter per query head (`hybrid_linear_logit`, starting at the pass's `linear_weight`), so
the mixer starts close to `sliding_window` and the linear branch only adds what lies beyond the
window. The feature map must be positive. The linear branch runs on keys delayed by `window`
tokens; the softmax branch's log-sum-exp comes from the sliding-window kernel, with its exact
gradient (see `window.window_attention_lse`).
"""

from __future__ import annotations

import torch

from rewrite.mixers.common import (
    check_packed,
    featurize,
    mask_log_decay,
    ones_column,
    padding_validity,
    repeat_gate,
    sequence_positions,
    split_feature_weights,
)
from rewrite.mixers.gla import key_gate
from rewrite.mixers.transfer import observe
from rewrite.mixers.window import WindowState, window_attention_lse, window_step_lse

LSE_FLOOR = -60.0
"""Log-sum-exps below this are clamped before exp(-lse) (an all-but-empty window)."""


def _combine(o_w, lse, lin, linear_logit):
    """(o_w + w num e^-lse) / (1 + w den e^-lse) per head; o_w [B, H, L, Dv], lse [B, H, L], lin [B, H, L, Dv + 1]."""
    compute = torch.promote_types(o_w.dtype, torch.float32)
    weight = torch.sigmoid(linear_logit.to(compute))[:, None] * torch.exp(-lse.to(compute).clamp(min=LSE_FLOOR))
    num, den = lin[..., :-1].to(compute), lin[..., -1].to(compute)
    out = (o_w.to(compute) + weight[..., None] * num) / (1 + weight * den)[..., None]
    return out.to(o_w.dtype)


def _delayed(x: torch.Tensor, window: int, positions: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, L, ...] shifted `window` tokens later along L (zeros first).

    With `positions` [L] (each packed token's position in its sequence, B == 1) the shift stays inside
    each sequence: a token gets the one `window` before it when that is in its sequence, else zeros.
    """
    length = x.shape[1]
    if positions is not None:
        source = (torch.arange(length, device=x.device) - window).clamp(min=0)
        inside = (positions >= window).view(1, length, *([1] * (x.dim() - 2)))
        return torch.where(inside, x.index_select(1, source), x.new_zeros(()))
    if window >= length:
        return torch.zeros_like(x)
    pad = x.new_zeros(x.shape[0], window, *x.shape[2:])
    return torch.cat([pad, x[:, : length - window]], dim=1)


def hybrid_swa_mixer(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    linear_logit: torch.Tensor,
    *feature_weights: torch.Tensor,
    mask: torch.Tensor | None = None,
    window: int = 64,
    sinks: int = 4,
    gate: str = "vector",
    gate_normalizer: float = 16.0,
    scale: float | None = None,
    feature_map: str = "elu1",
    mask_negated: bool = False,
    check_mask: bool = True,
    layer: str = "",
    cu_seqlens: torch.Tensor | None = None,
    teacher_qk: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Window softmax plus linear attention beyond the window, one normalisation; SDPA layout, linear_logit [H].

    cu_seqlens [N + 1]: packed sequences in B == 1 (no mask); windows, sinks, the delay of the linear
    branch and its state all restart at each sequence start.
    """
    from rewrite.kernels.linear_attention import linear_attention  # loaded on first use

    weights = split_feature_weights(feature_map, feature_weights, layer)
    check_packed(q, mask, cu_seqlens, layer)
    valid = padding_validity(mask, q.shape[0], causal=True, negated=mask_negated, check=check_mask, layer=layer)
    o_w, lse = window_attention_lse(q, k, v, window=window, sinks=sinks, scale=scale, valid=valid,
                                    cu_seqlens=cu_seqlens)
    qf, kf = featurize(q, feature_map, weights[0]), featurize(k, feature_map, weights[1])
    g = key_gate(k, gate, gate_normalizer)
    vt = ones_column(v.transpose(1, 2))
    positions = None if cu_seqlens is None else sequence_positions(cu_seqlens, k.shape[2])
    if positions is not None:  # rank of each token in its sequence
        keep, rank = torch.ones(1, k.shape[2], dtype=torch.bool, device=k.device), positions[None]
    else:
        keep = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device) if valid is None else valid
        rank = keep.long().cumsum(-1) - 1
    keep = keep & (rank >= sinks)  # sinks stay in the softmax branch
    vt = vt * keep[:, :, None, None].to(vt.dtype)
    g = mask_log_decay(g, valid)
    if g.dim() == 4:
        g = repeat_gate(g, kf.shape[-1])
    lin, _ = linear_attention(
        qf.transpose(1, 2), _delayed(kf.transpose(1, 2), window, positions), _delayed(vt, window, positions),
        _delayed(g, window, positions), decay=gate, scale=1.0, cu_seqlens=cu_seqlens,
    )
    out = _combine(o_w, lse, lin.transpose(1, 2), linear_logit)
    return observe(out, q, k, v, valid=valid, causal=True, scale=scale, layer=layer, cu_seqlens=cu_seqlens,
                   teacher_qk=teacher_qk)


def hybrid_swa_mixer_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    linear_logit: torch.Tensor,
    *feature_weights: torch.Tensor,
    state: tuple[WindowState, torch.Tensor | None] | None = None,
    window: int = 64,
    sinks: int = 4,
    gate: str = "vector",
    gate_normalizer: float = 16.0,
    scale: float | None = None,
    feature_map: str = "elu1",
) -> tuple[torch.Tensor, tuple[WindowState, torch.Tensor]]:
    """`hybrid_swa_mixer` for a few new tokens (SDPA layout); returns (o, new state). Inference only.

    The state is (window ring caches and positions, linear-attention state [B, Hkv, K', Dv + 1]); a
    token leaving the ring cache enters the linear state. The ring caches are written in place.
    """
    from rewrite.kernels.linear_attention import linear_attention_step  # loaded on first use

    weights = split_feature_weights(feature_map, feature_weights, "hybrid_swa step")
    window_state, la_state = state if state is not None else (None, None)
    outs = []
    for t in range(q.shape[2]):
        qt, kt, vt = q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1]
        evicted, o_w, lse, window_state = window_step_lse(qt, kt, vt, window_state, window=window, sinks=sinks,
                                                          scale=scale)
        ek, ev, leaving = evicted  # the token moving out of the window (zeros while none does)
        g = key_gate(ek, gate, gate_normalizer)
        g = g * leaving.view(-1, *([1] * (g.dim() - 1))).to(g.dtype)
        kf = featurize(ek, feature_map, weights[1])
        if g.dim() == 4:
            g = repeat_gate(g, kf.shape[-1])
        evf = ones_column(ev) * leaving[:, None, None, None].to(ev.dtype)
        qf = featurize(qt, feature_map, weights[0])
        lin, la_state = linear_attention_step(qf.transpose(1, 2), kf.transpose(1, 2), evf.transpose(1, 2), g,
                                              decay=gate, scale=1.0, state=la_state)
        outs.append(_combine(o_w, lse, lin.transpose(1, 2), linear_logit))
    return torch.cat(outs, dim=2), (window_state, la_state)
