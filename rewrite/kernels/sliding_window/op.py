"""The `rewrite::sliding_window_*` ops: schemas, fakes, autograd, CPU references, CUDA Triton kernels.

Low-level: arguments are assumed valid (the public functions in `api.py` check them).
"""

import torch

from .._lse_attention import register_lse_attention_autograd
from .._triton import load_triton_module
from .flash_window import flash_window_backward, flash_window_forward, flash_window_refusal
from .reference import (
    sliding_window_backward_reference,
    sliding_window_decode_reference,
    sliding_window_reference,
)

_FORWARD = "rewrite.kernels.sliding_window.triton_forward"
_BACKWARD = "rewrite.kernels.sliding_window.triton_backward"
_DECODE = "rewrite.kernels.sliding_window.triton_decode"

FLASH_FORWARD = False
FLASH_BACKWARD = True
"""Whether the CUDA implementation's forward / backward run PyTorch's flash-attention kernels (`flash_window.py`)
where they take the call (no sinks, K == V, float16 / bfloat16, head dim a multiple of 8 up to 256; the backward on
dense batches only unless FLASH_BACKWARD_PACKED), the Triton kernels elsewhere. Both paths give the same o and lse (natural-log float32), so either backward may follow either
forward. Measured side by side on an H100 (BENCHMARKS.md, 2026-12-07 sixteenth session; B=1, H=16, D=128, bf16,
w = 512 and 4096, 8K to 128K tokens): our forward with the flash backward (the default) against our kernels for
both: fwd+bwd 23-24% less time at w = 512 from 32K on, 5-7% at w = 4096, a tie at 8K; the flash forward is
1.05-1.5x ours, so FLASH_FORWARD stays off. GPU tests of every pairing (tests/kernel_ops/test_sliding_window_flash.py)
passed there against float64."""


FLASH_BACKWARD_PACKED = False
"""With FLASH_BACKWARD: whether packed calls (cu_seqlens given) take the flash backward too. Off: the flash kernels
need the longest sequence as a host integer, so outside `trusted_cu_seqlens()` (and at the runtime of a compiled
graph) each call reads cu_seqlens back, a device sync per layer in the backward, and inside it the whole row bounds
every sequence, which sizes their grid by the sequence count; neither was timed (the H100 run timed dense batches),
so packed calls keep our backward, which needs no host value."""


def _by_flash(switch: bool, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: int) -> bool:
    return switch and flash_window_refusal(q, k, v, sinks) is None


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the log-sum-exp output: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


@torch.library.custom_op("rewrite::sliding_window_attention", mutates_args=())
def sliding_window_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    sinks: int,
    scale: float,
    cu_seqlens: torch.Tensor | None,
    lookahead: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, T, H, V], lse [B, T, H]); see `reference.py` for the definition (lookahead 0: causal)."""
    return sliding_window_reference(q, k, v, window, sinks, scale, cu_seqlens, lookahead)


@sliding_window_op.register_kernel("cuda")
def _forward_cuda(q, k, v, window, sinks, scale, cu_seqlens, lookahead=0):
    if _by_flash(FLASH_FORWARD, q, k, v, sinks):
        return flash_window_forward(q, k, v, window, scale, cu_seqlens, lookahead)
    return load_triton_module(_FORWARD).sliding_window_forward(q, k, v, window, sinks, scale, cu_seqlens,
                                                               lookahead=lookahead)


@sliding_window_op.register_fake
def _forward_fake(q, k, v, window, sinks, scale, cu_seqlens, lookahead=0):
    o = q.new_empty(*q.shape[:-1], v.shape[-1])
    return o, q.new_empty(q.shape[:-1], dtype=lse_dtype(q.dtype))


@torch.library.custom_op("rewrite::sliding_window_attention_backward", mutates_args=())
def sliding_window_backward_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    window: int,
    sinks: int,
    scale: float,
    cu_seqlens: torch.Tensor | None,
    lookahead: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `rewrite::sliding_window_attention` given do (o and lse from the forward)."""
    return sliding_window_backward_reference(do, q, k, v, window, sinks, scale, cu_seqlens, lookahead)


@sliding_window_backward_op.register_kernel("cuda")
def _backward_cuda(do, q, k, v, o, lse, window, sinks, scale, cu_seqlens, lookahead=0):
    if (cu_seqlens is None or FLASH_BACKWARD_PACKED) and _by_flash(FLASH_BACKWARD, q, k, v, sinks):
        return flash_window_backward(do, q, k, v, o, lse, window, scale, cu_seqlens, lookahead)
    return load_triton_module(_BACKWARD).sliding_window_backward(
        do, q, k, v, o, lse, window, sinks, scale, cu_seqlens, lookahead=lookahead
    )


register_lse_attention_autograd(sliding_window_op, sliding_window_backward_op)


@torch.library.custom_op("rewrite::sliding_window_decode", mutates_args=())
def sliding_window_decode_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor, scale: float
) -> torch.Tensor:
    """One query per batch row over a ring-buffer KV cache: o [B, 1, H, V]. Inference only."""
    return sliding_window_decode_reference(q, k_cache, v_cache, positions, scale)


@sliding_window_decode_op.register_kernel("cuda")
def _decode_cuda(q, k_cache, v_cache, positions, scale):
    return load_triton_module(_DECODE).sliding_window_decode(q, k_cache, v_cache, positions, scale)


@sliding_window_decode_op.register_fake
def _decode_fake(q, k_cache, v_cache, positions, scale):
    return q.new_empty(*q.shape[:-1], v_cache.shape[-1])
