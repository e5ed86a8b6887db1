"""Fused RMSNorm."""

from .op import rms_norm, rms_norm_cast

__all__ = ["rms_norm", "rms_norm_cast"]
