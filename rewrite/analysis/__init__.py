"""Analysis every pass uses: attention sites, blocks, symbolic dims, a networkx view."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from rewrite.analysis.attention_sites import AttentionSite, find_attention_sites
from rewrite.analysis.blocks import Block, find_blocks
from rewrite.analysis.graph_view import to_networkx
from rewrite.analysis.nodes import module_path
from rewrite.analysis.projections import Projection, find_projection
from rewrite.analysis.shapes import BATCH, SEQ, SymbolicDims, infer_dims
from rewrite.analysis.unrecognized_attention import (
    SUPPORTED_FORMS,
    UnrecognizedAttention,
    find_unrecognized_attention,
)


@dataclass
class GraphAnalysis:
    """What the analysis found in one graph."""

    sites: list[AttentionSite]
    blocks: list[Block]
    dims: SymbolicDims
    notes: list[str] = field(default_factory=list)
    unrecognized: list[UnrecognizedAttention] = field(default_factory=list)
    _block_by_node: dict[fx.Node, Block] | None = field(default=None, init=False, repr=False, compare=False)

    def block_holding(self, node: fx.Node) -> Block | None:
        """The block whose nodes, as the analysis found them, include `node` (None outside every block)."""
        if self._block_by_node is None:
            self._block_by_node = {}
            for block in self.blocks:  # the first block listing a node holds it
                for n in block.nodes:
                    self._block_by_node.setdefault(n, block)
        return self._block_by_node.get(node)

    def block_label(self, node: fx.Node, outside: str | None = None) -> str:
        """`layer I (the block's path)` for the block holding `node`; outside every block, `outside` when given, else
        node's module path (`<root>` for none)."""
        block = self.block_holding(node)
        if block is not None:
            return f"layer {block.index} ({block.path})"
        return (module_path(node) if outside is None else outside) or "<root>"

    def node_label(self, node: fx.Node) -> str:
        """How messages name the layer holding `node`: `layer I (node's module path)`, or the module path outside
        blocks (as `site_label` names a site)."""
        path = module_path(node) or "<root>"
        block = self.block_holding(node)
        return f"layer {block.index} ({path})" if block is not None else path

    def block_of(self, site: AttentionSite) -> Block | None:
        for block in self.blocks:
            if any(s is site for s in block.sites):
                return block
        return None

    def site_label(self, site: AttentionSite) -> str:
        """How messages name a site: `layer I (module path)`, with the call's number when one module
        runs several times in a block (ALBERT's shared layer), or the module path outside blocks."""
        path = site.module_path or "<root>"
        block = self.block_of(site)
        if block is None:
            return path
        calls = [s for s in block.sites if s.module_path == site.module_path]
        if len(calls) > 1:
            number = next(i for i, s in enumerate(calls) if s is site) + 1
            path = f"{path}, call {number} of {len(calls)}"
        return f"layer {block.index} ({path})"


def analyze(gm: fx.GraphModule) -> GraphAnalysis:
    """Analyze `gm` afresh (cheap: linear in the number of nodes)."""
    sites = find_attention_sites(gm)
    blocks = find_blocks(gm, sites)
    dims = infer_dims(gm, sites)
    unrecognized = find_unrecognized_attention(gm, sites)
    return GraphAnalysis(sites=sites, blocks=blocks, dims=dims, unrecognized=unrecognized)


__all__ = [
    "BATCH",
    "SEQ",
    "SUPPORTED_FORMS",
    "AttentionSite",
    "Block",
    "GraphAnalysis",
    "Projection",
    "SymbolicDims",
    "UnrecognizedAttention",
    "analyze",
    "find_attention_sites",
    "find_blocks",
    "find_projection",
    "find_unrecognized_attention",
    "infer_dims",
    "to_networkx",
]
