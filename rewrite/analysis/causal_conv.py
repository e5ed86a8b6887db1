"""Causal depthwise convolutions over a sequence dim, as PyTorch models write them (LFM2's and Mamba's short convs).

The pattern: `conv1d(x, w, b, padding=K-1, groups=C)` over x [batch, C, seq] with w [C, 1, K], then the first
`seq` outputs kept (`[..., :seq]`). Output t reads inputs t-K+1..t of its own row and nothing after it. Which
dims are the batch and the tokens is the caller's to check (`CausalConv.x`): the varlen pass runs such a conv per
packed sequence, the stateful pass carries its last K-1 inputs from one decode call to the next.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx

from rewrite.analysis.nodes import is_op, tensor_meta
from rewrite.analysis.shapes import SymbolicDims, to_expr

aten = torch.ops.aten
KERNELS = range(2, 9)
"""Kernel sizes matched (those of the short-conv kernel, `rewrite::short_conv`)."""
CONVOLUTIONS = (aten.conv1d.default, aten.conv1d.padding, aten.conv2d.default, aten.conv2d.padding,
                aten.conv3d.default, aten.conv3d.padding, aten.convolution.default)
SUPPORTED_FORM = ("a causal depthwise conv: conv1d(x [batch, C, seq], weight [C, 1, K], padding=K-1, groups=C) with "
                  f"its first seq outputs kept, K from {KERNELS.start} to {KERNELS.stop - 1}")
"""The form of convolution over the tokens the passes carry, in words for their errors."""


def kernel_over_tokens(node: fx.Node, over_tokens: Callable[[object], bool]) -> int | None:
    """The kernel size (above 1) of convolution `node` along a spatial dim whose size `over_tokens` says is sized by
    the tokens, or None when it is not a convolution or reaches no neighbouring token."""
    if not is_op(node, *CONVOLUTIONS):
        return None
    x, w = tensor_meta(node.args[0]), tensor_meta(node.args[1])
    if x is None or w is None:
        return None
    spatial = w.dim() - 2
    kernels = [int(k) for size, k in zip(x.shape[x.dim() - spatial:], w.shape[2:]) if over_tokens(size) and int(k) != 1]
    return kernels[0] if kernels else None


@dataclass(frozen=True)
class CausalConv:
    """A matched causal depthwise conv: its input x [batch, C, seq], weight [C, 1, K], bias (or None), kernel size
    K and the slice keeping the first `seq` outputs (whose value a rewrite replaces)."""

    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    kernel: int
    cut: fx.Node


def _ints(value, default: int) -> list[int] | None:
    if value is None:
        return [default]
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return list(value)
    return None


def causal_depthwise_conv(node: fx.Node) -> CausalConv | None:
    """The causal depthwise conv that `node` (an `aten.conv1d`) starts, or None if it is not one."""
    if not is_op(node, aten.conv1d.default) or len(node.users) != 1:
        return None
    args = list(node.args) + [None] * (7 - len(node.args))
    x, weight, bias, stride, padding, dilation, groups = args[:7]
    x_val, w_val = tensor_meta(x), tensor_meta(weight)
    if x_val is None or w_val is None or x_val.dim() != 3 or w_val.dim() != 3:
        return None
    channels, kernel = x_val.shape[1], w_val.shape[2]
    if not isinstance(channels, int) or not isinstance(kernel, int) or kernel not in KERNELS:
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
    if to_expr(cut_val.shape[2]) != to_expr(x_val.shape[2]):  # the first `seq` outputs: causal, no look-ahead
        return None
    return CausalConv(x, weight, bias if isinstance(bias, fx.Node) else None, kernel, cut)


def causal_conv_over_sequence(node: fx.Node, dims: SymbolicDims) -> CausalConv | None:
    """The causal depthwise conv that `node` starts over the capture's sequence dim (x [batch, C, seq], the batch dim
    not sized by the tokens), or None."""
    conv = causal_depthwise_conv(node)
    x = tensor_meta(conv.x) if conv is not None else None
    if x is None or dims.role_of(x.shape[2]) != "seq" or dims.mentions_seq(x.shape[0]):
        return None
    return conv
