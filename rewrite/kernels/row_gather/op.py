"""The `rewrite::gather_rows` op: schema, fake, CPU reference and CUDA Triton implementation (forward only)."""

import torch

from .._triton import load_triton_module
from ..launch_math import rows_are_contiguous

_TRITON = "rewrite.kernels.row_gather.triton_kernels"


@torch.library.custom_op("rewrite::gather_rows", mutates_args=())
def gather_rows_op(values: list[torch.Tensor], rows: torch.Tensor) -> list[torch.Tensor]:
    """[v.index_select(0, rows) for v in values]."""
    return [v.index_select(0, rows) for v in values]


@gather_rows_op.register_kernel("cuda")
def _gather_rows_cuda(values: list[torch.Tensor], rows: torch.Tensor) -> list[torch.Tensor]:
    launchers = load_triton_module(_TRITON)
    together = [i for i, v in enumerate(values) if rows_are_contiguous(v)]
    outs = [v.index_select(0, rows) if i not in together else None for i, v in enumerate(values)]
    for i, out in zip(together, launchers.gather_rows_forward([values[i] for i in together], rows), strict=True):
        outs[i] = out
    return outs


@gather_rows_op.register_fake
def _gather_rows_fake(values: list[torch.Tensor], rows: torch.Tensor) -> list[torch.Tensor]:
    return [v.new_empty((rows.shape[0], *v.shape[1:])) for v in values]


def gather_rows(values: list[torch.Tensor], rows: torch.Tensor) -> list[torch.Tensor]:
    """`[v.index_select(0, rows) for v in values]` (each result contiguous), by one kernel launch on CUDA for up to
    six tensors whose rows are contiguous runs. `rows` [R]: int64 indices into dim 0, which every value shares;
    forward only (no autograd)."""
    if rows.dim() != 1 or rows.dtype != torch.long:
        raise ValueError(f"gather_rows: rows must be a 1-D int64 tensor, got {rows.dtype} of shape {tuple(rows.shape)}")
    for i, v in enumerate(values):
        if v.dim() == 0:
            raise ValueError(f"gather_rows: value {i} is a scalar; every value needs a dim 0 to gather")
        if v.device != rows.device:
            raise ValueError(f"gather_rows: value {i} is on {v.device}, rows on {rows.device}")
    return gather_rows_op(list(values), rows)
