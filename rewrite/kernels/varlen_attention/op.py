"""The `rewrite::varlen_attention` ops: schemas, fakes, autograd, CPU references, CUDA Triton kernels.

Low-level: arguments are assumed valid (`api.varlen_attention` checks them). max_seqlen is the
longest sequence, passed in so the CUDA launchers size their grids without reading cu_seqlens.
"""

import torch

from .._lse_attention import register_lse_attention_autograd
from .._triton import load_triton_module
from .reference import accumulation_dtype, varlen_attention_backward_reference, varlen_attention_reference

_FORWARD = "rewrite.kernels.varlen_attention.triton_forward"
_BACKWARD = "rewrite.kernels.varlen_attention.triton_backward"


@torch.library.custom_op("rewrite::varlen_attention", mutates_args=())
def varlen_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [T, H, Dv], lse [H, T]); see `reference.py` for the definition."""
    return varlen_attention_reference(q, k, v, cu_seqlens, causal, scale)


@varlen_attention_op.register_kernel("cuda")
def _forward_cuda(q, k, v, cu_seqlens, max_seqlen, causal, scale):
    return load_triton_module(_FORWARD).varlen_attention_forward(q, k, v, cu_seqlens, max_seqlen, causal, scale)


@varlen_attention_op.register_fake
def _forward_fake(q, k, v, cu_seqlens, max_seqlen, causal, scale):
    o = q.new_empty(*q.shape[:-1], v.shape[-1])
    return o, q.new_empty(q.shape[1], q.shape[0], dtype=accumulation_dtype(q.dtype))


@torch.library.custom_op("rewrite::varlen_attention_backward", mutates_args=())
def varlen_attention_backward_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `rewrite::varlen_attention` given do (o and lse from the forward)."""
    return varlen_attention_backward_reference(do, q, k, v, o, lse, cu_seqlens, causal, scale)


@varlen_attention_backward_op.register_kernel("cuda")
def _backward_cuda(do, q, k, v, o, lse, cu_seqlens, max_seqlen, causal, scale):
    return load_triton_module(_BACKWARD).varlen_attention_backward(
        do, q, k, v, o, lse, cu_seqlens, max_seqlen, causal, scale
    )


register_lse_attention_autograd(varlen_attention_op, varlen_attention_backward_op)
