"""Integer helpers for computing launch grids, tile sizes and chunk counts on the host.

`triton.cdiv` and `triton.next_power_of_2` are constexpr functions in recent Triton releases: each host call
unwraps its arguments through Triton's machinery (about 2 us on a busy CPU core), and a linear-attention
forward and backward makes a few dozen of them. These are the same arithmetic as plain Python.
"""


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
