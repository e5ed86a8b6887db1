"""Short causal convolutions over the packed tokens (LFM2's short-conv layers), which the varlen pass runs per
sequence.

A causal depthwise conv (`rewrite.analysis.causal_conv`) over x [batch, C, seq] restarted at each sequence start
of the packed tokens gives each real token what it had on its padded row (`rewrite::short_conv` with cu_seqlens,
which takes K from 2 to 8).
"""

from __future__ import annotations

import torch.fx as fx

from rewrite.analysis.causal_conv import CausalConv, causal_depthwise_conv
from rewrite.analysis.nodes import tensor_meta
from rewrite.varlen.symbols import TokenDims, TokenSymbols


def causal_conv_over_tokens(node: fx.Node, symbols: TokenSymbols) -> CausalConv | None:
    """The causal depthwise conv over the tokens (batch dim 0, sequence dim 2) that `node` starts, or None."""
    conv = causal_depthwise_conv(node)
    if conv is None:
        return None
    x_val = tensor_meta(conv.x)
    if symbols.dims(x_val.shape) != TokenDims(0, 2) or symbols.mentions_tokens(x_val.shape[1]):
        return None
    return conv
