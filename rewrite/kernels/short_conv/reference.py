"""Short causal depthwise conv1d in plain PyTorch: the source of truth and the CPU implementation.

For one sequence x_0..x_{L-1} (rows of [L, D]) and a cache c_0..c_{W-2} holding the W-1 inputs
that came before it (oldest first; zeros when there is none), let xp = [c_0..c_{W-2}, x_0..x_{L-1}].
Then, per channel d,

    y_t[d] = act(bias[d] + sum_{j < W} weight[d, j] * xp_{t + j}[d])      (weight[:, W-1] hits x_t)

and the final cache is the last W-1 rows of xp (it takes rows of the old cache when L < W-1).
act is SiLU or the identity. Computes in float32 at least; y and the cache in x's dtype.
"""

import torch
import torch.nn.functional as F


def _sequences(x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """(batch row, start, end) of every sequence."""
    if cu_seqlens is None:
        return [(b, 0, x.shape[1]) for b in range(x.shape[0])]
    bounds = cu_seqlens.tolist()
    return [(0, bounds[n], bounds[n + 1]) for n in range(len(bounds) - 1)]


def _taps(xp: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, length: int) -> torch.Tensor:
    """Pre-activation [L, D]: sum_j w[:, j] * xp[t + j] (+ bias) for t < length."""
    out = sum(xp[j : j + length] * w[:, j] for j in range(w.shape[1]))
    return out if b is None else out + b


def short_conv_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    silu: bool,
    cache: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [B, T, D] in x's dtype, final cache [N, W-1, D] in x's dtype); see the module docstring.

    x [B, T, D]; weight [D, W]; bias [D] or None; cache [N, W-1, D] or None (zeros);
    cu_seqlens [N + 1] packs N sequences into B == 1 (N = B without it).
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    dim, width = weight.shape
    w = weight.to(compute)
    b = None if bias is None else bias.to(compute)
    y = torch.empty(x.shape, dtype=compute, device=x.device)
    finals = []
    for n, (row, start, end) in enumerate(_sequences(x, cu_seqlens)):
        xs = x[row, start:end].to(compute)
        past = x.new_zeros(width - 1, dim, dtype=compute) if cache is None else cache[n].to(compute)
        xp = torch.cat([past, xs])
        out = _taps(xp, w, b, end - start)
        y[row, start:end] = F.silu(out) if silu else out
        finals.append(xp[xp.shape[0] - (width - 1) :])
    return y.to(x.dtype), torch.stack(finals).to(x.dtype)


def short_conv_backward_reference(
    dy: torch.Tensor,
    d_final_cache: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    silu: bool,
    cache: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (dx, dweight, dbias or None, dcache or None) of `short_conv_reference`.

    With z the pre-activation and dz = dy * act'(z): dweight[:, j] = sum_t dz_t * xp_{t+j},
    dbias = sum_t dz_t, d xp_p = sum_j weight[:, j] * dz_{p-j} (plus d_final_cache on the last
    W-1 rows of xp); dx and dcache are the two parts of d xp.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    dim, width = weight.shape
    w = weight.to(compute)
    b = None if bias is None else bias.to(compute)
    dx = torch.empty(x.shape, dtype=compute, device=x.device)
    dw = torch.zeros(dim, width, dtype=compute, device=x.device)
    db = torch.zeros(dim, dtype=compute, device=x.device)
    dcache = []
    for n, (row, start, end) in enumerate(_sequences(x, cu_seqlens)):
        length = end - start
        past = x.new_zeros(width - 1, dim, dtype=compute) if cache is None else cache[n].to(compute)
        xp = torch.cat([past, x[row, start:end].to(compute)])
        dz = dy[row, start:end].to(compute)
        if silu:
            z = _taps(xp, w, b, length)
            sig = torch.sigmoid(z)
            dz = dz * sig * (1 + z * (1 - sig))
        dxp = torch.zeros_like(xp)
        for j in range(width):
            dw[:, j] += (dz * xp[j : j + length]).sum(0)
            dxp[j : j + length] += dz * w[:, j]
        dxp[length:] += d_final_cache[n].to(compute)
        db += dz.sum(0)
        dx[row, start:end] = dxp[width - 1 :]
        dcache.append(dxp[: width - 1])
    db = None if bias is None else db.to(bias.dtype)
    dcache = None if cache is None else torch.stack(dcache).to(cache.dtype)
    return dx.to(x.dtype), dw.to(weight.dtype), db, dcache
