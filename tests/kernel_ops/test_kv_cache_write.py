"""rewrite::kv_cache_write_: the Triton launcher (one launch for keys and values, casts rounded as `.to` rounds, any
strides of k / v, differing head dims) against slots written one by one, with every element it should leave alone
checked bit for bit; the op's checks and fallbacks, opcheck and compile."""

import pytest
import torch

import rewrite.kernels  # noqa: F401  (registers the ops)
from rewrite.kernels import kv_cache_write_
from rewrite.kernels.testing import kernel_device, load_launchers

LAUNCHERS = "rewrite.kernels.kv_cache_write.triton_kernels"
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def written_one_by_one(cache: torch.Tensor, index: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """A copy of `cache` with each token t of `new` [B, H, T, D] written at slot index[t], slice by slice."""
    out = cache.clone()
    for t, slot in enumerate(index.tolist()):
        if 0 <= slot < cache.shape[2]:
            for b in range(cache.shape[0]):
                for h in range(cache.shape[1]):
                    out[b, h, slot] = new[b, h, t].to(cache.dtype)
    return out


def poisoned_cache(batch: int, heads: int, slots: int, dim: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A cache whose even slots hold NaN and odd slots random values: what a write leaves alone must stay so."""
    cache = torch.randn(batch, heads, slots, dim, device=device).to(dtype)
    cache[:, :, ::2] = float("nan")
    return cache


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Equal bit for bit, NaNs included (a NaN left in an untouched slot must be that NaN)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, name
    a, e = actual.view(BITS[actual.dtype]), expected.view(BITS[expected.dtype])
    assert torch.equal(a, e), f"{name}: {(a != e).sum().item()} elements differ"


def transposed(batch: int, heads: int, count: int, dim: int, dtype: torch.dtype, device) -> torch.Tensor:
    """[B, H, T, D] as a transposed view of [B, T, H, D] (what a projection's output becomes), values of a wide range
    so that casts round."""
    return (torch.randn(batch, count, heads, dim, device=device, dtype=torch.float64) * 3).to(dtype).transpose(1, 2)


CASTS = [  # (cache dtype, k / v dtype)
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.float16),
]


@pytest.mark.parametrize("count", [1, 5], ids=["T=1", "T=5"])
@pytest.mark.parametrize("cache_dtype,new_dtype", CASTS, ids=lambda d: str(d).removeprefix("torch."))
def test_launcher_writes_like_slot_by_slot_and_leaves_the_rest(cache_dtype, new_dtype, count):
    launchers = load_launchers(LAUNCHERS)
    device = kernel_device()
    torch.manual_seed(count)
    batch, heads, slots, dk, dv = 3, 2, 12, 16, 24
    keys = poisoned_cache(batch, heads, slots, dk, cache_dtype, device)
    values = poisoned_cache(batch, heads, slots, dv, cache_dtype, device)
    index = torch.tensor([7, 2, 10, 3, 4][:count], device=device)  # slots of both parities
    k = transposed(batch, heads, count, dk, new_dtype, device)
    v = transposed(batch, heads, count, dv, new_dtype, device)
    expected_keys, expected_values = written_one_by_one(keys, index, k), written_one_by_one(values, index, v)
    launchers.kv_cache_write_forward(keys, values, index, k, v)
    assert_same_bits(keys, expected_keys, "keys")
    assert_same_bits(values, expected_values, "values")


def test_launcher_rounds_float32_to_bfloat16_to_nearest_even():
    """Halfway cases, values just either side of them, the largest finite values (rounding to inf), inf, NaN and
    subnormals: each written as `.to(torch.bfloat16)` gives it, not truncated."""
    launchers = load_launchers(LAUNCHERS)
    device = kernel_device()
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0x7F7FFFFF, 0x7F7F8000, 0xFF7FFFFF,
                         0x7F800000, 0x7FC00000, 0x00008000, 0x00018000, 0x80008001, 0x3F800000, 0], dtype=torch.int64)
    special = bits.to(torch.int32).view(torch.float32)
    k = special.to(device).reshape(1, 1, 1, -1)
    v = torch.randn(1, 1, 1, 4, device=device)
    keys = torch.zeros(1, 1, 2, k.shape[-1], dtype=torch.bfloat16, device=device)
    values = torch.zeros(1, 1, 2, 4, dtype=torch.bfloat16, device=device)
    launchers.kv_cache_write_forward(keys, values, torch.tensor([1], device=device), k, v)
    expected = k[0, 0, 0].to(torch.bfloat16)
    nan = expected.isnan()
    assert nan.sum() == 1 and keys[0, 0, 1][nan].isnan().all()  # which NaN is not specified
    assert_same_bits(keys[0, 0, 1][~nan], expected[~nan], "rounded keys")
    assert_same_bits(values[0, 0, 1], v[0, 0, 0].to(torch.bfloat16), "rounded values")


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_launcher_rounds_float32_of_every_magnitude_like_to(cache_dtype):
    """float32 values from 1e-42 (subnormal in every dtype) to 1e39 (inf in float16 and float32 alike), as `.to` rounds
    them, both signs."""
    launchers = load_launchers(LAUNCHERS)
    device = kernel_device()
    torch.manual_seed(3)
    scale = torch.logspace(-42, 38, 64, dtype=torch.float64)
    k = (torch.randn(2, 64, dtype=torch.float64) * scale).to(torch.float32).to(device).reshape(1, 2, 1, 64)
    v = k.flip(-1) * 3
    keys = torch.zeros(1, 2, 3, 64, dtype=cache_dtype, device=device)
    values = torch.zeros(1, 2, 3, 64, dtype=cache_dtype, device=device)
    launchers.kv_cache_write_forward(keys, values, torch.tensor([2], device=device), k, v)
    assert_same_bits(keys[:, :, 2], k[:, :, 0].to(cache_dtype), "keys")
    assert_same_bits(values[:, :, 2], v[:, :, 0].to(cache_dtype), "values")


def test_launcher_reads_any_strides_and_writes_into_cache_views():
    """k / v sliced out of wider tensors (no unit stride anywhere), a ring's index [T] of any order, caches that are
    views with a unit last stride (one kv head of a wider cache), head dims wider than one block of columns."""
    launchers = load_launchers(LAUNCHERS)
    device = kernel_device()
    torch.manual_seed(2)
    dk, dv = 8, launchers.MOST_BLOCK + 40  # values take two blocks of columns
    wide_k = torch.randn(2, 3, 4, 2 * dk, device=device)
    k = wide_k[:, :, :, ::2].transpose(1, 2)[:, :2]  # [2, 2 heads, 3 tokens, 8], strides all non-unit
    v = torch.randn(2, 3, 2, dv, device=device).to(torch.bfloat16).permute(0, 2, 1, 3)
    whole_keys = poisoned_cache(2, 3, 6, dk, torch.float16, device)
    keys = whole_keys[:, 1:]  # two of three heads
    values = poisoned_cache(2, 2, 6, dv, torch.float32, device)
    index = torch.tensor([5, 0, 3], device=device)
    expected_whole = whole_keys.clone()
    expected_whole[:, 1:] = written_one_by_one(keys, index, k)
    expected_values = written_one_by_one(values, index, v)
    launchers.kv_cache_write_forward(keys, values, index, k, v)
    assert_same_bits(whole_keys, expected_whole, "keys (head 0 untouched)")
    assert_same_bits(values, expected_values, "values")


def test_launcher_writes_nothing_for_slots_outside_the_cache():
    launchers = load_launchers(LAUNCHERS)
    device = kernel_device()
    keys, values = poisoned_cache(1, 2, 4, 8, torch.float32, device), poisoned_cache(1, 2, 4, 8, torch.float32, device)
    k, v = torch.randn(2, 1, 2, 3, 8, device=device).unbind(0)
    index = torch.tensor([1, 4, -1], device=device)
    expected_keys = written_one_by_one(keys, index, k)  # slot 1 only
    expected_values = written_one_by_one(values, index, v)
    launchers.kv_cache_write_forward(keys, values, index, k, v)
    assert_same_bits(keys, expected_keys, "keys")
    assert_same_bits(values, expected_values, "values")


def test_launchable_tells_which_caches_the_kernel_writes():
    launchers = load_launchers(LAUNCHERS)
    cache, new = torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 1, 8)
    assert launchers.launchable(cache, cache, new, new)
    assert launchers.launchable(cache.bfloat16(), cache.half(), new, new.bfloat16())
    assert not launchers.launchable(cache.transpose(2, 3).contiguous().transpose(2, 3), cache, new, new)
    assert not launchers.launchable(cache.double(), cache, new, new)
    assert not launchers.launchable(cache, cache, new, new.double())


@pytest.mark.parametrize("count", [1, 3])
def test_op_equals_the_casts_and_index_copies(count):
    torch.manual_seed(count)
    keys = poisoned_cache(2, 2, 8, 16, torch.bfloat16, "cpu")
    values = poisoned_cache(2, 2, 8, 12, torch.bfloat16, "cpu")
    k, v = transposed(2, 2, count, 16, torch.float32, "cpu"), transposed(2, 2, count, 12, torch.bfloat16, "cpu")
    index = torch.tensor([6, 1, 2][:count])
    expected_keys, expected_values = written_one_by_one(keys, index, k), written_one_by_one(values, index, v)
    assert kv_cache_write_(keys, values, index, k, v) is None
    assert_same_bits(keys, expected_keys, "keys")
    assert_same_bits(values, expected_values, "values")


def test_bad_inputs_are_refused():
    keys, values = torch.zeros(2, 2, 8, 16), torch.zeros(2, 2, 8, 4)
    k, v, index = torch.zeros(2, 2, 3, 16), torch.zeros(2, 2, 3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="keys must be 4-D"):
        kv_cache_write_(keys[0], values, index, k, v)
    with pytest.raises(ValueError, match="index must be a 1-D int64"):
        kv_cache_write_(keys, values, index.int(), k, v)
    with pytest.raises(ValueError, match="index must be a 1-D int64"):
        kv_cache_write_(keys, values, index[None], k, v)
    with pytest.raises(ValueError, match=r"k of shape \(2, 2, 2, 16\) does not fit"):
        kv_cache_write_(keys, values, index, k[:, :, :2], v)  # index length differs from k's tokens
    with pytest.raises(ValueError, match=r"v of shape \(2, 2, 3, 5\) does not fit"):
        kv_cache_write_(keys, values, index, k, torch.zeros(2, 2, 3, 5))
    with pytest.raises(ValueError, match="k of shape"):
        kv_cache_write_(keys, values, index, torch.zeros(1, 2, 3, 16), v)  # rows differ
    with pytest.raises(ValueError, match="must share rows, heads and slots"):
        kv_cache_write_(keys, torch.zeros(2, 2, 7, 4), index, k, v)
    with pytest.raises(ValueError, match="floating-point"):
        kv_cache_write_(keys, values, index, k.long(), v)
    with pytest.raises(ValueError, match="v is on meta"):
        kv_cache_write_(keys, values, index, k, v.to("meta"))


def test_opcheck():
    keys, values = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 4)
    k, v = transposed(2, 2, 3, 8, torch.float32, "cpu"), torch.randn(2, 2, 3, 4).bfloat16()
    torch.library.opcheck(torch.ops.rewrite.kv_cache_write_, (keys, values, torch.tensor([4, 0, 2]), k, v))


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compile_fullgraph_without_graph_breaks(backend):
    """The op in a compiled step: written in place, read after (the cache a step attends over)."""
    def step(keys, values, index, k, v):
        kv_cache_write_(keys, values, index, k * 2, v)
        return keys[:, :, index].float() + 1, values[:, :, index] * 2

    torch.manual_seed(0)
    k, v = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 4)
    index = torch.tensor([3])
    eager_caches = torch.randn(2, 2, 6, 8).bfloat16(), torch.randn(2, 2, 6, 4)
    compiled_caches = tuple(c.clone() for c in eager_caches)
    want = step(*eager_caches, index, k, v)
    got = torch.compile(step, fullgraph=True, backend=backend)(*compiled_caches, index, k, v)
    for a, e in zip((*got, *compiled_caches), (*want, *eager_caches), strict=True):
        assert torch.equal(a, e)


@pytest.mark.gpu
@needs_cuda
def test_cuda_op_writes_in_one_launch_and_replays_from_a_cuda_graph():
    torch.manual_seed(0)
    keys = poisoned_cache(4, 2, 32, 128, torch.bfloat16, "cuda")
    values = poisoned_cache(4, 2, 32, 64, torch.bfloat16, "cuda")
    index = torch.tensor([5], device="cuda")
    k, v = transposed(4, 2, 1, 128, torch.float32, "cuda"), transposed(4, 2, 1, 64, torch.bfloat16, "cuda")
    expected = [written_one_by_one(keys, index, k), written_one_by_one(values, index, v)]
    for slot in (7, 9):
        expected = [written_one_by_one(c, torch.tensor([slot], device="cuda"), n) for c, n in zip(expected, (k, v))]
    kv_cache_write_(keys, values, index, k, v)  # warm-up (compiles the kernel)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kv_cache_write_(keys, values, index, k, v)
    for slot in (7, 9):
        index.fill_(slot)
        graph.replay()
    torch.cuda.synchronize()
    assert_same_bits(keys, expected[0], "keys")
    assert_same_bits(values, expected[1], "values")
