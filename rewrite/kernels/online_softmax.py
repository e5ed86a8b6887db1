"""The online-softmax update shared by the Triton attention kernels (base-2 scores)."""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
"""Scores are scaled by scale * LOG2E so that the kernels exponentiate with exp2."""


@triton.jit
def online_softmax_update(acc, m_i, l_i, s, v, PRECISION: tl.constexpr):
    """Fold one tile of scores s [M, N] (log2 units, -inf where hidden) and its values v [N, V] into the running
    output acc [M, V], row maxima m_i [M] and row sums l_i [M]; returns the new (acc, m_i, l_i)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i
