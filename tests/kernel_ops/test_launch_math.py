"""The host-side launch helpers agree with Triton's own."""

import triton

from rewrite.kernels.launch_math import cdiv, next_power_of_2


def test_cdiv_and_next_power_of_2_match_triton():
    for x in range(0, 3000, 7):
        for y in (1, 2, 3, 16, 64, 100, 128):
            assert cdiv(x, y) == triton.cdiv(x, y), (x, y)
    for n in range(1, 70000, 13):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
    assert [next_power_of_2(n) for n in (1, 2, 3, 4, 5, 64, 65)] == [1, 2, 4, 4, 8, 64, 128]
