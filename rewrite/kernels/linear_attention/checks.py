"""Argument checks for the public linear-attention functions: clear ValueErrors, nothing else."""

import torch

from rewrite.kernels.packed_bounds import check_packed

DECAYS = ("none", "constant", "scalar", "vector")
FEATURE_MAPS = ("identity", "softmax", "elu", "relu")


def _fail(name: str, message: str) -> None:
    raise ValueError(f"linear_attention: {name} {message}")


def infer_decay(g: torch.Tensor | None, decay: str | None, gate_from_keys: bool) -> str:
    """The decay kind: `decay` if given, else "none" without g, else read from g's number of dims."""
    if decay is not None:
        if decay not in DECAYS:
            _fail("decay", f"must be one of {DECAYS}, got {decay!r}")
        return decay
    if g is None:
        return "vector" if gate_from_keys else "none"
    by_dims = {1: "constant", 3: "scalar", 4: "vector"}
    if g.dim() not in by_dims:
        _fail(
            "g",
            f"must have 1 ([Hkv]), 3 ([B, T, Hkv]) or 4 ([B, T, Hkv, K]) dims, got shape {tuple(g.shape)}",
        )
    return by_dims[g.dim()]


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q [B, T, H, K], k [B, T, Hkv, K], v [B, T, Hkv, V], one float dtype and device, Hkv divides H."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            _fail(name, f"must have 4 dims [B, T, heads, head_dim], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            _fail(name, f"must be a floating-point tensor, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        _fail("q, k, v", f"must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        _fail("q, k, v", f"must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[:2] != q.shape[:2] or v.shape[:2] != q.shape[:2]:
        _fail(
            "k, v",
            f"must share q's [B, T] = {list(q.shape[:2])}, got {list(k.shape[:2])}, {list(v.shape[:2])}",
        )
    if k.shape[-1] != q.shape[-1]:
        _fail("k", f"head dim {k.shape[-1]} must equal q's head dim {q.shape[-1]}")
    if v.shape[2] != k.shape[2]:
        _fail("v", f"must have k's {k.shape[2]} heads, got {v.shape[2]}")
    if q.shape[2] % k.shape[2] != 0:
        _fail("k", f"heads ({k.shape[2]}) must divide q's heads ({q.shape[2]})")


def check_decay(g: torch.Tensor | None, decay: str, q: torch.Tensor, k: torch.Tensor) -> None:
    """g is None for "none", else [Hkv] / [B, T, Hkv] / [B, T, Hkv, K] for constant / scalar / vector."""
    if decay == "none":
        if g is not None:
            _fail("g", 'must be None when decay="none"')
        return
    if g is None:
        _fail("g", f'is required when decay="{decay}"')
    batch, length, kv_heads, dk = k.shape
    expected = {
        "constant": (kv_heads,),
        "scalar": (batch, length, kv_heads),
        "vector": (batch, length, kv_heads, dk),
    }
    if tuple(g.shape) != expected[decay]:
        _fail("g", f'must have shape {list(expected[decay])} for decay="{decay}", got {list(g.shape)}')
    if not g.is_floating_point() or g.device != q.device:
        _fail("g", f"must be a floating-point tensor on {q.device}, got {g.dtype} on {g.device}")


def check_cu_seqlens(cu_seqlens: torch.Tensor | None, q: torch.Tensor) -> int:
    """The number of sequences N; with cu_seqlens, B == 1 and cu_seqlens = [0, ..., T] non-decreasing."""
    return check_packed("linear_attention", cu_seqlens, q)


def check_state(
    name: str, state: torch.Tensor | None, n: int, k: torch.Tensor, v: torch.Tensor, extra: int = 0
) -> None:
    """state is None or [N, Hkv, K, V + extra] on the inputs' device (extra 1: a normalised step's z column)."""
    if state is None:
        return
    expected = (n, k.shape[2], k.shape[-1], v.shape[-1] + extra)
    if tuple(state.shape) != expected:
        form = "[N, Hkv, K, V]" if extra == 0 else f"[N, Hkv, K, V + {extra}]"
        _fail(name, f"must have shape {form} = {list(expected)}, got {list(state.shape)}")
    if not state.is_floating_point() or state.device != k.device:
        _fail(name, f"must be a floating-point tensor on {k.device}, got {state.dtype} on {state.device}")


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        _fail(name, f"must be one of {allowed}, got {value!r}")
