"""Padding-free execution: what the `varlen` pass puts in graphs and the analysis that proves it right."""

from rewrite.varlen.runtime import (
    pack_tokens,
    packed_attention,
    packed_layout,
    packed_window_attention,
    padding_keep,
    repad_tokens,
    unpad_layout,
)

__all__ = ["pack_tokens", "packed_attention", "packed_layout", "packed_window_attention", "padding_keep", "repad_tokens", "unpad_layout"]
