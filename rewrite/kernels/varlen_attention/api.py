"""Public varlen attention: argument checks, then the op (reference / Triton) or PyTorch's varlen kernel."""

import torch

from .op import varlen_attention_op
from .reference import varlen_attention_reference
from .torch_backend import torch_varlen_attention, torch_varlen_available

BACKENDS = ("auto", "kernel", "torch", "reference")
"""auto: for calls that need gradients, PyTorch's flash kernel where it can run (CUDA, fp16/bf16), else
`kernel`; without gradients `kernel` (the faster of the two for whole-model forwards on the H100, see
BENCHMARKS.md; PyTorch's backward is the faster one);
kernel: the `rewrite::varlen_attention` op (Triton on CUDA, the reference on CPU);
torch: PyTorch's kernel or an error; reference: the plain-PyTorch definition on any device."""


def _needs_grad(*xs: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def _fail(name: str, message: str) -> None:
    raise ValueError(f"varlen_attention: {name} {message}")


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 3 or not x.is_floating_point():
            _fail(name, f"must be a floating-point [T, heads, head_dim] tensor, got {x.dtype} {tuple(x.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        _fail("q, k, v", "must share one dtype and one device")
    if k.shape[0] != q.shape[0] or v.shape[:2] != k.shape[:2] or k.shape[-1] != q.shape[-1]:
        _fail("k, v", f"do not fit q: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        _fail("k", f"heads ({k.shape[1]}) must divide q's heads ({q.shape[1]})")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.numel() < 2:
        _fail("cu_seqlens", f"must be a 1-D int32/int64 tensor [N + 1], got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        _fail("cu_seqlens", f"must be on {q.device}, got {cu_seqlens.device}")


def _check_bounds(cu_seqlens: torch.Tensor, total: int, max_seqlen: int | None) -> int:
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != total or any(a > b for a, b in zip(bounds, bounds[1:])):
        _fail("cu_seqlens", f"must rise from 0 to T = {total} without decreasing, got {bounds}")
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    if max_seqlen is not None and max_seqlen < longest:
        _fail("max_seqlen", f"is {max_seqlen} but the longest sequence has {longest} tokens")
    return longest if max_seqlen is None else max_seqlen


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
    check_bounds: bool = True,
) -> torch.Tensor:
    """Softmax attention within each of N packed sequences: o [T, H, Dv].

    q [T, H, D], k [T, Hkv, D], v [T, Hkv, Dv]; sequence n is rows cu_seqlens[n] .. cu_seqlens[n + 1] - 1
    (empty sequences allowed). causal: a query sees keys up to its own position. q head h reads kv
    head h // (H / Hkv). scale defaults to D**-0.5. max_seqlen (the longest sequence) is read from
    cu_seqlens when not given. backend: one of `BACKENDS`. check_bounds=False skips reading
    cu_seqlens on the host (the caller vouches for it; max_seqlen must then be given).
    """
    _check(q, k, v, cu_seqlens)
    if backend not in BACKENDS:
        _fail("backend", f"must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if check_bounds or max_seqlen is None:
        max_seqlen = _check_bounds(cu_seqlens, q.shape[0], max_seqlen)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend == "reference":
        return varlen_attention_reference(q, k, v, cu_seqlens, causal, scale)[0]
    if backend == "torch" or (backend == "auto" and _needs_grad(q, k, v) and torch_varlen_available(q)):
        if backend == "torch" and not torch_varlen_available(q):
            _fail("backend", "'torch' needs PyTorch's varlen_attn, a CUDA device and fp16/bf16 inputs")
        return torch_varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal, scale)
    return varlen_attention_op(q, k, v, cu_seqlens, max_seqlen, causal, scale)[0]
