"""Short causal convolutions over the tokens (LFM2's short-conv layers) that the varlen pass runs per sequence.

The pattern, as PyTorch models write a causal depthwise conv: `conv1d(x, w, b, padding=K-1, groups=C)` over
x [batch, C, seq] with w [C, 1, K], then the first `seq` outputs kept (`[..., :seq]`). Output t then reads inputs
t-K+1..t of its own row, so on packed tokens the same conv restarted at each sequence start gives each real token
what it had on its padded row (`rewrite::short_conv` with cu_seqlens, which takes K from 2 to 8).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from rewrite.analysis.nodes import is_op, tensor_meta
from rewrite.varlen.symbols import TokenDims, TokenSymbols, expr_of

aten = torch.ops.aten
KERNELS = range(2, 9)
"""Kernel sizes the short-conv kernel takes."""


@dataclass(frozen=True)
class CausalConv:
    """A matched causal depthwise conv: its input, weight [C, 1, K], bias (or None) and the slice keeping the first
    `seq` outputs (whose value the per-sequence conv replaces)."""

    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    cut: fx.Node


def _ints(value, default: int) -> list[int] | None:
    if value is None:
        return [default]
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return list(value)
    return None


def causal_depthwise_conv(node: fx.Node, symbols: TokenSymbols) -> CausalConv | None:
    """The causal depthwise conv over the tokens that `node` (an `aten.conv1d`) starts, or None if it is not one."""
    if not is_op(node, aten.conv1d.default) or len(node.users) != 1:
        return None
    args = list(node.args) + [None] * (7 - len(node.args))
    x, weight, bias, stride, padding, dilation, groups = args[:7]
    x_val, w_val = tensor_meta(x), tensor_meta(weight)
    if x_val is None or w_val is None or x_val.dim() != 3 or w_val.dim() != 3:
        return None
    if symbols.dims(x_val.shape) != TokenDims(0, 2):
        return None
    channels, kernel = x_val.shape[1], w_val.shape[2]
    if symbols.mentions_tokens(channels) or not isinstance(kernel, int) or kernel not in KERNELS:
        return None
    if tuple(w_val.shape[:2]) != (channels, 1) or (groups if groups is not None else 1) != channels:
        return None
    if _ints(stride, 1) != [1] or _ints(dilation, 1) != [1] or _ints(padding, 0) != [kernel - 1]:
        return None
    (cut,) = node.users
    if not is_op(cut, aten.slice.Tensor) or cut.args[0] is not node:
        return None
    dim, start = (list(cut.args) + [0, None])[1:3]
    step = cut.args[4] if len(cut.args) > 4 else 1
    cut_val = tensor_meta(cut)
    if dim not in (2, -1) or start not in (None, 0) or step != 1 or cut_val is None:
        return None
    if expr_of(cut_val.shape[2]) != expr_of(x_val.shape[2]):  # the first `seq` outputs: causal, no look-ahead
        return None
    return CausalConv(x, weight, bias if isinstance(bias, fx.Node) else None, cut)
