"""Triton kernels for the short causal conv and their launchers; see `reference.py` for the math.

Tokens are addressed flat (row r of x.view(B * T, D)); every row knows its sequence and the
sequence's first row (computed for dense batches, looked up for packed cu_seqlens inputs), so
both share one kernel. Tiles are [BT tokens, BD channels]; the W taps are unrolled (W is a
constexpr), and shifted tiles are re-read from L1/L2, so device memory sees each input once.

The backward is one pass: each program recomputes dz = dy * act'(z) at its rows and the W - 1
rows after them (W shifted recomputations instead of storing dz in float32 and reading it back),
so it moves x, dy in and dx out plus small per-tile partial sums for dweight and dbias.
"""

import torch
import triton
import triton.language as tl

from ..alloc import new_empty

BT = 64
BD = 128
WARPS = 8


@triton.jit
def _row_sequence(rows, row_mask, seq_ptr, bounds_ptr, length, VARLEN: tl.constexpr):
    """(sequence id, first row, end row) of every row."""
    if VARLEN:
        seq = tl.load(seq_ptr + rows, mask=row_mask, other=0)
        start = tl.load(bounds_ptr + seq, mask=row_mask, other=0)
        end = tl.load(bounds_ptr + seq + 1, mask=row_mask, other=0)
    else:
        seq = rows // length
        start = seq * length
        end = start + length
    return seq, start, end


@triton.jit
def _tap(x_ptr, c_ptr, rows, row_mask, seq, start, cols, col_mask, dim, shift, W: tl.constexpr,
         HAS_CACHE: tl.constexpr):
    """x at row - shift within the row's sequence, else the cache entry it stands for, else 0 (float32)."""
    src = rows - shift
    inside = src >= start
    mask = (row_mask & inside)[:, None] & col_mask[None, :]
    xv = tl.load(x_ptr + src.to(tl.int64)[:, None] * dim + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_CACHE:
        slot = (seq * (W - 1) + (W - 1) + (src - start)).to(tl.int64)
        cmask = (row_mask & (~inside))[:, None] & col_mask[None, :]
        xv += tl.load(c_ptr + slot[:, None] * dim + cols[None, :], mask=cmask, other=0.0).to(tl.float32)
    return xv


@triton.jit
def _preactivation(x_ptr, w_ptr, b_ptr, c_ptr, rows, row_mask, seq, start, cols, col_mask, dim,
                   W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, HAS_BIAS: tl.constexpr,
                   HAS_CACHE: tl.constexpr):
    acc = tl.zeros([BT, BD], dtype=tl.float32)
    for j in tl.static_range(W):
        xv = _tap(x_ptr, c_ptr, rows, row_mask, seq, start, cols, col_mask, dim, W - 1 - j, W, HAS_CACHE)
        w = tl.load(w_ptr + cols * W + j, mask=col_mask, other=0.0).to(tl.float32)
        acc += xv * w[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, c_ptr, y_ptr, seq_ptr, bounds_ptr, n_rows, length, dim,
    W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CACHE: tl.constexpr,
    SILU: tl.constexpr, VARLEN: tl.constexpr,
):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    row_mask, col_mask = rows < n_rows, cols < dim
    seq, start, _ = _row_sequence(rows, row_mask, seq_ptr, bounds_ptr, length, VARLEN)
    acc = _preactivation(x_ptr, w_ptr, b_ptr, c_ptr, rows, row_mask, seq, start, cols, col_mask, dim,
                         W, BT, BD, HAS_BIAS, HAS_CACHE)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    offs = rows.to(tl.int64)[:, None] * dim + cols[None, :]
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _conv_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, b_ptr, c_ptr, dfc_ptr, dx_ptr, dz_ptr, dw_ptr, db_ptr, seq_ptr, bounds_ptr,
    n_rows, length, dim,
    W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CACHE: tl.constexpr,
    SILU: tl.constexpr, VARLEN: tl.constexpr,
):
    """dx_s = sum_j weight[:, j] dz_{s + W-1-j} (inside the sequence) + d_final_cache where x_s is cached,
    with dz = dy * act'(pre) recomputed at each shifted row; this tile's partial sums of dweight
    [W, D] and dbias [D]; with a cache, dz at each sequence's first W - 1 rows (for d cache)."""
    i_t = tl.program_id(0)
    rows = i_t * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    row_mask, col_mask = rows < n_rows, cols < dim
    seq, start, end = _row_sequence(rows, row_mask, seq_ptr, bounds_ptr, length, VARLEN)
    dx = tl.zeros([BT, BD], dtype=tl.float32)
    for m in tl.static_range(W):
        r = rows + m  # dz_r reaches x_rows through weight[:, W-1-m]
        r_mask = row_mask & (r < end)
        offs = r.to(tl.int64)[:, None] * dim + cols[None, :]
        dz = tl.load(dy_ptr + offs, mask=r_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
        if SILU:
            pre = _preactivation(x_ptr, w_ptr, b_ptr, c_ptr, r, r_mask, seq, start, cols, col_mask, dim,
                                 W, BT, BD, HAS_BIAS, HAS_CACHE)
            sig = tl.sigmoid(pre)
            dz = dz * sig * (1.0 + pre * (1.0 - sig))
        w = tl.load(w_ptr + cols * W + (W - 1 - m), mask=col_mask, other=0.0).to(tl.float32)
        dx += dz * w[None, :]
        if m == 0:
            if HAS_CACHE:
                head = r_mask & (rows - start < W - 1)
                tl.store(dz_ptr + offs, dz, mask=head[:, None] & col_mask[None, :])
            for j in tl.static_range(W):
                xv = _tap(x_ptr, c_ptr, rows, row_mask, seq, start, cols, col_mask, dim, W - 1 - j, W, HAS_CACHE)
                tl.store(dw_ptr + (i_t * W + j).to(tl.int64) * dim + cols, tl.sum(dz * xv, axis=0), mask=col_mask)
            if HAS_BIAS:
                tl.store(db_ptr + i_t.to(tl.int64) * dim + cols, tl.sum(dz, axis=0), mask=col_mask)
    slot = (W - 1) + rows - end  # position of x_s in the final cache, if >= 0
    mask = (row_mask & (slot >= 0))[:, None] & col_mask[None, :]
    cache_offs = (seq * (W - 1) + slot).to(tl.int64)[:, None] * dim + cols[None, :]
    dx += tl.load(dfc_ptr + cache_offs, mask=mask, other=0.0).to(tl.float32)
    offs = rows.to(tl.int64)[:, None] * dim + cols[None, :]
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


class _Rows:
    """Flat-row view of a batch or a packed varlen input: bounds [N + 1] and (if varlen) sequence per row."""

    def __init__(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None):
        batch, length, _ = x.shape
        self.n_rows, self.length = batch * length, length
        if cu_seqlens is None:
            self.bounds = torch.arange(batch + 1, dtype=torch.int32, device=x.device) * length
            self.seq = self.bounds  # unused
        else:
            self.bounds = cu_seqlens.to(device=x.device, dtype=torch.int32)
            rows = torch.arange(self.n_rows, dtype=torch.int32, device=x.device)
            self.seq = torch.searchsorted(self.bounds[1:], rows, right=True).to(torch.int32)
        self.varlen = cu_seqlens is not None
        self.n = self.bounds.numel() - 1
        self.starts, self.ends = self.bounds[:-1].long(), self.bounds[1:].long()


def _grid(rows: _Rows, dim: int) -> tuple[int, int]:
    return triton.cdiv(rows.n_rows, BT), triton.cdiv(dim, BD)


def _final_cache(x2: torch.Tensor, cache: torch.Tensor | None, rows: _Rows, width: int) -> torch.Tensor:
    """The last W-1 inputs of each sequence [N, W-1, D], from x or (for short sequences) the old cache."""
    offsets = torch.arange(width - 1, device=x2.device)
    src = rows.ends[:, None] - (width - 1) + offsets  # [N, W-1] flat rows of x
    from_x = (src >= rows.starts[:, None])[..., None]
    xs = x2[src.clamp(min=0)]
    if cache is None:
        return torch.where(from_x, xs, torch.zeros((), dtype=x2.dtype, device=x2.device))
    slot = (rows.ends - rows.starts)[:, None] + offsets  # position in the old cache when not from x
    old = torch.gather(cache, 1, slot.clamp(max=width - 2)[..., None].expand(-1, -1, x2.shape[1]))
    return torch.where(from_x, xs, old)


def short_conv_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    silu: bool,
    cache: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [B, T, D] in x's dtype, final cache [N, W-1, D] in x's dtype)."""
    dim, width = weight.shape
    rows = _Rows(x, cu_seqlens)
    x2 = x.contiguous().view(-1, dim)
    weight, cache = weight.contiguous(), None if cache is None else cache.contiguous()
    y = new_empty(x.shape, dtype=x.dtype, device=x.device)
    if rows.n_rows > 0:
        _conv_fwd_kernel[_grid(rows, dim)](
            x2, weight, x2 if bias is None else bias.contiguous(), x2 if cache is None else cache, y,
            rows.seq, rows.bounds, rows.n_rows, rows.length, dim,
            W=width, BT=BT, BD=BD, HAS_BIAS=bias is not None, HAS_CACHE=cache is not None, SILU=silu,
            VARLEN=rows.varlen, num_warps=WARPS,
        )
    return y, _final_cache(x2, cache, rows, width)


def _cache_grad(dz: torch.Tensor, d_final_cache: torch.Tensor, weight: torch.Tensor, rows: _Rows) -> torch.Tensor:
    """d cache [N, W-1, D]: cache slot p feeds y_t (t = p - j) through weight[:, j], and the final cache."""
    dim, width = weight.shape
    p = torch.arange(width - 1, device=dz.device)
    t = p[:, None] - torch.arange(width, device=dz.device)  # [W-1, W] token hit through tap j
    lengths = (rows.ends - rows.starts)[:, None, None]
    valid = ((t >= 0) & (t < lengths))[..., None]  # [N, W-1, W, 1]
    src = (rows.starts[:, None, None] + t).clamp(0, max(rows.n_rows - 1, 0))
    taps = torch.where(valid, dz[src], 0.0) if rows.n_rows > 0 else dz.new_zeros(*valid.shape[:3], dim)
    grad = torch.einsum("npjd,dj->npd", taps, weight.float())
    slot = p - lengths[..., 0]  # [N, W-1] where slot p sits in the final cache
    carried = torch.gather(d_final_cache.float(), 1, slot.clamp(min=0)[..., None].expand(-1, -1, dim))
    return grad + torch.where((slot >= 0)[..., None], carried, 0.0)


def short_conv_backward(
    dy: torch.Tensor,
    d_final_cache: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    silu: bool,
    cache: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (dx, dweight, dbias or None, dcache or None) of `short_conv_forward`."""
    dim, width = weight.shape
    rows = _Rows(x, cu_seqlens)
    x2, dy2 = x.contiguous().view(-1, dim), dy.contiguous().view(-1, dim)
    weight, cache = weight.contiguous(), None if cache is None else cache.contiguous()
    d_final_cache = d_final_cache.contiguous()
    grid = _grid(rows, dim)
    # dz is only read back at each sequence's first W - 1 rows, for the cache gradient
    dz = new_empty((rows.n_rows, dim), dtype=torch.float32, device=x.device) if cache is not None else x2
    dw_part = new_empty((grid[0], width, dim), dtype=torch.float32, device=x.device)
    db_part = new_empty((grid[0], dim), dtype=torch.float32, device=x.device)
    dx = new_empty(x.shape, dtype=x.dtype, device=x.device)
    if rows.n_rows > 0:
        _conv_bwd_kernel[grid](
            dy2, x2, weight, x2 if bias is None else bias.contiguous(), x2 if cache is None else cache,
            d_final_cache, dx, dz, dw_part, db_part, rows.seq, rows.bounds, rows.n_rows, rows.length, dim,
            W=width, BT=BT, BD=BD, HAS_BIAS=bias is not None, HAS_CACHE=cache is not None, SILU=silu,
            VARLEN=rows.varlen, num_warps=WARPS,
        )
    dw = dw_part.sum(0).t().to(weight.dtype)
    db = None if bias is None else db_part.sum(0).to(bias.dtype)
    dcache = None if cache is None else _cache_grad(dz, d_final_cache, weight, rows).to(cache.dtype)
    return dx, dw, db, dcache
