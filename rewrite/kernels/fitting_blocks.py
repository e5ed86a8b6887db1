"""Launch shapes that fit the device: a kernel's tuned blocks, smaller ones where the GPU runs out of resources.

Tile sizes tuned for one head dim and dtype on one GPU can need more shared memory than another case or another GPU
has (a head dim of 256, float32 inputs, a GPU with less shared memory than the H100s the defaults were tuned on):
Triton then refuses the launch with `OutOfResources` before anything runs. `launch_fitting` tries the tuned blocks,
then fewer pipeline stages, then smaller key and query blocks, and remembers per case the first that launched.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from typing import TypeVar

Blocks = tuple[int, int, int, int]
"""(BLOCK_M, BLOCK_N, num_warps, num_stages)."""

T = TypeVar("T")

_FITTED: dict[Hashable, Blocks] = {}
SMALLEST_BLOCK = 16


def _out_of_resources() -> type[Exception]:
    from triton.runtime.errors import OutOfResources

    return OutOfResources


def shrinking(blocks: Blocks, halve_m: bool = True) -> Iterator[Blocks]:
    """`blocks`, then one pipeline stage fewer at a time, then BLOCK_N and BLOCK_M halved in turn (the larger
    first; BLOCK_N only when not `halve_m`, for kernels whose BLOCK_M covers rows they must all hold) down to
    `SMALLEST_BLOCK`, with two stages again and at most 4 warps once a block is halved."""
    bm, bn, warps, stages = blocks
    yield blocks
    while stages > 1:
        stages -= 1
        yield bm, bn, warps, stages
    while bn > SMALLEST_BLOCK or (halve_m and bm > SMALLEST_BLOCK):
        if bn > SMALLEST_BLOCK and (bn >= bm or not halve_m):
            bn //= 2
        else:
            bm //= 2
        warps = min(warps, 4)
        yield bm, bn, warps, 2
        yield bm, bn, warps, 1


def launch_fitting(case: Hashable, blocks: Blocks, launch: Callable[[Blocks], T], halve_m: bool = True) -> T:
    """`launch(blocks)`'s result for the first of `shrinking(blocks, halve_m)` the device takes; `case` (the kernel
    and what decides its resources: head dims, dtype, device) keys the remembered fit. Raises the last
    `OutOfResources` when none fits."""
    fitted = _FITTED.get(case)
    if fitted is not None:
        return launch(fitted)
    error = _out_of_resources()
    last: Exception | None = None
    for candidate in shrinking(blocks, halve_m):
        try:
            result = launch(candidate)
        except error as exc:
            last = exc
            continue
        _FITTED[case] = candidate
        return result
    assert last is not None
    raise last
