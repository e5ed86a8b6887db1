"""Kind `sliding_window`: causal softmax attention over the last `window` tokens plus `sinks` first ones.

The training-free baseline of linearization (constant memory per token, no new parameters), and
the softmax branch of `hybrid_swa`. Without a padding mask it runs the sliding-window kernel
(linear in L); with one it runs a dense masked softmax (quadratic in L, exact): the kernel counts
positions from each row's start, which a left-padded row does not share. With padding, the sinks
are the first real tokens of each row. Packed sequences (`cu_seqlens`, no padding) run the kernel,
which counts positions and sinks from each sequence's start.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rewrite.mixers.common import check_packed, default_scale, padding_validity, repeat_kv
from rewrite.mixers.transfer import observe

WindowState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(k ring cache [B, sinks + window, Hkv, D], v ring cache [B, sinks + window, Hkv, Dv], positions [B])."""


def empty_window_state(k: torch.Tensor, v: torch.Tensor, window: int, sinks: int) -> WindowState:
    """The state before any token: zero ring caches of `sinks + window` slots for k / v [B, Hkv, t, D], positions 0."""
    batch, kv_heads, slots = k.shape[0], k.shape[1], sinks + window
    return (
        k.new_zeros(batch, slots, kv_heads, k.shape[-1]),
        v.new_zeros(batch, slots, kv_heads, v.shape[-1]),
        torch.zeros(batch, dtype=torch.long, device=k.device),
    )


def window_keep(valid: torch.Tensor, window: int, sinks: int) -> torch.Tensor:
    """[B, 1, L, L] bool: query i sees real key j <= i within the window or among the first `sinks` real keys."""
    length = valid.shape[-1]
    i = torch.arange(length, device=valid.device)
    causal = i[None, :] <= i[:, None]
    near = (i[:, None] - i[None, :]) < window
    rank = valid.long().cumsum(-1) - 1  # index of each key among its row's real tokens
    sink = (rank < sinks)[:, None, :]
    keep = valid[:, None, :] & causal & (near | sink)
    return (keep | torch.eye(length, dtype=torch.bool, device=valid.device))[:, None]


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    sinks: int,
    scale: float | None,
    valid: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sliding-window softmax with sinks in SDPA layout (q [B, H, L, D], k / v [B, Hkv, L, D]).

    valid [B, L] marks real tokens (a dense masked softmax then); cu_seqlens [N + 1] packs sequences
    into B == 1 (the kernel, windows and sinks within each sequence); not both.
    """
    scale = default_scale(q, scale)
    if valid is None:
        from rewrite.kernels.sliding_window import sliding_window_attention  # loaded on first use

        o = sliding_window_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window,
                                     sinks=sinks, scale=scale, cu_seqlens=cu_seqlens)
        return o.transpose(1, 2)
    k, v = repeat_kv(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=window_keep(valid, window, sinks), scale=scale)


def window_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: WindowState | None,
    *,
    window: int,
    sinks: int,
    scale: float | None,
) -> tuple[torch.Tensor, WindowState]:
    """Window attention for t new tokens (SDPA layout) from ring caches; returns (o [B, H, t, Dv], state).

    The caches are written in place (and returned); None starts a sequence. Inference only.
    """
    from rewrite.kernels.sliding_window import sliding_window_attention_step  # loaded on first use

    k_cache, v_cache, positions = state if state is not None else empty_window_state(k, v, window, sinks)
    outs = []
    for t in range(q.shape[2]):
        o = sliding_window_attention_step(
            q[:, :, t : t + 1].transpose(1, 2), k[:, :, t : t + 1].transpose(1, 2), v[:, :, t : t + 1].transpose(1, 2),
            k_cache, v_cache, positions, window, sinks=sinks, scale=default_scale(q, scale),
        )
        outs.append(o.transpose(1, 2))
        positions = positions + 1
    return torch.cat(outs, dim=2), (k_cache, v_cache, positions)


def sliding_window_mixer(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    window: int = 64,
    sinks: int = 4,
    scale: float | None = None,
    mask_negated: bool = False,
    check_mask: bool = True,
    layer: str = "",
    cu_seqlens: torch.Tensor | None = None,
    teacher_qk: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Query t attends (softmax) to keys (t - window, t] and the first `sinks` keys; SDPA layout.

    cu_seqlens [N + 1]: packed sequences in B == 1 (no mask); t and the sinks count from each sequence's start.
    """
    check_packed(q, mask, cu_seqlens, layer)
    valid = padding_validity(mask, q.shape[0], causal=True, negated=mask_negated, check=check_mask, layer=layer)
    out = window_attention(q, k, v, window=window, sinks=sinks, scale=scale, valid=valid, cu_seqlens=cu_seqlens)
    return observe(out, q, k, v, valid=valid, causal=True, scale=scale, layer=layer, cu_seqlens=cu_seqlens,
                   teacher_qk=teacher_qk)


def sliding_window_mixer_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    state: WindowState | None = None,
    window: int = 64,
    sinks: int = 4,
    scale: float | None = None,
) -> tuple[torch.Tensor, WindowState]:
    """`sliding_window_mixer` for a few new tokens (SDPA layout) from ring caches; returns (o, new state)."""
    return window_step(q, k, v, state, window=window, sinks=sinks, scale=scale)


class _WindowLogSumExp(torch.autograd.Function):
    """lse_t = log sum_{s in window(t)} exp(scale q_t.k_s) from the kernel, with its exact gradient.

    d lse_t / d q_t = scale * sum_s p_ts k_s (window attention with k as values) and
    d L / d k_s = sum_t p_ts (scale g_t q_t) (that attention's value gradient), both kernel calls.
    """

    @staticmethod
    def forward(ctx, q, k, window, sinks, scale, cu_seqlens):  # q [B, T, H, K], k [B, T, Hkv, K]
        from rewrite.kernels.sliding_window.op import sliding_window_op

        o_k, lse = sliding_window_op(q, k, k, window, sinks, scale, cu_seqlens)
        ctx.save_for_backward(q, k, o_k, lse)
        ctx.window, ctx.sinks, ctx.scale, ctx.cu_seqlens = window, sinks, scale, cu_seqlens
        return lse

    @staticmethod
    def backward(ctx, grad):
        from rewrite.kernels.sliding_window.op import sliding_window_backward_op

        q, k, o_k, lse = ctx.saved_tensors
        compute = torch.promote_types(q.dtype, torch.float32)
        g = grad.to(compute)[..., None] * ctx.scale
        dq = (g * o_k.to(compute)).to(q.dtype)
        do = (g * q.to(compute)).to(q.dtype).contiguous()
        _, _, dk = sliding_window_backward_op(do, q, k, k, o_k, lse, ctx.window, ctx.sinks, ctx.scale,
                                              ctx.cu_seqlens)
        return dq, dk, None, None, None, None


def window_attention_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    sinks: int,
    scale: float | None,
    valid: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, H, L, Dv], lse [B, H, L]) of window softmax with sinks in SDPA layout; both differentiable.

    valid [B, L] marks real tokens (dense masked softmax); cu_seqlens [N + 1] packs sequences into
    B == 1 (the kernel, within each sequence); not both.
    """
    scale = default_scale(q, scale)
    if valid is None:
        from rewrite.kernels.sliding_window.op import sliding_window_op  # loaded on first use

        qt, kt, vt = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        o, lse = sliding_window_op(qt, kt, vt, window, sinks, scale, cu_seqlens)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            lse = _WindowLogSumExp.apply(qt, kt, window, sinks, scale, cu_seqlens)
        return o.transpose(1, 2), lse.transpose(1, 2)
    k, v = repeat_kv(q, k, v)
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(compute) @ k.to(compute).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~window_keep(valid, window, sinks), float("-inf"))
    lse = scores.logsumexp(-1)
    o = (torch.exp(scores - lse[..., None]) @ v.to(compute)).to(q.dtype)
    return o, lse


def window_step_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: WindowState | None,
    *,
    window: int,
    sinks: int,
    scale: float | None,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor, WindowState]:
    """One token (SDPA layout, t = 1) of window softmax from ring caches, with what leaves the window.

    Returns ((k, v) of the token the new one evicts from the ring [B, Hkv, 1, D] and whether one
    does [B]), o [B, H, 1, Dv], lse [B, H, 1], and the state (caches written in place).
    """
    from rewrite.kernels.sliding_window.api import ring_slots  # loaded on first use

    batch, kv_heads = k.shape[0], k.shape[1]
    slots = sinks + window
    k_cache, v_cache, positions = state if state is not None else empty_window_state(k, v, window, sinks)
    rows = torch.arange(batch, device=q.device)
    slot = ring_slots(positions, window, sinks)
    leaving = positions >= slots
    evicted = (k_cache[rows, slot][:, :, None].clone(), v_cache[rows, slot][:, :, None].clone(), leaving)
    k_cache[rows, slot] = k[:, :, 0]
    v_cache[rows, slot] = v[:, :, 0]
    groups = q.shape[1] // kv_heads
    compute = torch.promote_types(q.dtype, torch.float32)
    keys = k_cache.transpose(1, 2).repeat_interleave(groups, 1).to(compute)  # [B, H, S, D]
    values = v_cache.transpose(1, 2).repeat_interleave(groups, 1).to(compute)
    scores = (q.to(compute) @ keys.transpose(-1, -2)) * default_scale(q, scale)  # [B, H, 1, S]
    filled = torch.arange(slots, device=q.device)[None, :] <= positions[:, None]
    scores = scores.masked_fill(~filled[:, None, None, :], float("-inf"))
    lse = scores.logsumexp(-1)
    o = (torch.exp(scores - lse[..., None]) @ values).to(q.dtype)
    return evicted, o, lse, (k_cache, v_cache, positions + 1)
