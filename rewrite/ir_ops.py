"""Abstract ops of the rewriter's IR: what passes match and produce before lowering picks kernels.

`rewrite::attention` is the one canonical attention node. Its semantics are exactly those of
`torch.nn.functional.scaled_dot_product_attention` (q, k, v of shape [..., heads, length, dim]),
so any graph holding it still runs; the `lower` stage turns it back into SDPA or a kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_lib = torch.library.Library("rewrite", "FRAGMENT")
_lib.define(
    "attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, float dropout_p=0.0, "
    "bool is_causal=False, float? scale=None, bool enable_gqa=False) -> Tensor"
)


def _attention_composite(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
    )


_lib.impl("attention", _attention_composite, "CompositeImplicitAutograd")

attention = torch.ops.rewrite.attention.default
"""The canonical attention op (OpOverload)."""

SDPA = torch.ops.aten.scaled_dot_product_attention.default
