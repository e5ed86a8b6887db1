"""The host-side launch helpers agree with Triton's own; the split-KV slicing covers every slot once."""

import pytest
import triton

from rewrite.kernels.launch_math import cdiv, next_power_of_2, row_warps, slot_splits


def test_cdiv_and_next_power_of_2_match_triton():
    for x in range(0, 3000, 7):
        for y in (1, 2, 3, 16, 64, 100, 128):
            assert cdiv(x, y) == triton.cdiv(x, y), (x, y)
    for n in range(1, 70000, 13):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
    assert [next_power_of_2(n) for n in (1, 2, 3, 4, 5, 64, 65)] == [1, 2, 4, 4, 8, 64, 128]


def test_slot_splits_cover_every_slot_once_in_block_multiples():
    for slots in (1, 63, 64, 65, 300, 4096, 16544):
        for programs in (1, 6, 64, 256, 5000):
            for most in (None, 4, 64):
                n, per = slot_splits(slots, programs, block=64, target=1024, most=most)
                assert per % 64 == 0 and (n - 1) * per < slots <= n * per, (slots, programs, most)
                assert n <= (most or n) and (n == 1 or n * programs <= 1024 + programs), (slots, programs, most)
    assert slot_splits(16384, 256, block=64, target=1024) == (4, 4096)
    assert slot_splits(16384, 8, block=64, target=1024, most=64) == (64, 256)


@pytest.mark.parametrize("elements,per_warp,most,warps", [
    (100, 512, 16, 1), (2048, 512, 16, 4), (4096, 512, 16, 8), (65536, 512, 16, 16), (64, 64, 4, 1), (100, 64, 4, 2),
    (4096, 64, 4, 4),
])
def test_row_warps_scales_with_the_row_between_one_and_most(elements, per_warp, most, warps):
    assert row_warps(elements, per_warp, most) == warps
