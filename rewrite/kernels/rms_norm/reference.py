"""RMSNorm in plain PyTorch: the source of truth for the Triton kernels and the CPU implementation."""

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x**2, last dim) + eps) * weight, computed in at least float32, in x's dtype."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * weight.to(compute)).to(x.dtype)


def rms_norm_backward_reference(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (dx, dweight) of `rms_norm_reference` given the output gradient dy."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xf, dyf, wf = x.to(compute), dy.to(compute), weight.to(compute)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xf * rstd
    dxhat = dyf * wf
    dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    dweight = (dyf * xhat).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dweight.to(weight.dtype)


def rms_norm_cast_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float, round_normed: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """RMSNorm with a Hugging Face model's cast order: the normalized rows in float32, rounded to x's dtype
    first when `round_normed`, times (weight + weight_offset) in float32, rounded to `out_dtype`."""
    xf = x.to(torch.float32)
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if round_normed:
        normed = normed.to(x.dtype).to(torch.float32)
    scale = weight.to(torch.float32) + weight_offset
    return (normed * scale).to(out_dtype)


def add_rms_norm_cast_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float,
    round_normed: bool, out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual as aten.add gives it in x's dtype, `rms_norm_cast_reference` of that sum)."""
    total = x + residual
    return total, rms_norm_cast_reference(total, weight, eps, weight_offset, round_normed, out_dtype)
