"""Public sliding-window attention functions: argument checks, the ring-buffer cache layout, the ops."""

import torch

from rewrite.kernels.packed_bounds import check_packed

from .op import sliding_window_decode_op, sliding_window_op

BACKEND = "triton"
"""What `sliding_window_attention` runs. "triton": the `rewrite::sliding_window_attention` op (Triton kernels on
CUDA, the PyTorch reference on the CPU). "flex": `flex.flex_sliding_window_attention` on every device (compiled
FlexAttention on CUDA; on the CPU eager FlexAttention, forward only, there to test the switch). Measured on an H100
(BENCHMARKS.md, 2026-12-06 seventh session): flex's forward + backward is 18-24% faster than ours at w = 512 / 4096,
8K / 32K, our forward as fast or faster, and flex compiles again for each new length (packed batches change it
every step): "triton" stays the default, "flex" suits fixed-length training. The decode step is not affected. The op's CUDA
implementation can also run either half on PyTorch's flash kernels (`op.FLASH_FORWARD`, `op.FLASH_BACKWARD`)."""
BACKENDS = ("triton", "flex")


def _fail(name: str, message: str) -> None:
    raise ValueError(f"sliding_window_attention: {name} {message}")


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4 or not x.is_floating_point():
            _fail(name, f"must be a floating-point [B, T, heads, head_dim] tensor, got {x.dtype} {tuple(x.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        _fail("q, k, v", "must share one dtype and one device")
    if k.shape[-1] != q.shape[-1] or v.shape[2] != k.shape[2] or k.shape[0] != v.shape[0]:
        _fail("k, v", f"do not fit q: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[2] % k.shape[2] != 0:
        _fail("k", f"heads ({k.shape[2]}) must divide q's heads ({q.shape[2]})")


def _check_window(window: int, sinks: int) -> None:
    if not isinstance(window, int) or window < 1:
        _fail("window", f"must be an int >= 1, got {window!r}")
    if not isinstance(sinks, int) or sinks < 0:
        _fail("sinks", f"must be an int >= 0, got {sinks!r}")


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    *,
    sinks: int = 0,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    lookahead: int = 0,
) -> torch.Tensor:
    """Softmax attention where query t sees keys [t - window + 1, t + lookahead] plus the first `sinks` tokens.

    lookahead 0 is causal; lookahead > 0 lets each query also see the next `lookahead` keys (a
    bidirectional local window, e.g. ModernBERT's |t - s| <= w as window w + 1, lookahead w); sink
    tokens past t + lookahead stay hidden. q [B, T, H, K], k [B, T, Hkv, K], v [B, T, Hkv, V] ->
    o [B, T, H, V]; q head h reads kv head h // (H / Hkv). scale defaults to K**-0.5. cu_seqlens
    [N + 1] packs N sequences into B == 1; positions (and sinks) count from each sequence's start,
    and no query sees past its sequence's end. The CUDA kernel only visits key blocks inside the
    window (and the sink blocks), so time grows linearly in T. The module's BACKEND picks the kernels.
    """
    _check_qkv(q, k, v)
    _check_window(window, sinks)
    if not isinstance(lookahead, int) or isinstance(lookahead, bool) or lookahead < 0:
        _fail("lookahead", f"must be an int >= 0, got {lookahead!r}")
    if k.shape[:2] != q.shape[:2]:
        _fail("k, v", f"must share q's [B, T] = {list(q.shape[:2])}, got {list(k.shape[:2])}")
    check_packed("sliding_window_attention", cu_seqlens, q)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if BACKEND == "flex":
        from .flex import flex_sliding_window_attention

        return flex_sliding_window_attention(q, k, v, window, sinks=sinks, scale=scale, cu_seqlens=cu_seqlens,
                                             lookahead=lookahead)
    if BACKEND != "triton":
        raise ValueError(f"sliding_window_attention: BACKEND must be one of {BACKENDS}, got {BACKEND!r}")
    return sliding_window_op(q, k, v, window, sinks, scale, cu_seqlens, lookahead)[0]


def ring_slots(positions: torch.Tensor, window: int, sinks: int) -> torch.Tensor:
    """Cache slot of the token at each position: p if p < sinks, else sinks + (p - sinks) % window.

    A ring cache has S = sinks + window slots: the first tokens stay in their own slots, later
    tokens go round the ring, so the cache always holds every token a new query may see.
    """
    ring = sinks + torch.remainder(positions - sinks, window)
    return torch.where(positions < sinks, positions, ring)


def fill_ring_cache(x: torch.Tensor, window: int, sinks: int = 0) -> torch.Tensor:
    """A ring cache [B, sinks + window, Hkv, D] holding what a query after the prefill x [B, T, Hkv, D] may see."""
    _check_window(window, sinks)
    batch, length = x.shape[:2]
    cache = x.new_zeros(batch, sinks + window, *x.shape[2:])
    positions = torch.arange(length, device=x.device)
    keep = (positions < sinks) | (positions >= length - window)  # distinct slots, latest token wins
    kept = positions[keep]
    cache[:, ring_slots(kept, window, sinks)] = x[:, kept]
    return cache


def sliding_window_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    window: int,
    *,
    sinks: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """Decode one token per batch row: write its k, v into the ring caches (in place), attend, return o.

    q [B, 1, H, K], k [B, 1, Hkv, K], v [B, 1, Hkv, V]; k_cache [B, sinks + window, Hkv, K] and
    v_cache [B, sinks + window, Hkv, V] laid out by `ring_slots` (see `fill_ring_cache`);
    positions [B] (int) is the new token's position in its sequence (tokens before it). Returns
    o [B, 1, H, V], equal to the last row of `sliding_window_attention` over the whole sequence.
    Inference only.
    """
    _check_qkv(q, k, v)
    _check_window(window, sinks)
    if q.shape[1] != 1 or k.shape[1] != 1:
        _fail("q, k, v", f"must hold one token per row for a decode step, got T = {q.shape[1]}")
    expected = (q.shape[0], sinks + window, k.shape[2])
    for name, cache, new in (("k_cache", k_cache, k), ("v_cache", v_cache, v)):
        if tuple(cache.shape) != (*expected, new.shape[-1]) or cache.dtype != q.dtype or cache.device != q.device:
            _fail(name, f"must be {q.dtype} [B, sinks + window, Hkv, D] = {[*expected, new.shape[-1]]}, got "
                        f"{cache.dtype} {list(cache.shape)}")
    if tuple(positions.shape) != (q.shape[0],) or positions.dtype not in (torch.int32, torch.int64):
        _fail("positions", f"must be an int tensor [B], got {positions.dtype} {tuple(positions.shape)}")
    rows = torch.arange(q.shape[0], device=q.device)
    slots = ring_slots(positions.to(q.device).long(), window, sinks)
    k_cache[rows, slots] = k[:, 0]
    v_cache[rows, slots] = v[:, 0]
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return sliding_window_decode_op(q, k_cache, v_cache, positions, scale)
