"""Lowering: abstract IR ops become concrete kernels chosen by device, dtype and shape."""

from __future__ import annotations

import torch.fx as fx

from rewrite.analysis.nodes import is_op
from rewrite.ir_ops import SDPA, attention


def lower(gm: fx.GraphModule, kernels: str = "auto") -> list[str]:
    """Replace canonical ops by the kernels that run them, in `gm` and in the bodies of its routed
    blocks (the `layer_skip` pass); returns the nodes lowered."""
    from rewrite.routing.graph import is_routed_block

    lowered = []
    for node in gm.graph.nodes:
        if is_op(node, attention):
            node.target = SDPA
            lowered.append(node.name)
        elif is_routed_block(node):
            body = node.target.body  # type: ignore[union-attr]
            lowered += [f"{node.name}.{name}" for name in lower(body, kernels)]
    if lowered:
        gm.graph.lint()
        gm.recompile()
    return lowered
