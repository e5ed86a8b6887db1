"""Autograd shared by the softmax-attention ops that return (o, lse): varlen and sliding-window attention.

Such an op takes (q, k, v, *rest) and returns (o, lse); its backward op takes (do, q, k, v, o, lse,
*rest) and returns (dq, dk, dv). Only q, k and v get gradients; lse is not differentiable. Tensors
among `rest` (cu_seqlens) are saved for backward, the other arguments kept as they are.
"""

from __future__ import annotations

from typing import Any

import torch


def _backward_fake(do, q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, k, v, *rest = inputs
    o, lse = output
    slots = [i for i, x in enumerate(rest) if isinstance(x, torch.Tensor)]
    ctx.save_for_backward(q, k, v, o, lse, *(rest[i] for i in slots))
    ctx.tensor_slots = slots
    ctx.rest = [None if i in slots else x for i, x in enumerate(rest)]
    ctx.mark_non_differentiable(lse)


def register_lse_attention_autograd(op: Any, backward_op: Any) -> None:
    """Give `backward_op` its fake (gradients shaped like q, k, v) and `op` its autograd through `backward_op`."""
    backward_op.register_fake(_backward_fake)

    def backward(ctx: Any, do: torch.Tensor | None, _dlse: torch.Tensor | None) -> tuple[Any, ...]:
        q, k, v, o, lse, *tensors = ctx.saved_tensors
        rest = list(ctx.rest)
        for i, tensor in zip(ctx.tensor_slots, tensors):
            rest[i] = tensor
        nones = (None,) * len(rest)
        if do is None:
            return (None, None, None, *nones)
        dq, dk, dv = backward_op(do.contiguous(), q, k, v, o, lse, *rest)
        return (dq, dk, dv, *nones)

    op.register_autograd(backward, setup_context=_setup_context)
