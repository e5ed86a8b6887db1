"""Pass `attention_normalize`: every attention form becomes one canonical `rewrite.attention` node."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from rewrite.analysis import AttentionSite
from rewrite.analysis.mask_probe import CHUNK_KEY, UNSEEN_CHUNK_KEY, UNSEEN_WINDOW_KEY
from rewrite.analysis.nodes import is_op
from rewrite.ir_ops import SDPA, attention
from rewrite.passes import register_pass
from rewrite.passes.base import GraphPass, PassContext, PassResult

aten = torch.ops.aten


@dataclass
class AttentionNormalizeOptions:
    unfused: bool = field(default=True, metadata={"help": "also fold matmul→softmax→matmul chains"})
    causal_masks: bool = field(
        default=True,
        metadata={"help": "replace a mask built from shapes alone and proven causal by is_causal=True (flash-eligible)"},
    )


def _replace_fused(gm: fx.GraphModule, site: AttentionSite) -> None:
    site.node.target = attention


def _use_is_causal(node: fx.Node, site: AttentionSite) -> None:
    """Drop a purely causal, input-independent mask in favour of `is_causal=True`."""
    node.args = (site.q, site.k, site.v)
    node.kwargs = {
        "attn_mask": None,
        "dropout_p": site.dropout_p,
        "is_causal": True,
        "scale": site.scale,
        "enable_gqa": site.enable_gqa,
    }


def _replace_unfused(gm: fx.GraphModule, site: AttentionSite) -> None:
    graph = gm.graph
    final = site.node
    with graph.inserting_before(final):
        mask = site.mask
        if mask is not None and site.mask_negated:
            mask = graph.call_function(aten.logical_not.default, (mask,))
            mask.meta = dict(site.mask.meta)
        new = graph.call_function(
            attention,
            (site.q, site.k, site.v),
            {"attn_mask": mask, "dropout_p": site.dropout_p, "is_causal": False, "scale": site.scale},
        )
    new.meta = dict(final.meta)
    final.replace_all_uses_with(new)
    site.node = new
    for node in reversed(site.chain):
        for user in list(node.users):
            if is_op(user, aten._assert_tensor_metadata.default):
                graph.erase_node(user)
        if not node.users and node.graph is graph:
            graph.erase_node(node)


@register_pass
class AttentionNormalize(GraphPass):
    """Rewrite SDPA calls and unfused softmax-attention chains into the canonical attention op."""

    name = "attention_normalize"
    summary = "rewrite every attention form (SDPA, matmul-softmax-matmul) into one canonical attention node"
    Options = AttentionNormalizeOptions

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(self.name)
        for site in ctx.analysis().sites:
            where = f"{site.name} ({site.module_path or '<root>'})"
            if site.form == "canonical":
                continue
            result.matched += 1
            if site.problem is not None:
                result.messages.append(f"left {where} unfused: {site.problem}")
                continue
            if site.form == "sdpa" and is_op(site.node, SDPA):
                _replace_fused(gm, site)
            elif site.form == "unfused" and self.options.unfused:
                _replace_unfused(gm, site)
            else:
                continue
            note = ""
            if self.options.causal_masks and site.mask is not None and site.mask_exactly_causal and site.mask_shape_only:
                _use_is_causal(site.node, site)
                note = " (causal mask -> is_causal)"
            elif isinstance(site.mask, fx.Node) and site.mask.meta.get(UNSEEN_WINDOW_KEY):
                window = site.mask.meta[UNSEEN_WINDOW_KEY]
                note = (f" (mask kept: its graph offsets positions by up to {window}, more than the example shows; "
                        f"an example of at least {window + 2} tokens lets the pass tell whether it is causal)")
            elif isinstance(site.mask, fx.Node) and site.mask.meta.get(UNSEEN_CHUNK_KEY):
                chunk = site.mask.meta[UNSEEN_CHUNK_KEY]
                note = (f" (mask kept: its graph cuts positions into chunks of {chunk} tokens, chunked local attention "
                        f"the example is too short to show; an example of at least {chunk + 1} tokens shows it)")
            elif isinstance(site.mask, fx.Node) and site.mask.meta.get(CHUNK_KEY):
                note = f" (mask kept: chunked local attention, chunks of {site.mask.meta[CHUNK_KEY]} tokens)"
            result.changed.append(where + note)
        for found in ctx.analysis().unrecognized:
            result.messages.append(f"left {found.describe()}")
        gm.graph.lint()
        ctx.invalidate()
        return result
