"""Find the repeated blocks (decoder/encoder layers) of a captured model from `nn_module_stack`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch.fx as fx

from rewrite.analysis.attention_sites import AttentionSite
from rewrite.analysis.nodes import module_stack


@dataclass
class Block:
    """One layer of the model: its index among its siblings, module path and class."""

    index: int
    path: str
    cls: str
    sites: list[AttentionSite] = field(default_factory=list)
    nodes: list[fx.Node] = field(default_factory=list)


def _indexed_entries(node: fx.Node) -> list[tuple[str, str, str, int]]:
    """(container, block path, class, index) for every numbered module on `node`'s stack, outermost first.

    A numbered module need not be called itself (a ModuleDict inside a ModuleList is only indexed),
    so every prefix of a stack path that ends in a number counts.
    """
    out: list[tuple[str, str, str, int]] = []
    seen: set[str] = set()
    for path, cls in module_stack(node):
        parts = path.split(".")
        for i in range(1, len(parts)):
            if parts[i].isdigit():
                block_path = ".".join(parts[: i + 1])
                if block_path not in seen:
                    seen.add(block_path)
                    owner_cls = cls if block_path == path else ""
                    out.append((".".join(parts[:i]), block_path, owner_cls, int(parts[i])))
    return out


def find_blocks(gm: fx.GraphModule, sites: list[AttentionSite]) -> list[Block]:
    """Blocks in index order: the indexed children of the container that holds the attention sites."""
    votes: Counter[str] = Counter()
    for site in sites:
        entries = _indexed_entries(site.node)
        if entries:
            votes[entries[0][0]] += 1
    if not votes:
        all_entries = Counter(e[0] for n in gm.graph.nodes for e in _indexed_entries(n)[:1])
        if not all_entries:
            return [_whole_model_block(gm, sites)] if sites else []
        container = all_entries.most_common(1)[0][0]
    else:
        container = votes.most_common(1)[0][0]
    blocks: dict[str, Block] = {}
    for node in gm.graph.nodes:
        for cont, path, cls, idx in _indexed_entries(node):
            if cont == container:
                block = blocks.setdefault(path, Block(index=idx, path=path, cls=""))
                if cls and not block.cls:
                    block.cls = cls.rsplit(".", 1)[-1]
                block.nodes.append(node)
                break
    for site in sites:
        for cont, path, _cls, _idx in _indexed_entries(site.node):
            if cont == container and path in blocks:
                blocks[path].sites.append(site)
                break
    return sorted(blocks.values(), key=lambda b: b.index)


def _whole_model_block(gm: fx.GraphModule, sites: list[AttentionSite]) -> Block:
    owner = sites[0].module_path if sites else ""
    return Block(index=0, path=owner, cls="", sites=list(sites), nodes=list(gm.graph.nodes))
