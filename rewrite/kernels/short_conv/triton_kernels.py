"""Triton kernels for the short causal conv and their launchers; see `reference.py` for the math.

Tokens are addressed flat (row r of x.view(B * T, D)); every row knows its sequence and the
sequence's first row (computed for dense batches, looked up for packed cu_seqlens inputs), so
both share one kernel. Tiles are [BT tokens, BD channels]; the W taps are unrolled (W is a
constexpr), and shifted tiles are re-read from L1/L2, so device memory sees each input once.
The forward launch also writes the final cache: one extra program per sequence (no torch ops).

The backward is one pass: each program recomputes dz = dy * act'(z) at its rows and the W - 1
rows after them (W shifted recomputations instead of storing dz in float32 and reading it back),
so it moves x, dy in and dx out plus small per-tile partial sums for dweight and dbias.
"""

import torch
import triton
import triton.language as tl

from rewrite.kernels.launch_math import cdiv, next_power_of_2

from ..alloc import new_empty

BT = 64  # backward tile: rows, channels, warps
BD = 128
WARPS = 8
FWD_TILES = (32, 256, 4)  # forward tile (rows, channels, warps); NOTES_delta_swa_conv.md has the sweep


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
def _final_cache_tile(x_ptr, c_ptr, f_ptr, seq, start, end, cols, col_mask, dim, W: tl.constexpr,
                      WP: tl.constexpr, HAS_CACHE: tl.constexpr):
    """Final cache rows of sequence `seq` at these channels: x's last W-1 rows, older cache rows before."""
    slot = tl.arange(0, WP)
    slot_mask = slot < W - 1
    src = end - (W - 1) + slot  # flat row of x that slot stands for
    from_x = slot_mask & (src >= start)
    mask = from_x[:, None] & col_mask[None, :]
    val = tl.load(x_ptr + src.to(tl.int64)[:, None] * dim + cols[None, :], mask=mask, other=0.0)
    if HAS_CACHE:
        old = (seq * (W - 1) + (end - start) + slot).to(tl.int64)  # the old cache row it stands for
        cmask = (slot_mask & (src < start))[:, None] & col_mask[None, :]
        val += tl.load(c_ptr + old[:, None] * dim + cols[None, :], mask=cmask, other=0.0)
    offs = (seq * (W - 1) + slot).to(tl.int64)[:, None] * dim + cols[None, :]
    tl.store(f_ptr + offs, val.to(f_ptr.dtype.element_ty), mask=slot_mask[:, None] & col_mask[None, :])


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, c_ptr, y_ptr, f_ptr, seq_ptr, bounds_ptr, n_rows, n_tiles, length, dim,
    W: tl.constexpr, WP: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_CACHE: tl.constexpr, SILU: tl.constexpr, VARLEN: tl.constexpr,
):
    """y at one [BT, BD] tile; programs past the row tiles write the final cache of one sequence each."""
    i_t = tl.program_id(0)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    col_mask = cols < dim
    if i_t >= n_tiles:  # names differ from the else branch: triton 3.6 rejects a scalar/tensor mix
        n_id = i_t - n_tiles
        if VARLEN:
            n_start = tl.load(bounds_ptr + n_id)
            n_end = tl.load(bounds_ptr + n_id + 1)
        else:
            n_start = n_id * length
            n_end = n_start + length
        _final_cache_tile(x_ptr, c_ptr, f_ptr, n_id, n_start, n_end, cols, col_mask, dim, W, WP, HAS_CACHE)
    else:
        rows = i_t * BT + tl.arange(0, BT)
        row_mask = rows < n_rows
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
    """Flat-row view of a batch or a packed varlen input: N sequences, and for varlen their bounds [N + 1]
    and the sequence of every row. Dense batches build no device tensors unless `starts`/`ends` are read."""

    def __init__(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None):
        batch, length, _ = x.shape
        self.n_rows, self.length, self.device = batch * length, length, x.device
        self.varlen = cu_seqlens is not None
        if cu_seqlens is None:
            self.n = batch
            self.bounds = self.seq = x  # unused by the kernels (VARLEN False)
        else:
            self.n = cu_seqlens.shape[0] - 1
            self.bounds = cu_seqlens.to(device=x.device, dtype=torch.int32)
            rows = torch.arange(self.n_rows, dtype=torch.int32, device=x.device)
            self.seq = torch.searchsorted(self.bounds[1:], rows, right=True).to(torch.int32)

    def _bounds(self) -> torch.Tensor:
        if self.varlen:
            return self.bounds.long()
        return torch.arange(self.n + 1, device=self.device) * self.length

    @property
    def starts(self) -> torch.Tensor:
        """First flat row of every sequence [N] (int64)."""
        return self._bounds()[:-1]

    @property
    def ends(self) -> torch.Tensor:
        """End flat row of every sequence [N] (int64)."""
        return self._bounds()[1:]


def _grid(rows: _Rows, dim: int, bt: int, bd: int) -> tuple[int, int]:
    return cdiv(rows.n_rows, bt), cdiv(dim, bd)


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
    final = new_empty((rows.n, width - 1, dim), dtype=x.dtype, device=x.device)
    if rows.n_rows == 0:  # no tokens: every final-cache slot is the old cache's (or zero)
        return y, (torch.zeros_like(final) if cache is None else final.copy_(cache))
    bt, bd, warps = FWD_TILES
    tiles, col_tiles = _grid(rows, dim, bt, bd)
    if rows.n > 0 and dim > 0:
        # row tiles first, then one program per sequence for its final cache
        _conv_fwd_kernel[(tiles + rows.n, col_tiles)](
            x2, weight, x2 if bias is None else bias.contiguous(), x2 if cache is None else cache, y, final,
            rows.seq, rows.bounds, rows.n_rows, tiles, rows.length, dim,
            W=width, WP=max(2, next_power_of_2(width - 1)), BT=bt, BD=bd, HAS_BIAS=bias is not None,
            HAS_CACHE=cache is not None, SILU=silu, VARLEN=rows.varlen, num_warps=warps,
        )
    return y, final


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
    grid = _grid(rows, dim, BT, BD)
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
