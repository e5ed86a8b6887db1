"""Delta-rule decode in Triton: the token recurrence over a few new tokens, state kept in registers.

One program per (V tile, batch row x kv head); see `naive.py` for the recurrence. The state
tile [K, BV] is read once, updated token by token and written back once.
"""

import torch
import triton
import triton.language as tl

from rewrite.kernels.launch_math import cdiv, next_power_of_2

from ..alloc import new_empty


@triton.jit
def _step_kernel(
    q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, h_ptr, o_ptr, ht_ptr,
    steps, heads, kv_heads, dk, dv, scale,
    BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    b, hk = i_bh // kv_heads, i_bh % kv_heads
    group = heads // kv_heads
    kcols = tl.arange(0, BK)
    vcols = i_v * BV + tl.arange(0, BV)
    k_mask, v_mask = kcols < dk, vcols < dv
    state_offs = i_bh.to(tl.int64) * dk * dv + kcols[:, None] * dv + vcols[None, :]
    state_mask = k_mask[:, None] & v_mask[None, :]
    state = tl.load(h_ptr + state_offs, mask=state_mask, other=0.0).to(tl.float32)
    for t in range(0, steps):
        token = (b * steps + t).to(tl.int64)
        gate = token * kv_heads + hk
        if HAS_G:
            state = state * tl.exp(tl.load(g_ptr + gate).to(tl.float32))
        k = tl.load(k_ptr + gate * dk + kcols, mask=k_mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + gate * dv + vcols, mask=v_mask, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + gate).to(tl.float32)
        error = v - tl.sum(k[:, None] * state, axis=0)
        state += k[:, None] * (beta * error)[None, :]
        for j in range(0, group):
            head = token * heads + hk * group + j
            q = tl.load(q_ptr + head * dk + kcols, mask=k_mask, other=0.0).to(tl.float32)
            o = scale * tl.sum(q[:, None] * state, axis=0)
            tl.store(o_ptr + head * dv + vcols, o.to(o_ptr.dtype.element_ty), mask=v_mask)
    tl.store(ht_ptr + state_offs, state, mask=state_mask)


def recurrent_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, t, H, V] in q's dtype, new state [B, Hkv, K, V] in state's dtype, float32 or wider)."""
    if q.dtype == torch.float64:
        raise ValueError("delta_rule: the Triton kernels take float32/float16/bfloat16, got float64")
    q, k, v, beta, state = (x.contiguous() for x in (q, k, v, beta, state))
    g = None if g is None else g.contiguous()
    batch, steps, heads, dk = q.shape
    kv_heads, dv = k.shape[2], v.shape[-1]
    if dk > 256:
        raise ValueError(f"delta_rule: the Triton kernels support head dims up to 256, got K={dk}")
    bk = max(16, next_power_of_2(dk))
    bv = max(16, min(32, next_power_of_2(dv)))
    o = new_empty((batch, steps, heads, dv), dtype=q.dtype, device=q.device)
    new_state = new_empty(state.shape, dtype=state.dtype, device=q.device)
    _step_kernel[(cdiv(dv, bv), batch * kv_heads)](
        q, k, v, beta, g if g is not None else beta, state, o, new_state,
        steps, heads, kv_heads, dk, dv, scale, BK=bk, BV=bv, HAS_G=g is not None,
    )
    return o, new_state
