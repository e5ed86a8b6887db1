"""Varlen softmax attention: packed sequences (cu_seqlens), causal or not, GQA, forward and backward."""

from .api import varlen_attention

__all__ = ["varlen_attention"]
