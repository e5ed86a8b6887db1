"""Varlen attention through PyTorch's own flash kernel (`torch.nn.attention.varlen.varlen_attn`), where present.

Its signature changed across releases (causality as `is_causal` or as `window_size`; GQA as
`enable_gqa` or not at all), so the call is adapted to the installed version.
"""

import functools
import inspect

import torch


@functools.cache
def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def torch_varlen_available(q: torch.Tensor) -> bool:
    """Whether PyTorch's varlen flash attention can run q: CUDA, fp16/bf16, and the function exists."""
    return _varlen_attn() is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


@functools.cache
def _parameters() -> frozenset[str]:
    fn = _varlen_attn()
    return frozenset(inspect.signature(fn).parameters) if fn is not None else frozenset()


def torch_varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, causal: bool,
    scale: float,
) -> torch.Tensor:
    """o [T, H, Dv] from PyTorch's varlen kernel (same arguments as `varlen_attention`)."""
    fn = _varlen_attn()
    if fn is None:
        raise RuntimeError("this PyTorch has no torch.nn.attention.varlen.varlen_attn; use the Triton backend")
    params = _parameters()
    kwargs: dict = {"scale": scale}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    elif "is_causal" in params:
        kwargs["is_causal"] = causal
    elif causal:
        raise RuntimeError("this PyTorch's varlen_attn cannot run causal attention; use the Triton backend")
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    cu = cu_seqlens.to(torch.int32)
    return fn(q, k, v, cu, cu, max_seqlen, max_seqlen, **kwargs)
