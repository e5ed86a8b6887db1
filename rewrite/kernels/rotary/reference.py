"""Rotary position embedding in plain PyTorch: the source of truth for the Triton kernels and the CPU implementation.

It is Hugging Face's `apply_rotary_pos_emb` for one tensor, op for op, so it rounds where PyTorch does:
`x * cos` and `rotate_half(x) * sin` each rounded to their result dtype, then their sum.
"""

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """cat(-second half, first half) along the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_embedding_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin (cos / sin broadcast to x), as a contiguous tensor."""
    return ((x * cos) + (rotate_half(x) * sin)).contiguous()
