"""Attention transfer: while recording, every mixer also computes the softmax attention it replaces.

Inside `record_transfer()`, each mixer call (in eager mode) computes the softmax attention of its
own q, k, v (the teacher, with the site's scale, causality and key padding; with the site's rotated q
and k, `teacher_qk`, where the mixer reads them before the rotary embedding) and stores the mean
squared error between its output and the teacher's over real query tokens, under the layer's name.
With `teacher_forcing=True` the mixer then returns the teacher's output, so every layer sees the
inputs the original model would give it (layer-local transfer in one forward pass); otherwise it
returns its own output (joint transfer). Outside the context the mixers do nothing extra.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from rewrite.mixers.common import repeat_kv, sequence_ids


@dataclass
class TransferRecord:
    """Per-layer mean squared errors of one or more forward passes (in call order)."""

    teacher_forcing: bool = False
    losses: dict[str, torch.Tensor] = field(default_factory=dict)

    def total(self) -> torch.Tensor:
        """The sum of every layer's error (a scalar that backpropagates into the mixers)."""
        if not self.losses:
            raise RuntimeError(
                "no mixer ran while recording attention transfer: the module has no linearized layer, "
                "or it ran a compiled or exported program"
            )
        return torch.stack(list(self.losses.values())).sum()


TEACHER_KWARG = "teacher_qk"
"""The mixers' keyword argument holding the teacher's (q, k); only attention transfer reads it."""

_ACTIVE: ContextVar[TransferRecord | None] = ContextVar("rewrite_transfer_record", default=None)


@contextmanager
def record_transfer(teacher_forcing: bool = False) -> Iterator[TransferRecord]:
    """Record each mixer's error to its softmax teacher for the forward passes run inside."""
    record = TransferRecord(teacher_forcing=teacher_forcing)
    token = _ACTIVE.set(record)
    try:
        yield record
    finally:
        _ACTIVE.reset(token)


def softmax_teacher(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    valid: torch.Tensor | None,
    causal: bool,
    scale: float | None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention in SDPA layout over real keys (valid [B, L]), causal or not, GQA by groups.

    With cu_seqlens (packed sequences, B == 1) each query sees only the keys of its own sequence.
    """
    k, v = repeat_kv(q, k, v)
    length = q.shape[2]
    if cu_seqlens is not None:
        seq = sequence_ids(cu_seqlens, length)
        keep = seq[:, None] == seq[None, :]
        if causal:
            keep = keep & torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)
    if valid is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    keep = valid[:, None, None, :].expand(-1, 1, length, -1)
    if causal:
        keep = keep & torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    keep = keep | torch.eye(length, dtype=torch.bool, device=q.device)  # padded queries see themselves
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)


def observe(
    out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    valid: torch.Tensor | None,
    causal: bool,
    scale: float | None,
    layer: str,
    cu_seqlens: torch.Tensor | None = None,
    teacher_qk: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """What a mixer returns: `out`, or (teacher forcing) its softmax teacher; records the error.

    cu_seqlens: packed sequences (B == 1); the teacher then attends within each sequence.
    teacher_qk: the q and k the teacher attends with when they differ from the mixer's own (the site's
    rotated q and k when the mixer reads them before the rotary embedding); default: q and k.
    """
    if torch.compiler.is_compiling() or type(out) is not torch.Tensor:  # traced or compiled: nothing to record
        return out
    record = _ACTIVE.get()
    if record is None:
        return out
    with torch.no_grad():
        tq, tk = teacher_qk if teacher_qk is not None else (q, k)
        teacher = softmax_teacher(tq, tk, v, valid=valid, causal=causal, scale=scale, cu_seqlens=cu_seqlens)
    err = (out.float() - teacher.float()).pow(2).mean(dim=(1, 3))  # [B, L]
    if valid is not None:
        weights = valid.to(err.dtype)
        loss = (err * weights).sum() / weights.sum().clamp(min=1)
    else:
        loss = err.mean()
    key = layer or f"mixer {len(record.losses)}"
    record.losses[key] = record.losses[key] + loss if key in record.losses else loss
    return teacher.to(out.dtype) if record.teacher_forcing else out
