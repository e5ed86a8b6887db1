"""Helpers for computing launch grids, tile sizes, chunk counts and dot precisions on the host.

`triton.cdiv` and `triton.next_power_of_2` are constexpr functions in recent Triton releases: each host call
unwraps its arguments through Triton's machinery (about 2 us on a busy CPU core), and a linear-attention
forward and backward makes a few dozen of them. These are the same arithmetic as plain Python.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def cdiv(x: int, y: int) -> int:
    """ceil(x / y) for positive y."""
    return -(-x // y)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def chunk_count(batch: int, length: int, cu_seqlens, chunk: int) -> int:
    """Chunks of `chunk` tokens the chunked kernels lay out: batch * ceil(length / chunk) for a dense batch; for
    N packed sequences (`cu_seqlens` of N + 1 offsets, batch 1) ceil(length / chunk) + N, an upper bound that
    covers each sequence's partial last chunk."""
    per_seq = cdiv(length, chunk)
    return batch * per_seq if cu_seqlens is None else per_seq + cu_seqlens.shape[0] - 1


def slot_splits(slots: int, programs: int, *, block: int, target: int, most: int | None = None) -> tuple[int, int]:
    """(slices, slots per slice) of a KV cache of `slots` slots for each of `programs` (row, kv head) programs of a
    split-KV decode kernel: about `target` programs in all, at most `most` slices, each a multiple of `block`."""
    n = max(1, min(cdiv(slots, block), cdiv(target, max(programs, 1)), most or slots))
    per_split = cdiv(cdiv(max(slots, 1), n), block) * block
    return cdiv(max(slots, 1), per_split), per_split


def head_tile(dim: int, op: str) -> int:
    """Tile width for an attention head dim (the whole head per tile): a power of two >= 16, at most 256; `op`
    names the caller in the error."""
    if dim > 256:
        raise ValueError(f"{op}: the Triton kernels support head dims up to 256, got {dim}")
    return max(16, next_power_of_2(dim))


def dot_precision(dtype) -> str:
    """tl.dot input precision: exact float32 for float32 inputs (no TF32), TF32 (unused) for 16-bit ones."""
    import torch

    return "ieee" if dtype == torch.float32 else "tf32"


def row_warps(elements: int, per_warp: int, most: int) -> int:
    """Warps of a program that handles one row of `elements`: about `per_warp` elements a warp, 1 to `most`."""
    return max(1, min(most, next_power_of_2(max(elements, 1)) // per_warp))


def rows_are_contiguous(t: "torch.Tensor") -> bool:
    """Whether each row t[i] of `t` (dim >= 1) is one contiguous run of elements (rows may be any stride apart)."""
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:]), strict=True):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True
