"""Triton kernels of the fused router and their launcher (a plain function taking tensors).

Two launches: the first spreads each row's sequence over programs and writes partial sums of
x[b, l] . w; the second (one program) adds the partials, applies bias, mean and sigmoid, and
compacts the active rows with a prefix sum. The launcher runs on CUDA tensors, or on CPU tensors
when TRITON_INTERPRET=1 was set before this module was imported.
"""

import torch
import triton
import triton.language as tl

from rewrite.kernels.launch_math import cdiv, next_power_of_2

from ..alloc import new_empty

MAX_BATCH = 16384
"""Rows the one-program compaction handles."""


@triton.jit
def _partial_dot_kernel(
    x_ptr,
    w_ptr,
    partial_ptr,
    length,
    dim,
    stride_b,
    stride_l,
    rows_per_program,
    n_chunks,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    first = chunk * rows_per_program
    acc = tl.zeros([BLOCK_L], dtype=tl.float32)
    for l0 in range(0, rows_per_program, BLOCK_L):
        ls = first + l0 + tl.arange(0, BLOCK_L)
        lmask = (ls < length) & (l0 + tl.arange(0, BLOCK_L) < rows_per_program)
        for d0 in range(0, dim, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dmask = ds < dim
            ptrs = x_ptr + b * stride_b + ls.to(tl.int64)[:, None] * stride_l + ds[None, :]
            x = tl.load(ptrs, mask=lmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            w = tl.load(w_ptr + ds, mask=dmask, other=0.0).to(tl.float32)
            acc += tl.sum(x * w[None, :], axis=1)
    tl.store(partial_ptr + b * n_chunks + chunk, tl.sum(acc, axis=0))


@triton.jit
def _finish_kernel(
    partial_ptr,
    bias_ptr,
    prob_ptr,
    order_ptr,
    count_ptr,
    batch,
    n_chunks,
    inv_length,
    threshold,
    BLOCK_B: tl.constexpr,
):
    rows = tl.arange(0, BLOCK_B)
    rmask = rows < batch
    total = tl.zeros([BLOCK_B], dtype=tl.float32)
    for c in range(0, n_chunks):
        total += tl.load(partial_ptr + rows * n_chunks + c, mask=rmask, other=0.0)
    bias = tl.load(bias_ptr).to(tl.float32)
    logit = total * inv_length + bias
    prob = 1.0 / (1.0 + tl.exp(-logit))
    tl.store(prob_ptr + rows, prob, mask=rmask)
    active = ((prob <= threshold) & rmask).to(tl.int32)
    skipped = ((prob > threshold) & rmask).to(tl.int32)
    n_active = tl.sum(active, axis=0)
    pos_active = tl.cumsum(active, axis=0) - 1
    pos_skipped = n_active + tl.cumsum(skipped, axis=0) - 1
    pos = tl.where(active == 1, pos_active, pos_skipped)
    tl.store(order_ptr + pos, rows.to(tl.int64), mask=rmask)
    tl.store(count_ptr, n_active.to(tl.int64))


def route_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(skip probability [B] fp32, row order [B] int64, active count [] int64); see the reference."""
    batch, length, dim = x.shape
    if batch > MAX_BATCH:
        raise ValueError(f"route: the Triton router handles at most {MAX_BATCH} rows, got {batch}")
    if x.stride(2) != 1:
        x = x.contiguous()
    prob = new_empty((batch,), dtype=torch.float32, device=x.device)
    # -1 is no row: an entry the kernel forgets to write cannot pass for one
    order = torch.full((batch,), -1, dtype=torch.int64, device=x.device)
    count = torch.full((), -1, dtype=torch.int64, device=x.device)
    if batch == 0:
        count.zero_()
        return prob, order, count
    block_d = min(next_power_of_2(dim), 128)
    block_l = 16
    if x.is_cuda:
        target = 2 * torch.cuda.get_device_properties(x.device).multi_processor_count
    else:
        target = 2
    chunks = max(1, min(cdiv(length, block_l), cdiv(target, batch)))
    rows_per_program = cdiv(length, chunks)
    chunks = cdiv(length, rows_per_program)
    partial = new_empty((batch, chunks), dtype=torch.float32, device=x.device)
    _partial_dot_kernel[(batch, chunks)](
        x,
        weight.contiguous(),
        partial,
        length,
        dim,
        x.stride(0),
        x.stride(1),
        rows_per_program,
        chunks,
        BLOCK_L=block_l,
        BLOCK_D=block_d,
    )
    _finish_kernel[(1,)](
        partial,
        bias,
        prob,
        order,
        count,
        batch,
        chunks,
        1.0 / length,
        float(threshold),
        BLOCK_B=max(16, next_power_of_2(batch)),
    )
    return prob, order, count
