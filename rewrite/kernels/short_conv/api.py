"""Public short-conv function: argument checks, then the op."""

import torch

from rewrite.kernels.packed_bounds import check_packed

from .op import short_conv_op

ACTIVATIONS = (None, "silu")


def _fail(name: str, message: str) -> None:
    raise ValueError(f"short_conv: {name} {message}")


def _check(x, weight, bias, activation, cache, cu_seqlens) -> int:
    """Validate the arguments; return the number of sequences N."""
    if x.dim() != 3 or not x.is_floating_point():
        _fail("x", f"must be a floating-point [B, T, D] tensor, got {x.dtype} {tuple(x.shape)}")
    dim = x.shape[2]
    if weight.dim() != 2 or weight.shape[0] != dim or not 2 <= weight.shape[1] <= 8:
        _fail("weight", f"must have shape [D, W] = [{dim}, 2..8], got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (dim,):
        _fail("bias", f"must have shape [{dim}], got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("cache", cache)):
        if t is not None and (t.device != x.device or not t.is_floating_point()):
            _fail(name, f"must be a floating-point tensor on {x.device}, got {t.dtype} on {t.device}")
    if activation not in ACTIVATIONS:
        _fail("activation", f"must be one of {ACTIVATIONS}, got {activation!r}")
    n = check_packed("short_conv", cu_seqlens, x)
    if cache is not None and tuple(cache.shape) != (n, weight.shape[1] - 1, dim):
        _fail("cache", f"must have shape [N, W-1, D] = {[n, weight.shape[1] - 1, dim]}, got {list(cache.shape)}")
    return n


def short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    cache: torch.Tensor | None = None,
    output_final_cache: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal depthwise conv1d; returns (y [B, T, D], final cache [N, W-1, D] or None).

    y_t = act(bias + sum_j weight[:, j] * x_{t - (W-1) + j}) per channel, where inputs before a
    sequence's start come from `cache` (its W-1 previous inputs, oldest first) or are zero.
    x [B, T, D]; weight [D, W] with W in 2..8; bias [D]; activation None or "silu".
    cu_seqlens [N + 1] packs N sequences into B == 1; nothing leaks across sequences and each
    sequence reads its own cache row. The final cache (the last W-1 inputs of each sequence,
    older cache rows included when it is shorter than W-1) feeds the next call: decoding one
    token at a time, or the halo of the next shard under sequence parallelism (it is just the
    previous shard's last W-1 tokens of x). Cache dtype is x's.
    """
    _check(x, weight, bias, activation, cache, cu_seqlens)
    if cache is not None:
        cache = cache.to(x.dtype)
    y, final = short_conv_op(x, weight, bias, activation == "silu", cache, cu_seqlens)
    return y, (final if output_final_cache else None)
