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

Implementations of the fast path, chosen per launch by the PATH constexpr (the launchers read
`SUB_PRODUCTS`, so they can be timed side by side in one process):
- 0 masked (v4): per sub-chunk s, a full [C, BK] x [BK, C] (or [C, C] x [C, BK]) product with the
  rows outside s zeroed, and two [C, BK] exps: 4x the needed product work, 2 * C / SUB exps per element.
- 1 batched (v5): the chunk viewed as [C / SUB, SUB, BK]; the per-sub-chunk references are
  [C / SUB, BK] reductions, the row side's factor is one exp per element, and all sub-chunk products
  are one batched dot ([C / SUB, SUB, BK] x [C / SUB, BK, C]): no zeroed rows. The other side's
  factor still depends on the sub-chunk ([C / SUB, C, BK]: C / SUB exps per element).
- 2 whole (v5): when b spreads by at most LIMIT over the whole chunk (in this K tile), the reference
  is b's max (min) over the whole chunk: one exp per element on each side and one plain
  [C, BK] x [BK, C] dot, as for a scalar decay; else the batched form; else the exact form.
All use the same kind of factors (exp(b - ref) <= 1 on one side, exp(ref - b) <= exp(LIMIT) on the
other), the same clamps and the same sub-chunk LIMIT test for the exact form, so they agree up to
float rounding. The whole-chunk test holds for typical gates (e.g. logsigmoid(x) / 16) and fails
for strong ones (a mean log-decay below -40 / 64 per token), which then take the sub-chunk forms.
"""

import triton
import triton.language as tl

LIMIT = tl.constexpr(40.0)  # exp(40) ~ 2e17: safe in float32 / tf32 operands of a dot

# Fast-path implementation (the PATH constexpr) of the forward output kernel ("forward") and of the
# backward's dq/dk and dv kernels ("backward"): "masked" (v4), "batched" or "whole" (v5; see above).
# Read at every launch, so benchmarks.linear_attention --sweep times them side by side.
PATHS = {"masked": 0, "batched": 1, "whole": 2}
SUB_PRODUCTS = {"forward": "whole", "backward": "whole"}
# v5 "whole" is the default since its GPU check and timing (H100, triton 3.6, 2026-12-06; NOTES.md, v5):
# fwd 2.29 vs 3.86 ms and fwd+bwd 12.5 vs 16.4 ms for v4 at L=32K, the same errors against fp64.


# Operands of the hoisted kernels' whole-chunk score products, q * exp(b - top) against k * exp(top - b) (v13, a
# sweep variant: 1.5% off fwd+bwd at 32K on an H100, NOTES.md, so it stays "float32"): "float32" (TF32 products) or "input" (rounded to the input dtype first, one bf16
# product, as FLA's intra-chunk kernels do). Only bfloat16 inputs take "input": k * exp(top - b) reaches
# exp(LIMIT) |k|, past float16's range. The scores feed o and dv only; dq / dk (whose cancellation dg sees) keep
# float32.
SCORE_OPERANDS = "float32"


def low_scores(dtype) -> bool:
    """The hoisted kernels' LOW_SCORES constexpr for inputs of `dtype` under the current SCORE_OPERANDS."""
    return SCORE_OPERANDS == "input" and str(dtype) == "torch.bfloat16"


def path(part: str) -> int:
    """The PATH constexpr for `part` ("forward" or "backward") under the current SUB_PRODUCTS."""
    return PATHS[SUB_PRODUCTS[part]]


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
def _lower_scores_exact(x, y, b, C: tl.constexpr):
    """The exact per-pair form (a loop over the chunk's rows), for gates past the fast path's limit."""
    idx = tl.arange(0, C)
    out = tl.zeros([C, C], dtype=tl.float32)
    for j in range(0, C):
        yj, bj = _row(y, j, C), _row(b, j, C)
        col = tl.sum(x * yj[None, :] * tl.exp(tl.minimum(b - bj[None, :], 0.0)), axis=1)
        out = tl.where((idx == j)[None, :], col[:, None], out)
    return out


@triton.jit
def _upper_scores_exact(x, y, b, C: tl.constexpr):
    """The exact per-pair form (a loop over the chunk's rows), for gates past the fast path's limit."""
    idx = tl.arange(0, C)
    out = tl.zeros([C, C], dtype=tl.float32)
    for c in range(0, C):
        yc, bc = _row(y, c, C), _row(b, c, C)
        col = tl.sum(x * yc[None, :] * tl.exp(tl.minimum(bc[None, :] - b, 0.0)), axis=1)
        out = tl.where((idx == c)[None, :], col[:, None], out)
    return out


@triton.jit
def _lower_apply_exact(p, y, b, C: tl.constexpr):
    """The exact per-pair form (a loop over the chunk's rows), for gates past the fast path's limit."""
    out = tl.zeros_like(y)
    for j in range(0, C):
        yj, bj = _row(y, j, C), _row(b, j, C)
        out += _col(p, j, C)[:, None] * yj[None, :] * tl.exp(tl.minimum(b - bj[None, :], 0.0))
    return out


@triton.jit
def _upper_apply_exact(p, y, b, C: tl.constexpr):
    """The exact per-pair form (a loop over the chunk's rows), for gates past the fast path's limit."""
    out = tl.zeros_like(y)
    for c in range(0, C):
        yc, bc = _row(y, c, C), _row(b, c, C)
        out += _col(p, c, C)[:, None] * yc[None, :] * tl.exp(tl.minimum(bc[None, :] - b, 0.0))
    return out


@triton.jit
def _lower_scores_masked(x, y, b, C: tl.constexpr, SUB: tl.constexpr, PRECISION: tl.constexpr):
    idx = tl.arange(0, C)
    out = tl.zeros([C, C], dtype=tl.float32)
    if fast_path_ok(b, C, SUB):
        for s in tl.static_range(C // SUB):
            in_s, hi, lo = _refs(b, s, C, SUB)
            xs = tl.where(in_s[:, None], x * tl.exp(tl.minimum(b - hi[None, :], 0.0)), 0.0)
            ys = tl.where((idx < (s + 1) * SUB)[:, None], y * tl.exp(tl.minimum(hi[None, :] - b, LIMIT)), 0.0)
            out += tl.dot(xs, tl.trans(ys), input_precision=PRECISION)
    else:
        out = _lower_scores_exact(x, y, b, C)
    return out


@triton.jit
def _upper_scores_masked(x, y, b, C: tl.constexpr, SUB: tl.constexpr, PRECISION: tl.constexpr):
    idx = tl.arange(0, C)
    out = tl.zeros([C, C], dtype=tl.float32)
    if fast_path_ok(b, C, SUB):
        for s in tl.static_range(C // SUB):
            in_s, hi, lo = _refs(b, s, C, SUB)
            xs = tl.where(in_s[:, None], x * tl.exp(tl.minimum(lo[None, :] - b, 0.0)), 0.0)
            ys = tl.where((idx >= s * SUB)[:, None], y * tl.exp(tl.minimum(b - lo[None, :], LIMIT)), 0.0)
            out += tl.dot(xs, tl.trans(ys), input_precision=PRECISION)
    else:
        out = _upper_scores_exact(x, y, b, C)
    return out


@triton.jit
def _lower_apply_masked(p, y, b, C: tl.constexpr, SUB: tl.constexpr, PRECISION: tl.constexpr):
    idx = tl.arange(0, C)
    out = tl.zeros_like(y)
    if fast_path_ok(b, C, SUB):
        for s in tl.static_range(C // SUB):
            in_s, hi, lo = _refs(b, s, C, SUB)
            ys = tl.where((idx < (s + 1) * SUB)[:, None], y * tl.exp(tl.minimum(hi[None, :] - b, LIMIT)), 0.0)
            scale = tl.where(in_s[:, None], tl.exp(tl.minimum(b - hi[None, :], 0.0)), 0.0)
            out += scale * tl.dot(p, ys, input_precision=PRECISION)
    else:
        out = _lower_apply_exact(p, y, b, C)
    return out


@triton.jit
def _upper_apply_masked(p, y, b, C: tl.constexpr, SUB: tl.constexpr, PRECISION: tl.constexpr):
    idx = tl.arange(0, C)
    out = tl.zeros_like(y)
    if fast_path_ok(b, C, SUB):
        for s in tl.static_range(C // SUB):
            in_s, hi, lo = _refs(b, s, C, SUB)
            ys = tl.where((idx >= s * SUB)[:, None], y * tl.exp(tl.minimum(b - lo[None, :], LIMIT)), 0.0)
            scale = tl.where(in_s[:, None], tl.exp(tl.minimum(lo[None, :] - b, 0.0)), 0.0)
            out += scale * tl.dot(p, ys, input_precision=PRECISION)
    else:
        out = _upper_apply_exact(p, y, b, C)
    return out


@triton.jit
def _blocks(b, C: tl.constexpr, SUB: tl.constexpr):
    """(b as [C / SUB, SUB, BK], its max and min over each sub-chunk [C / SUB, BK], fast path ok)."""
    b3 = tl.reshape(b, [C // SUB, SUB, b.shape[1]])
    hi = tl.max(b3, axis=1)
    lo = tl.min(b3, axis=1)
    ok = tl.max(tl.max(hi - lo, axis=1), axis=0) <= LIMIT
    return b3, hi, lo, ok


@triton.jit
def _upto(C: tl.constexpr, SUB: tl.constexpr):
    """[C / SUB, C]: row j of the chunk is before the end of sub-chunk s."""
    return tl.arange(0, C)[None, :] < (tl.arange(0, C // SUB)[:, None] + 1) * SUB


@triton.jit
def _from(C: tl.constexpr, SUB: tl.constexpr):
    """[C / SUB, C]: row j of the chunk is at or after the start of sub-chunk s."""
    return tl.arange(0, C)[None, :] >= tl.arange(0, C // SUB)[:, None] * SUB


@triton.jit
def _whole(b, WHOLE: tl.constexpr):
    """(b's max and min over the whole chunk [BK], whether its spread is within LIMIT); False without WHOLE."""
    top = tl.max(b, axis=0)
    bot = tl.min(b, axis=0)
    if WHOLE:
        ok = tl.max(top - bot, axis=0) <= LIMIT
    else:
        ok = False
    return top, bot, ok


@triton.jit
def whole_chunk(b, WHOLE: tl.constexpr):
    """`_whole` for kernels that compute the whole-chunk form's factors once per kv head (v7) and apply
    them to each q head of the group: (b's max, b's min over the chunk [BK], whether the form holds)."""
    return _whole(b, WHOLE)


@triton.jit
def _lower_scores_sub(x, y, b, C: tl.constexpr, SUB: tl.constexpr, PRECISION: tl.constexpr):
    b3, hi, lo, ok = _blocks(b, C, SUB)
    if ok:
        xs = tl.reshape(x, [C // SUB, SUB, x.shape[1]]) * tl.exp(tl.minimum(b3 - hi[:, None, :], 0.0))
        ys = y[None, :, :] * tl.exp(tl.minimum(hi[:, None, :] - b[None, :, :], LIMIT))
        ys = tl.where(_upto(C, SUB)[:, :, None], ys, 0.0)
        out = tl.reshape(tl.dot(xs, tl.permute(ys, (0, 2, 1)), input_precision=PRECISION), [C, C])
    else:
        out = _lower_scores_exact(x, y, b, C)
    return out


@triton.jit
def _upper_scores_sub(x, y, b, C: tl.constexpr, SUB: tl.constexpr, PRECISION: tl.constexpr):
    b3, hi, lo, ok = _blocks(b, C, SUB)
    if ok:
        xs = tl.reshape(x, [C // SUB, SUB, x.shape[1]]) * tl.exp(tl.minimum(lo[:, None, :] - b3, 0.0))
        ys = y[None, :, :] * tl.exp(tl.minimum(b[None, :, :] - lo[:, None, :], LIMIT))
        ys = tl.where(_from(C, SUB)[:, :, None], ys, 0.0)
        out = tl.reshape(tl.dot(xs, tl.permute(ys, (0, 2, 1)), input_precision=PRECISION), [C, C])
    else:
        out = _upper_scores_exact(x, y, b, C)
    return out


@triton.jit
def _lower_apply_sub(p, y, b, C: tl.constexpr, SUB: tl.constexpr, PRECISION: tl.constexpr):
    b3, hi, lo, ok = _blocks(b, C, SUB)
    if ok:
        ys = y[None, :, :] * tl.exp(tl.minimum(hi[:, None, :] - b[None, :, :], LIMIT))
        ys = tl.where(_upto(C, SUB)[:, :, None], ys, 0.0)
        out3 = tl.dot(tl.reshape(p, [C // SUB, SUB, C]), ys, input_precision=PRECISION)
        out = tl.reshape(out3 * tl.exp(tl.minimum(b3 - hi[:, None, :], 0.0)), [C, y.shape[1]])
    else:
        out = _lower_apply_exact(p, y, b, C)
    return out


@triton.jit
def _upper_apply_sub(p, y, b, C: tl.constexpr, SUB: tl.constexpr, PRECISION: tl.constexpr):
    b3, hi, lo, ok = _blocks(b, C, SUB)
    if ok:
        ys = y[None, :, :] * tl.exp(tl.minimum(b[None, :, :] - lo[:, None, :], LIMIT))
        ys = tl.where(_from(C, SUB)[:, :, None], ys, 0.0)
        out3 = tl.dot(tl.reshape(p, [C // SUB, SUB, C]), ys, input_precision=PRECISION)
        out = tl.reshape(out3 * tl.exp(tl.minimum(lo[:, None, :] - b3, 0.0)), [C, y.shape[1]])
    else:
        out = _upper_apply_exact(p, y, b, C)
    return out


@triton.jit
def lower_scores(x, y, b, C: tl.constexpr, SUB: tl.constexpr, PRECISION: tl.constexpr, PATH: tl.constexpr):
    """(lower_scores(x, y), x * exp(b)): the second for the forward's state term, which the whole-chunk
    form gets from its own factor (x * exp(b - top) * exp(top): no second [C, BK] exp)."""
    top, bot, whole = _whole(b, PATH == 2)
    if whole:
        xs = x * tl.exp(tl.minimum(b - top[None, :], 0.0))
        ys = y * tl.exp(tl.minimum(top[None, :] - b, LIMIT))
        out = tl.dot(xs, tl.trans(ys), input_precision=PRECISION)
        xd = xs * tl.exp(top)[None, :]
    else:
        if PATH == 0:
            out = _lower_scores_masked(x, y, b, C, SUB, PRECISION)
        else:
            out = _lower_scores_sub(x, y, b, C, SUB, PRECISION)
        xd = x * tl.exp(b)
    return out, xd


@triton.jit
def upper_scores(x, y, b, C: tl.constexpr, SUB: tl.constexpr, PRECISION: tl.constexpr, PATH: tl.constexpr):
    top, bot, whole = _whole(b, PATH == 2)
    if whole:
        xs = x * tl.exp(tl.minimum(bot[None, :] - b, 0.0))
        ys = y * tl.exp(tl.minimum(b - bot[None, :], LIMIT))
        out = tl.dot(xs, tl.trans(ys), input_precision=PRECISION)
    elif PATH == 0:
        out = _upper_scores_masked(x, y, b, C, SUB, PRECISION)
    else:
        out = _upper_scores_sub(x, y, b, C, SUB, PRECISION)
    return out


@triton.jit
def lower_apply(p, y, b, C: tl.constexpr, SUB: tl.constexpr, PRECISION: tl.constexpr, PATH: tl.constexpr,
                STRONG_PRECISION: tl.constexpr):
    """STRONG_PRECISION: the products' input precision in chunks the whole-chunk form does not hold."""
    top, bot, whole = _whole(b, PATH == 2)
    if whole:
        ys = y * tl.exp(tl.minimum(top[None, :] - b, LIMIT))
        out = tl.dot(p, ys, input_precision=PRECISION) * tl.exp(tl.minimum(b - top[None, :], 0.0))
    elif PATH == 0:
        out = _lower_apply_masked(p, y, b, C, SUB, STRONG_PRECISION)
    else:
        out = _lower_apply_sub(p, y, b, C, SUB, STRONG_PRECISION)
    return out


@triton.jit
def upper_apply(p, y, b, C: tl.constexpr, SUB: tl.constexpr, PRECISION: tl.constexpr, PATH: tl.constexpr,
                STRONG_PRECISION: tl.constexpr):
    top, bot, whole = _whole(b, PATH == 2)
    if whole:
        ys = y * tl.exp(tl.minimum(b - bot[None, :], LIMIT))
        out = tl.dot(p, ys, input_precision=PRECISION) * tl.exp(tl.minimum(bot[None, :] - b, 0.0))
    elif PATH == 0:
        out = _upper_apply_masked(p, y, b, C, SUB, STRONG_PRECISION)
    else:
        out = _upper_apply_sub(p, y, b, C, SUB, STRONG_PRECISION)
    return out


def sub_chunk(chunk: int) -> int:
    return min(16, chunk)
