"""Gated MLP activation `act(gate) * up` (SiLU or tanh-approximated GELU), forward only."""

from .op import KINDS, gated_activation

__all__ = ["KINDS", "gated_activation"]
