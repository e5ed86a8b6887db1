"""Decide whether an attention mask is causal by evaluating the graph that builds it on example inputs.

Hugging Face models fold causality and padding into one mask tensor; the graph that builds it is
small (it reads only the inputs' shapes and the padding mask), so running it once is cheap and
exact for those inputs. A mask is called causal when every key after its query is hidden and no
row is fully hidden for queries whose own position is visible. A mask built from input *shapes*
alone (no padding mask among the inputs) is the same for every input of those shapes, so a
causal one can be replaced by SDPA's `is_causal=True`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from rewrite.analysis.attention_sites import find_attention_sites

CAUSAL_KEY = "rewrite_mask_causal"
SHAPE_ONLY_KEY = "rewrite_mask_shape_only"


def _reads_input_values(mask: fx.Node) -> bool:
    """Whether the mask is computed from the *values* of a model input (not only from shapes)."""
    seen: set[fx.Node] = set()
    stack = [mask]
    while stack:
        cur = stack.pop()
        if cur in seen:
            continue
        seen.add(cur)
        if cur.op == "placeholder" and not cur.meta.get("state_name"):
            return True
        for arg in cur.all_input_nodes:
            if arg.op == "placeholder" and cur.op == "call_function" and _is_shape_read(cur):
                continue
            stack.append(arg)
    return False


def _is_shape_read(node: fx.Node) -> bool:
    name = getattr(node.target, "__name__", str(node.target))
    return name.startswith("sym_size") or name.startswith("sym_numel") or name.startswith("sym_stride")


def _ancestors(nodes: list[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        cur = stack.pop()
        if cur in seen:
            continue
        seen.add(cur)
        stack.extend(cur.all_input_nodes)
    return seen


def _is_causal_mask(mask: torch.Tensor) -> bool:
    if mask.dim() < 2 or mask.shape[-1] != mask.shape[-2]:
        return False
    visible = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    n = visible.shape[-1]
    future = torch.ones(n, n, dtype=torch.bool, device=visible.device).triu(1)
    return not bool((visible & future).any())


def annotate_mask_causality(gm: fx.GraphModule, flat_inputs: list[Any]) -> dict[str, bool]:
    """Evaluate every attention mask on `flat_inputs`; record in node.meta whether it is causal."""
    sites = [s for s in find_attention_sites(gm) if isinstance(s.mask, fx.Node)]
    negated = {s.mask: s.mask_negated for s in sites}
    masks = list(negated)
    if not masks:
        return {}
    keep = _ancestors(masks)
    if any(n.op == "call_module" for n in keep):
        return {}
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node in keep or node.op == "placeholder":
            env[node] = sub.node_copy(node, lambda n: env[n])
    sub.output(tuple(env[m] for m in masks))
    runner = fx.GraphModule(gm, sub)
    with torch.no_grad():
        try:
            values = runner(*flat_inputs)
        except Exception:  # the mask graph needs something we cannot give it: leave masks undecided
            return {}
    out = {}
    for node, val in zip(masks, values):
        if isinstance(val, torch.Tensor):
            if negated[node]:
                val = ~val if val.dtype == torch.bool else val
            node.meta[CAUSAL_KEY] = _is_causal_mask(val)
            node.meta[SHAPE_ONLY_KEY] = not _reads_input_values(node)
            out[node.name] = node.meta[CAUSAL_KEY]
    return out
