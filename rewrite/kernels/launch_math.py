"""Integer helpers for computing launch grids and tile sizes on the host.

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
