"""Recurrent decode step in Triton: a few tokens per sequence, state in and out, every decay kind."""

import torch
import triton
import triton.language as tl

from ..alloc import new_empty
from .triton_common import block, check_head_dims, token_log_decay
from .triton_forward import DECAY_MODE

STEP_PROGRAMS = 128
"""The step kernel narrows its V tiles (down to 8 columns) until batch x kv heads x V tiles reaches
this many programs: a decode step of a small batch is latency-bound, so more, smaller programs finish
sooner (at batch 1 with 8 kv heads and V = 64, 8-column tiles give 64 programs instead of 16)."""


@triton.jit
def _recurrent_step_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    state_ptr,
    o_ptr,
    new_state_ptr,
    steps,
    heads,
    kv_heads,
    dk,
    dv,
    scale,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BG: tl.constexpr,
    MODE: tl.constexpr,
):
    i_bh, i_v = tl.program_id(0), tl.program_id(1)
    batch, hk = i_bh // kv_heads, i_bh % kv_heads
    group = heads // kv_heads
    kcols = tl.arange(0, BK)
    vcols = i_v * BV + tl.arange(0, BV)
    qrows = tl.arange(0, BG)  # the query heads reading this kv head, all at once
    kmask, vmask, qmask = kcols < dk, vcols < dv, qrows < group
    state_offs = i_bh.to(tl.int64) * dk * dv + kcols[:, None] * dv + vcols[None, :]
    state_mask = kmask[:, None] & vmask[None, :]
    state = tl.load(state_ptr + state_offs, mask=state_mask, other=0.0).to(tl.float32)
    for t in range(0, steps):
        token = (batch * steps + t).to(tl.int64)
        k = tl.load(k_ptr + (token * kv_heads + hk) * dk + kcols, mask=kmask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + (token * kv_heads + hk) * dv + vcols, mask=vmask, other=0.0).to(tl.float32)
        q_rows = token * heads + hk * group + qrows
        q = tl.load(q_ptr + q_rows[:, None] * dk + kcols[None, :], mask=qmask[:, None] & kmask[None, :], other=0.0)
        if MODE == 1:
            state = state * tl.exp(tl.load(g_ptr + token * kv_heads + hk).to(tl.float32))
        if MODE == 2:
            g = tl.load(g_ptr + (token * kv_heads + hk) * dk + kcols, mask=kmask, other=0.0).to(tl.float32)
            state = state * tl.exp(g)[:, None]
        state += k[:, None] * v[None, :]
        o = scale * tl.sum(q.to(tl.float32)[:, :, None] * state[None, :, :], axis=1)
        tl.store(o_ptr + q_rows[:, None] * dv + vcols[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=qmask[:, None] & vmask[None, :])
    tl.store(new_state_ptr + state_offs, state, mask=state_mask)


def step_tile(programs: int, dv: int) -> int:
    """V columns per program of the step kernel for `programs` (batch x kv heads) rows (see STEP_PROGRAMS)."""
    bv = block(dv, 32)
    while bv > 8 and programs * triton.cdiv(dv, bv) < STEP_PROGRAMS:
        bv //= 2
    return bv


def recurrent_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    decay: str,
    scale: float,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, t, H, V], new state [B, Hkv, K, V] float32) after t tokens of the recurrence."""
    batch, steps, heads, dk = q.shape
    kv_heads, dv = k.shape[2], v.shape[-1]
    check_head_dims(dk, dv)
    q, k, v, state = q.contiguous(), k.contiguous(), v.contiguous(), state.contiguous()
    log_decay = q if decay == "none" else token_log_decay(g, decay, batch, steps, kv_heads)
    o = new_empty(q.shape[:-1] + (dv,), dtype=q.dtype, device=q.device)
    new_state = new_empty(state.shape, dtype=torch.float32, device=q.device)
    bv = step_tile(batch * kv_heads, dv)
    _recurrent_step_kernel[(batch * kv_heads, triton.cdiv(dv, bv))](
        q,
        k,
        v,
        log_decay,
        state,
        o,
        new_state,
        steps,
        heads,
        kv_heads,
        dk,
        dv,
        scale,
        BK=block(dk, 256),
        BV=bv,
        BG=triton.next_power_of_2(heads // kv_heads),
        MODE=DECAY_MODE[decay],
    )
    return o, new_state
