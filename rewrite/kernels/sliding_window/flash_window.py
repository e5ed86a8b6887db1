"""Sliding-window attention by PyTorch's own flash-attention kernels, which take a left / right window.

`aten::_flash_attention_forward` / `_backward` (FlashAttention-2 inside PyTorch) visit only the key blocks a
query block can see (on an H100 their backward beat ours, their forward did not: `op.FLASH_FORWARD`,
`op.FLASH_BACKWARD`); this file maps the op's arguments onto theirs:
window w, lookahead a -> (window_size_left, window_size_right) = (w - 1, a), causal when a == 0. Every batch is
passed in their packed ("varlen") form, a dense [B, T] batch as B sequences of T tokens, so one code path
serves both. They take no sink tokens and need K == V, a head dim that is a multiple of 8 up to 256, float16 /
bfloat16 and a CUDA device of compute capability 8.0 or higher: `flash_window_refusal` says which of these
inputs miss, and the op's CUDA implementation then runs the Triton kernels.
"""

from __future__ import annotations

import torch

from ..packed_bounds import cu_seqlens_trusted, read_bounds

MAX_HEAD_DIM = 256


def flash_window_refusal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: int) -> str | None:
    """Why PyTorch's flash kernels cannot run this sliding-window call, or None when they can."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} (flash attention takes float16 / bfloat16)"
    if sinks:
        return f"{sinks} sink tokens (the flash kernels' window has no sinks)"
    if v.shape[-1] != q.shape[-1]:
        return f"value head dim {v.shape[-1]} differs from the key head dim {q.shape[-1]}"
    if q.shape[-1] % 8 or q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} (flash attention takes multiples of 8 up to {MAX_HEAD_DIM})"
    if q.device.type != "cuda":
        return f"inputs on {q.device.type}, not CUDA"
    if not torch.backends.cuda.is_flash_attention_available():
        return "this PyTorch build has no flash attention"
    if torch.cuda.get_device_capability(q.device) < (8, 0):
        return "a GPU below compute capability 8.0"
    return None


def _packed(x: torch.Tensor) -> torch.Tensor:
    """[B, T, heads, D] -> [B * T, heads, D], last dim contiguous (the flash kernels' packed layout)."""
    x = x.reshape(-1, *x.shape[2:])
    return x if x.stride(-1) == 1 else x.contiguous()


def _bounds(q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """(cu_seqlens as int32 on q's device, the longest sequence or an upper bound of it)."""
    batch, length = q.shape[:2]
    if cu_seqlens is None:
        return torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=q.device), length
    cu = cu_seqlens.to(torch.int32)
    if torch.compiler.is_compiling() or cu_seqlens_trusted() or torch.cuda.is_current_stream_capturing():
        return cu, length  # no host read: the whole row bounds every sequence
    bounds = read_bounds(cu_seqlens)
    return cu, max(b - a for a, b in zip(bounds, bounds[1:]))


def _windows(window: int, lookahead: int) -> dict[str, int]:
    return {"window_size_left": window - 1, "window_size_right": lookahead}


def _token_sequences(cu: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence index, offset inside it) of every packed token."""
    tokens = torch.arange(total, device=cu.device, dtype=torch.int32)
    sequence = torch.searchsorted(cu[1:], tokens, right=True)
    return sequence, tokens - cu[sequence]


def _lse_to_ours(lse: torch.Tensor, cu: torch.Tensor, total: int) -> torch.Tensor:
    """The flash kernels' log-sum-exp ([H, total], or [N, H, longest] padded) as [total, H] float32."""
    if lse.dim() == 2:
        return lse.t().contiguous()
    sequence, offset = _token_sequences(cu, total)
    return lse[sequence, :, offset].contiguous()


def _lse_to_flash(lse: torch.Tensor, cu: torch.Tensor, longest: int, padded: bool) -> torch.Tensor:
    """Ours [total, H] back in the flash kernels' layout (see `_lse_to_ours`)."""
    if not padded:
        return lse.t().contiguous()
    total, heads = lse.shape
    sequence, offset = _token_sequences(cu, total)
    out = lse.new_zeros(cu.numel() - 1, heads, longest)
    out[sequence, :, offset] = lse
    return out


_padded_lse: dict[torch.device, bool] = {}
"""Per device: whether this PyTorch's flash kernels give a packed batch's log-sum-exp padded per sequence."""


def _lse_is_padded(device: torch.device) -> bool:
    if device not in _padded_lse:  # a backward with no forward before it in this process: ask the kernels
        x = torch.zeros(3, 1, 8, dtype=torch.float16, device=device)
        cu = torch.tensor([0, 1, 3], dtype=torch.int32, device=device)
        lse = torch.ops.aten._flash_attention_forward(x, x, x, cu, cu, 2, 2, 0.0, True, False)[1]
        _padded_lse[device] = lse.dim() == 3
    return _padded_lse[device]


def flash_window_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scale: float,
    cu_seqlens: torch.Tensor | None,
    lookahead: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, T, H, V], lse [B, T, H] float32) of the op, by the flash kernels (see `flash_window_refusal`)."""
    batch, length, heads = q.shape[:3]
    cu, longest = _bounds(q, cu_seqlens)
    o, lse, *_ = torch.ops.aten._flash_attention_forward(
        _packed(q), _packed(k), _packed(v), cu, cu, longest, longest, 0.0, lookahead == 0, False,
        scale=scale, **_windows(window, lookahead))
    _padded_lse[q.device] = lse.dim() == 3
    return o.view(batch, length, heads, -1), _lse_to_ours(lse, cu, batch * length).view(batch, length, heads)


def flash_window_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    window: int,
    scale: float,
    cu_seqlens: torch.Tensor | None,
    lookahead: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `flash_window_forward`, given do and the forward's o and lse [B, T, H]."""
    cu, longest = _bounds(q, cu_seqlens)
    flash_lse = _lse_to_flash(lse.reshape(-1, lse.shape[-1]), cu, longest, _lse_is_padded(q.device))
    unused = torch.empty((), dtype=torch.int64)  # dropout's seed and offset, as the forward gives them without dropout
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        _packed(do), _packed(q), _packed(k), _packed(v), _packed(o), flash_lse, cu, cu, longest, longest, 0.0,
        lookahead == 0, unused, unused, scale=scale, **_windows(window, lookahead))
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)
