"""Short causal depthwise conv1d (kernel 2-8) with bias, optional SiLU, varlen and a decode cache."""

from .api import short_conv

__all__ = ["short_conv"]
