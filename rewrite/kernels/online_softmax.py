"""The online softmax shared by the Triton attention kernels (base-2 scores): start, update, finish."""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
"""Scores are scaled by scale * LOG2E so that the kernels exponentiate with exp2."""


@triton.jit
def online_softmax_start(BM: tl.constexpr, BV: tl.constexpr):
    """Empty running (acc [BM, BV], m_i [BM], l_i [BM]); m_i starts finite so that a fully masked tile gives
    p = 0, not NaN."""
    acc = tl.zeros([BM, BV], dtype=tl.float32)
    m_i = tl.full([BM], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    return acc, m_i, l_i


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


@triton.jit
def online_softmax_finish(acc, m_i, l_i):
    """(o = acc / l_i, the rows' log-sum-exp in log2 units m_i + log2(l_i)); a row that saw nothing gives o = 0
    and m_i (callers that need -inf there test l_i > 0)."""
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    return acc / l_safe[:, None], m_i + tl.log2(l_safe)
