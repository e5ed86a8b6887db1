"""Softmaxes that weight values like attention but match no supported attention form.

Such a softmax mixes tokens, so a pass that rewrites attention (mixer, varlen, stateful, sequence
parallel) must not leave it running as if nothing were there: it is reported with what the scores
are made of (a learned bias such as ALiBi or a relative position bias, logit softcapping, ...) so the
pass can refuse naming the layer and the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from rewrite.analysis.attention_sites import CAST_OPS, MATMUL_OPS, SOFTMAX_OPS, AttentionSite
from rewrite.analysis.nodes import is_op, module_path, tensor_meta

aten = torch.ops.aten

_PASS_THROUGH = (
    *CAST_OPS,
    aten.dropout.default,
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.contiguous.default,
    aten.clone.default,
    aten.slice.Tensor,  # probs[..., :-1]: the sink column dropped (GPT-OSS)
)
_SCORE_DEPTH = 8

SUPPORTED_FORMS = (
    "scaled_dot_product_attention, or softmax(q @ k^T * scale [+ mask]) @ v (matmul, bmm or einsum) with "
    "the mask a padding and / or causal mask"
)


@dataclass(frozen=True)
class UnrecognizedAttention:
    """A softmax over the last dim whose output weights values, outside every attention site."""

    node: fx.Node
    module_path: str
    reason: str

    def describe(self) -> str:
        """One line naming the node, its module and why it is not a supported attention form."""
        where = self.module_path or "<root>"
        return f"softmax {self.node.name} in {where}: {self.reason}"


def _weights_values(softmax: fx.Node) -> bool:
    """Whether the softmax output reaches (through casts, dropout, reshapes) a matmul's first operand."""
    frontier = [softmax]
    for _ in range(_SCORE_DEPTH):
        nxt = []
        for cur in frontier:
            for user in cur.users:
                if is_op(user, *MATMUL_OPS) and user.args[0] is cur:
                    return True
                if is_op(user, aten.einsum.default) and len(user.args) > 1 and user.args[1][0] is cur:
                    return True
                if is_op(user, *_PASS_THROUGH):
                    nxt.append(user)
        frontier = nxt
    return False


def _score_ops(softmax: fx.Node) -> set:
    """The aten ops found walking back from the softmax's scores to their matmul (a few steps)."""
    return {node.target for node in _score_nodes(softmax)}


def _score_nodes(softmax: fx.Node) -> list[fx.Node]:
    """The nodes found walking back from the softmax's scores to their matmul (a few steps)."""
    nodes: list[fx.Node] = []
    frontier = [a for a in softmax.args[:1] if isinstance(a, fx.Node)]
    for _ in range(_SCORE_DEPTH):
        nxt = []
        for cur in frontier:
            if cur.op != "call_function" or cur in nodes:
                continue
            nodes.append(cur)
            if not is_op(cur, *MATMUL_OPS):
                nxt.extend(cur.all_input_nodes)
        frontier = nxt
    return nodes


def _reaches_matmul(node: fx.Node) -> bool:
    """Whether `node` is computed from a matmul within a few ops (it carries the scores, not a term added to them)."""
    frontier = [node]
    for _ in range(_SCORE_DEPTH):
        if any(is_op(n, *MATMUL_OPS) for n in frontier):
            return True
        frontier = [a for n in frontier if n.op == "call_function" for a in n.all_input_nodes]
    return False


def _adds_per_head_term(softmax: fx.Node) -> bool:
    """Whether a term that is not the scores and has a head dim (dim -3 of more than one, where a padding or causal
    mask has 1) is added to the scores: a per-head position bias such as ALiBi."""
    for node in _score_nodes(softmax):
        if not is_op(node, aten.add.Tensor, aten.add_.Tensor):
            continue
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        if len(operands) != 2 or not any(_reaches_matmul(a) for a in operands):
            continue
        for term in operands:
            val = tensor_meta(term)
            if _reaches_matmul(term) or val is None or val.dim() < 3:
                continue
            heads = val.shape[-3]
            if isinstance(heads, int) and heads > 1:
                return True
    return False


_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _merged_heads(softmax: fx.Node) -> str | None:
    """How the scores are reshaped on their way from a 3-d matmul to the softmax (batch and heads merged for
    `bmm`, then split again around the mask, as DeBERTa-v2 does), or None when they are not."""
    for node in _score_nodes(softmax):
        if not is_op(node, *_RESHAPES) or not is_op(node.args[0], *MATMUL_OPS):
            continue
        before, after = tensor_meta(node.args[0]), tensor_meta(node)
        if before is None or after is None or before.dim() == after.dim():
            continue
        matmul = node.args[0]
        scaled = [a for a in matmul.args[:2] if is_op(a, aten.div.Tensor, aten.mul.Tensor)
                  and isinstance(a.args[1], fx.Node)]
        scale = (", the scale a tensor dividing k^T" if scaled else "")
        return (f"q @ k^T is computed by a {before.dim()}-d {str(getattr(matmul.target, '__name__', matmul.target)).split('.')[0]} over "
                f"batch and heads merged and reshaped to {after.dim()}-d scores before the mask and softmax (as "
                f"DeBERTa-v2 computes attention{scale}); the analysis recognises only q, k, v in one layout "
                "[.., heads, L, D] from q @ k^T through the softmax to the product with v")
    return None


def _reason(softmax: fx.Node) -> str:
    ops = _score_ops(softmax)
    if aten.cat.default in ops:
        return ("extra logits are concatenated to q @ k^T before the softmax (learned attention sinks, as in "
                "GPT-OSS), which no supported attention form models")
    if aten.tanh.default in ops:
        return "the scores pass through tanh (logit softcapping), which no supported attention form models"
    if aten.baddbmm.default in ops:
        return ("the scores are baddbmm(bias, q, k^T) with a scale or bias the analysis does not model (ALiBi "
                "or another learned position bias)")
    if sum(1 for op in ops if op in (aten.add.Tensor, aten.add_.Tensor)) >= 2:
        return ("more than one term is added to q @ k^T (a relative position bias or another learned bias "
                "next to the mask)")
    if _adds_per_head_term(softmax):
        return ("a term that differs per head is added to q @ k^T (ALiBi or another position bias), which no supported "
                "attention form models")
    einsums = [n for n in _score_nodes(softmax) if is_op(n, aten.einsum.default)]
    if einsums and not ops & set(MATMUL_OPS):
        equation = str(einsums[-1].args[0]).replace(" ", "")
        return (f"the scores are einsum({equation!r}), not of the form '...qd,...kd->...qk' with q, k, v in one layout "
                "[.., heads, L, D] (the same leading letters, the tokens and the head dim last), which is the only "
                "einsum the analysis recognises; permute q, k and v to [batch, heads, L, D] before the einsums")
    if not ops & set(MATMUL_OPS):
        return "the scores do not come from a matmul of queries and keys within a few ops"
    merged = _merged_heads(softmax)
    if merged is not None:
        return merged
    if any(is_op(n, aten.where.self) and any(_reaches_matmul(a) for a in n.args[1:3] if isinstance(a, fx.Node))
           for n in _score_nodes(softmax)):
        return ("a mask is applied to q @ k^T by where(condition, scores, fill) with a fill that is not a constant "
                "lowest value (-inf or the dtype's lowest float), or in float16 next to an additive mask; the "
                "supported forms apply a mask by adding it, by masked_fill with -inf, or by where(keep, scores, "
                "lowest) (load the model with attn_implementation='sdpa' where its family offers it)")
    names = ", ".join(sorted(str(getattr(op, "__name__", op)) for op in ops))
    return f"the scores are built by ops the analysis does not recognise as attention ({names})"


def find_unrecognized_attention(gm: fx.GraphModule, sites: list[AttentionSite]) -> list[UnrecognizedAttention]:
    """Every last-dim softmax that weights values but belongs to no attention site, in graph order."""
    chained = {id(n) for s in sites for n in s.chain}
    found = []
    for node in gm.graph.nodes:
        if not is_op(node, *SOFTMAX_OPS) or id(node) in chained:
            continue
        val = tensor_meta(node)
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if val is None or dim not in (-1, val.dim() - 1) or not _weights_values(node):
            continue
        found.append(UnrecognizedAttention(node, module_path(node), _reason(node)))
    return found
