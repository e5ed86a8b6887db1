"""In-chunk products under a per-key-dim decay (GLA), on [C, BK] tiles, in float32.

With b the in-chunk cumulative log-decay ([C, BK]), the four products the kernels need are

    lower_scores(x, y)[i, j] = sum_k x_ik y_jk exp(b_ik - b_jk)          (j <= i; A = (q, k))
    upper_scores(x, y)[r, c] = sum_k x_rk y_ck exp(b_ck - b_rk)          (c >= r; A^T = (k, q))
    lower_apply(P, y)[i, k]  = sum_j P_ij y_jk exp(b_ik - b_jk)          (P zero above the diagonal)
    upper_apply(P, y)[r, k]  = sum_c P_rc y_ck exp(b_ck - b_rk)          (P zero below the diagonal)

Fast path: the chunk is cut into sub-chunks of SUB rows; for the rows of sub-chunk s the decay
is split at a reference point inside s, exp(b_i - b_j) = exp(b_i - ref_s) * exp(ref_s - b_j),
which turns each product into SUB-row-selected matrix products (tensor cores). The reference is
b's max over s for the lower forms (every factor <= 1 except exp(ref_s - b_j) for j inside s,
bounded by the spread of b over s) and b's min for the upper forms. When the spread exceeds
LIMIT (log-decays summing below -LIMIT within SUB tokens) that factor could overflow, so the
exact per-pair form runs instead (a loop over the chunk's rows; slow, but only for such gates).
Exponents are clamped only where the product is masked out, so no inf or NaN is formed.
"""

import triton
import triton.language as tl

LIMIT = tl.constexpr(40.0)  # exp(40) ~ 2e17: safe in float32 / tf32 operands of a dot


@triton.jit
def _refs(b, s, C: tl.constexpr, SUB: tl.constexpr):
    """(rows of sub-chunk s, b's max over them, b's min over them)."""
    in_s = (tl.arange(0, C) // SUB) == s
    hi = tl.max(tl.where(in_s[:, None], b, float("-inf")), axis=0)
    lo = tl.min(tl.where(in_s[:, None], b, float("inf")), axis=0)
    return in_s, hi, lo


@triton.jit
def fast_path_ok(b, C: tl.constexpr, SUB: tl.constexpr):
    """Whether b spreads by at most LIMIT inside every sub-chunk (then the fast path is exact)."""
    spread = tl.max(tl.zeros_like(b), axis=0)
    for s in tl.static_range(C // SUB):
        in_s, hi, lo = _refs(b, s, C, SUB)
        spread = tl.maximum(spread, hi - lo)
    return tl.max(spread, axis=0) <= LIMIT


@triton.jit
def _row(x, j, C: tl.constexpr):
    return tl.sum(tl.where((tl.arange(0, C) == j)[:, None], x, 0.0), axis=0)


@triton.jit
def _col(p, j, C: tl.constexpr):
    return tl.sum(tl.where((tl.arange(0, C) == j)[None, :], p, 0.0), axis=1)


@triton.jit
def lower_scores(x, y, b, C: tl.constexpr, SUB: tl.constexpr, PRECISION: tl.constexpr):
    idx = tl.arange(0, C)
    out = tl.zeros([C, C], dtype=tl.float32)
    if fast_path_ok(b, C, SUB):
        for s in tl.static_range(C // SUB):
            in_s, hi, lo = _refs(b, s, C, SUB)
            xs = tl.where(in_s[:, None], x * tl.exp(tl.minimum(b - hi[None, :], 0.0)), 0.0)
            ys = tl.where((idx < (s + 1) * SUB)[:, None], y * tl.exp(tl.minimum(hi[None, :] - b, LIMIT)), 0.0)
            out += tl.dot(xs, tl.trans(ys), input_precision=PRECISION)
    else:
        for j in range(0, C):
            yj, bj = _row(y, j, C), _row(b, j, C)
            col = tl.sum(x * yj[None, :] * tl.exp(tl.minimum(b - bj[None, :], 0.0)), axis=1)
            out = tl.where((idx == j)[None, :], col[:, None], out)
    return out


@triton.jit
def upper_scores(x, y, b, C: tl.constexpr, SUB: tl.constexpr, PRECISION: tl.constexpr):
    idx = tl.arange(0, C)
    out = tl.zeros([C, C], dtype=tl.float32)
    if fast_path_ok(b, C, SUB):
        for s in tl.static_range(C // SUB):
            in_s, hi, lo = _refs(b, s, C, SUB)
            xs = tl.where(in_s[:, None], x * tl.exp(tl.minimum(lo[None, :] - b, 0.0)), 0.0)
            ys = tl.where((idx >= s * SUB)[:, None], y * tl.exp(tl.minimum(b - lo[None, :], LIMIT)), 0.0)
            out += tl.dot(xs, tl.trans(ys), input_precision=PRECISION)
    else:
        for c in range(0, C):
            yc, bc = _row(y, c, C), _row(b, c, C)
            col = tl.sum(x * yc[None, :] * tl.exp(tl.minimum(bc[None, :] - b, 0.0)), axis=1)
            out = tl.where((idx == c)[None, :], col[:, None], out)
    return out


@triton.jit
def lower_apply(p, y, b, C: tl.constexpr, SUB: tl.constexpr, PRECISION: tl.constexpr):
    idx = tl.arange(0, C)
    out = tl.zeros_like(y)
    if fast_path_ok(b, C, SUB):
        for s in tl.static_range(C // SUB):
            in_s, hi, lo = _refs(b, s, C, SUB)
            ys = tl.where((idx < (s + 1) * SUB)[:, None], y * tl.exp(tl.minimum(hi[None, :] - b, LIMIT)), 0.0)
            scale = tl.where(in_s[:, None], tl.exp(tl.minimum(b - hi[None, :], 0.0)), 0.0)
            out += scale * tl.dot(p, ys, input_precision=PRECISION)
    else:
        for j in range(0, C):
            yj, bj = _row(y, j, C), _row(b, j, C)
            out += _col(p, j, C)[:, None] * yj[None, :] * tl.exp(tl.minimum(b - bj[None, :], 0.0))
    return out


@triton.jit
def upper_apply(p, y, b, C: tl.constexpr, SUB: tl.constexpr, PRECISION: tl.constexpr):
    idx = tl.arange(0, C)
    out = tl.zeros_like(y)
    if fast_path_ok(b, C, SUB):
        for s in tl.static_range(C // SUB):
            in_s, hi, lo = _refs(b, s, C, SUB)
            ys = tl.where((idx >= s * SUB)[:, None], y * tl.exp(tl.minimum(b - lo[None, :], LIMIT)), 0.0)
            scale = tl.where(in_s[:, None], tl.exp(tl.minimum(lo[None, :] - b, 0.0)), 0.0)
            out += scale * tl.dot(p, ys, input_precision=PRECISION)
    else:
        for c in range(0, C):
            yc, bc = _row(y, c, C), _row(b, c, C)
            out += _col(p, c, C)[:, None] * yc[None, :] * tl.exp(tl.minimum(bc[None, :] - b, 0.0))
    return out


def sub_chunk(chunk: int) -> int:
    return min(16, chunk)
