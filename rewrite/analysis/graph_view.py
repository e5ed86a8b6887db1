"""A networkx view of an FX graph, for graph algorithms (paths, dominators) and DOT output."""

from __future__ import annotations

import networkx as nx
import torch.fx as fx

from rewrite.analysis.nodes import module_path, op_name


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """Directed graph with one vertex per FX node (by name) and an edge per data dependency."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node.name, op=op_name(node), module=module_path(node), kind=node.op)
        for arg in node.all_input_nodes:
            g.add_edge(arg.name, node.name)
    return g
