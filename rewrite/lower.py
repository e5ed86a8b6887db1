"""Lowering: abstract IR ops become concrete kernels chosen by device, dtype and shape."""

from __future__ import annotations

import torch.fx as fx

from rewrite.analysis.nodes import is_op
from rewrite.ir_ops import SDPA, attention


def lower(gm: fx.GraphModule, kernels: str = "auto") -> list[str]:
    """Replace canonical ops by the kernels that run them; returns the nodes lowered."""
    lowered = []
    for node in gm.graph.nodes:
        if is_op(node, attention):
            node.target = SDPA
            lowered.append(node.name)
    if lowered:
        gm.graph.lint()
        gm.recompile()
    return lowered
