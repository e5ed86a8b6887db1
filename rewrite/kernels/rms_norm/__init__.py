"""Fused RMSNorm."""

from .op import add_rms_norm_cast, rms_norm, rms_norm_cast

__all__ = ["add_rms_norm_cast", "rms_norm", "rms_norm_cast"]
