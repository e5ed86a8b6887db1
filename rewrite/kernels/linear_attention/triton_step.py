"""Recurrent decode step in Triton: a few tokens per sequence, state in and out, every decay kind.

The same kernel writes a new state (`recurrent_step`) or updates the given one in place
(`recurrent_step_`): every program reads and writes only its own [K, V-tile] block of the state, so
in place is safe. With normalisation the state holds one more column, the running (decayed) sum z
of the keys, and o = (scale * q S) / (scale * q z + eps) is divided in the kernel (v carries no
column of ones and o has V columns). z is needed by every V tile of a kv head, so a program may
not overwrite it while others still read it: the functional kernel keeps z itself (it reads the
old state and writes a separate new one), while the in-place kernel takes z after each token
from the caller (`normalizer`, computed by elementwise ops that torch.compile fuses into the
producer of k) and one program per kv head stores the last one.
"""

import torch
import triton
import triton.language as tl

from rewrite.kernels.launch_math import cdiv, next_power_of_2

from ..alloc import new_empty
from .triton_common import block, check_head_dims, token_log_decay
from .triton_forward import DECAY_MODE

STEP_PROGRAMS = 128
"""The step kernel narrows its V tiles (down to 8 columns) until batch x kv heads x V tiles reaches
this many programs: a decode step of a small batch is latency-bound, so more, smaller programs finish
sooner (at batch 1 with 8 kv heads and V = 64, 8-column tiles give 64 programs instead of 16)."""

NORM_NONE, NORM_KEPT, NORM_GIVEN = 0, 1, 2
"""Normalisation modes of the step kernel: none; z kept by the kernel (read from the state's last
column, updated per token, stored by the programs of the first V tile into the new state); z after
each token given as an input (the programs of the first V tile store the last one in the state)."""


@triton.jit
def _recurrent_step_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    z_ptr,
    state_ptr,
    o_ptr,
    new_state_ptr,
    steps,
    heads,
    kv_heads,
    dk,
    dv,
    ds,
    scale,
    eps,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BG: tl.constexpr,
    MODE: tl.constexpr,
    NORM: tl.constexpr,
):
    i_bh, i_v = tl.program_id(0), tl.program_id(1)
    batch, hk = i_bh // kv_heads, i_bh % kv_heads
    group = heads // kv_heads
    kcols = tl.arange(0, BK)
    vcols = i_v * BV + tl.arange(0, BV)
    qrows = tl.arange(0, BG)  # the query heads reading this kv head, all at once
    kmask, vmask, qmask = kcols < dk, vcols < dv, qrows < group
    rows = i_bh.to(tl.int64) * dk * ds + kcols * ds  # state rows hold ds = dv (+ 1: z) columns
    state_offs = rows[:, None] + vcols[None, :]
    state_mask = kmask[:, None] & vmask[None, :]
    state = tl.load(state_ptr + state_offs, mask=state_mask, other=0.0).to(tl.float32)
    z = tl.zeros([BK], dtype=tl.float32)
    if NORM == 1:
        z = tl.load(state_ptr + rows + dv, mask=kmask, other=0.0).to(tl.float32)
    for t in range(0, steps):
        token = (batch * steps + t).to(tl.int64)
        k = tl.load(k_ptr + (token * kv_heads + hk) * dk + kcols, mask=kmask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + (token * kv_heads + hk) * dv + vcols, mask=vmask, other=0.0).to(tl.float32)
        q_rows = token * heads + hk * group + qrows
        q = tl.load(q_ptr + q_rows[:, None] * dk + kcols[None, :], mask=qmask[:, None] & kmask[None, :], other=0.0)
        if MODE == 1:
            decay = tl.exp(tl.load(g_ptr + token * kv_heads + hk).to(tl.float32))
            state = state * decay
            if NORM == 1:
                z = z * decay
        if MODE == 2:
            g = tl.load(g_ptr + (token * kv_heads + hk) * dk + kcols, mask=kmask, other=0.0).to(tl.float32)
            decays = tl.exp(g)
            state = state * decays[:, None]
            if NORM == 1:
                z = z * decays
        state += k[:, None] * v[None, :]
        qf = q.to(tl.float32)
        o = scale * tl.sum(qf[:, :, None] * state[None, :, :], axis=1)
        if NORM == 1:
            z += k
        if NORM == 2:
            z = tl.load(z_ptr + (token * kv_heads + hk) * dk + kcols, mask=kmask, other=0.0).to(tl.float32)
        if NORM != 0:
            o = o / (scale * tl.sum(qf * z[None, :], axis=1) + eps)[:, None]
        tl.store(o_ptr + q_rows[:, None] * dv + vcols[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=qmask[:, None] & vmask[None, :])
    tl.store(new_state_ptr + state_offs, state, mask=state_mask)
    if NORM != 0:
        if i_v == 0:
            tl.store(new_state_ptr + rows + dv, z, mask=kmask)


def step_tile(programs: int, dv: int) -> int:
    """V columns per program of the step kernel for `programs` (batch x kv heads) rows (see STEP_PROGRAMS)."""
    bv = block(dv, 32)
    while bv > 8 and programs * cdiv(dv, bv) < STEP_PROGRAMS:
        bv //= 2
    return bv


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    decay: str,
    scale: float,
    state: torch.Tensor,
    new_state: torch.Tensor,
    norm: int,
    normalizer: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """Run the step kernel from `state` into `new_state` (the same tensor for in place); returns o."""
    batch, steps, heads, dk = q.shape
    kv_heads, dv = k.shape[2], v.shape[-1]
    check_head_dims(dk, dv)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    log_decay = q if decay == "none" else token_log_decay(g, decay, batch, steps, kv_heads)
    z = q if normalizer is None else normalizer.contiguous()
    o = new_empty(q.shape[:-1] + (dv,), dtype=q.dtype, device=q.device)
    bv = step_tile(batch * kv_heads, dv)
    _recurrent_step_kernel[(batch * kv_heads, cdiv(dv, bv))](
        q,
        k,
        v,
        log_decay,
        z,
        state,
        o,
        new_state,
        steps,
        heads,
        kv_heads,
        dk,
        dv,
        state.shape[-1],
        scale,
        eps,
        BK=block(dk, 256),
        BV=bv,
        BG=next_power_of_2(heads // kv_heads),
        MODE=DECAY_MODE[decay],
        NORM=norm,
    )
    return o


def recurrent_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    decay: str,
    scale: float,
    state: torch.Tensor,
    normalize: bool = False,
    eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, t, H, V], new state [B, Hkv, K, V (+ 1)] float32) after t tokens of the recurrence.

    With `normalize` the state has one more column (the running sum z of k) and o is divided by
    scale * q z + eps in the kernel.
    """
    state = state.contiguous()
    new_state = new_empty(state.shape, dtype=torch.float32, device=q.device)
    norm = NORM_KEPT if normalize else NORM_NONE
    o = _launch(q, k, v, g, decay, scale, state, new_state, norm, None, eps)
    return o, new_state


def recurrent_step_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    decay: str,
    scale: float,
    state: torch.Tensor,
    normalizer: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """o [B, t, H, V] after t tokens, the state (contiguous float32) updated in place.

    `normalizer` [B, t, Hkv, K] (None: no normalisation) holds z after each token; the state's
    last column then receives the last z, and o is divided by scale * q z + eps.
    """
    if not state.is_contiguous() or state.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"recurrent_step_: the state must be contiguous float32 / float64, got {state.dtype} "
                         f"with strides {tuple(state.stride())}")
    norm = NORM_NONE if normalizer is None else NORM_GIVEN
    return _launch(q, k, v, g, decay, scale, state, state, norm, normalizer, eps)
