"""The `rewrite::kv_cache_attention` op: schema, fake, CPU reference, CUDA Triton kernel. Forward only.

Low-level: arguments are assumed valid (`api.kv_cache_attention` checks them).
"""

from typing import Any

import torch

from .._triton import load_triton_module
from .reference import kv_cache_attention_reference

_DECODE = "rewrite.kernels.kv_cache_attention.triton_decode"


@torch.library.custom_op("rewrite::kv_cache_attention", mutates_args=())
def kv_cache_attention_op(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, scale: float,
    last_slot: torch.Tensor | None = None,
) -> torch.Tensor:
    """o [B, H, T, Dv] of q [B, H, T, D] over keys / values [B, Hkv, S, D|Dv] where visible [B, 1, T, S] and (with
    last_slot [1]) the slot is not after last_slot."""
    return kv_cache_attention_reference(q, keys, values, visible, scale, last_slot)


@kv_cache_attention_op.register_kernel("cuda")
def _cuda(q, keys, values, visible, scale, last_slot=None):
    return load_triton_module(_DECODE).kv_cache_attention_decode(q, keys, values, visible, scale, last_slot)


@kv_cache_attention_op.register_fake
def _fake(q, keys, values, visible, scale, last_slot=None):
    return q.new_empty(*q.shape[:-1], values.shape[-1])


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    pass


def _backward(ctx: Any, do: torch.Tensor) -> tuple[Any, ...]:
    raise RuntimeError(
        "rewrite::kv_cache_attention is a forward-only decode kernel (inference): it has no backward; "
        "run the decode step under torch.no_grad() / torch.inference_mode(), or use "
        "F.scaled_dot_product_attention where gradients are needed"
    )


kv_cache_attention_op.register_autograd(_backward, setup_context=_setup_context)
