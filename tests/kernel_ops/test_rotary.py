"""rewrite::rotary_embedding and rewrite::rotary_embedding_pair: Triton launchers (bitwise against an independent
reference that rounds where PyTorch's separate ops do), the op's checks, opcheck and compile."""

import pytest
import torch

import rewrite.kernels  # noqa: F401  (registers the ops)
from rewrite.kernels import rotary_embedding, rotary_embedding_pair
from rewrite.kernels.alloc import poisoned
from rewrite.kernels.testing import assert_close, kernel_device, load_launchers

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def independent_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The two halves of the rotation written out (no rotate_half / cat), each product rounded by its own op."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c1, c2 = cos[..., :half], cos[..., half:]
    s1, s2 = sin[..., :half], sin[..., half:]
    first = (x1 * c1) + ((-x2) * s1)
    second = (x2 * c2) + (x1 * s2)
    return torch.cat([first, second], dim=-1)


def angles(batch: int, length: int, dim: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin [B, 1, T, D] as Hugging Face builds them (frequencies repeated over both halves)."""
    positions = torch.arange(length, dtype=torch.float32, device=device) + 3
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    freqs = positions[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1).expand(batch, -1, -1)
    return emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)


def queries(batch: int, heads: int, length: int, dim: int, dtype: torch.dtype, device) -> torch.Tensor:
    """[B, H, T, D] as a transposed view of [B, T, H, D] (as HF's attention makes it)."""
    return (torch.randn(batch, length, heads, dim, device=device) * 2).to(dtype).transpose(1, 2)


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, name
    assert torch.equal(actual, expected), f"{name}: {(actual != expected).sum().item()} elements differ"


@pytest.mark.parametrize("dim", [64, 100, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_forward_rounds_like_pytorch(dtype, dim):
    launchers = load_launchers("rewrite.kernels.rotary.triton_kernels")
    device = kernel_device()
    torch.manual_seed(dim)
    x = queries(2, 3, 5, dim, dtype, device)
    cos, sin = angles(2, 5, dim, dtype, device)
    with poisoned():
        got = launchers.rotary_forward(x, cos, sin)
    assert got.stride() == (x * cos).stride()  # laid out as PyTorch's own product
    assert_bitwise(got, independent_rotary(x, cos, sin), f"{dtype} D={dim}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_pair_rotates_both_tensors_in_one_launch(dtype):
    """q and k with other head counts (GQA) and layouts: each equals its own rotation."""
    launchers = load_launchers("rewrite.kernels.rotary.triton_kernels")
    device = kernel_device()
    torch.manual_seed(1)
    q = queries(2, 4, 3, 64, dtype, device)
    k = torch.randn(2, 2, 3, 64, device=device).to(dtype)  # contiguous
    cos, sin = angles(2, 3, 64, dtype, device)
    with poisoned():
        q_out, k_out = launchers.rotary_pair_forward(q, k, cos, sin)
    assert_bitwise(q_out, independent_rotary(q, cos, sin), "q")
    assert_bitwise(k_out, independent_rotary(k, cos, sin), "k")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_forward_promotes_like_pytorch_with_float32_angles(dtype):
    """A half-precision x by float32 cos / sin gives float32, as `x * cos` does."""
    launchers = load_launchers("rewrite.kernels.rotary.triton_kernels")
    device = kernel_device()
    x = queries(1, 2, 4, 64, dtype, device)
    cos, sin = angles(1, 4, 64, torch.float32, device)
    with poisoned():
        got = launchers.rotary_forward(x, cos, sin)
    assert got.dtype == torch.float32
    assert_close(got, independent_rotary(x.double(), cos.double(), sin.double()), 1e-6)
    assert_bitwise(got, independent_rotary(x, cos, sin), f"{dtype} x, float32 angles")


def test_triton_forward_other_ranks_and_a_sliced_input():
    """3-D and 5-D inputs, cos / sin of fewer dims, and x a slice of a wider last dim (partial rotary)."""
    launchers = load_launchers("rewrite.kernels.rotary.triton_kernels")
    device = kernel_device()
    wide = torch.randn(3, 7, 48, device=device)
    x = wide[..., :32]
    cos, sin = torch.randn(7, 32, device=device), torch.randn(7, 32, device=device)
    with poisoned():
        got = launchers.rotary_forward(x, cos, sin)
    assert_bitwise(got, independent_rotary(x, cos, sin), "3-D sliced")
    x5 = torch.randn(2, 2, 3, 4, 16, device=device).to(torch.bfloat16)
    cos5, sin5 = torch.randn(2, 1, 3, 1, 16, device=device), torch.randn(2, 1, 3, 1, 16, device=device)
    with poisoned():
        got = launchers.rotary_forward(x5, cos5.bfloat16(), sin5.bfloat16())
    assert_bitwise(got, independent_rotary(x5, cos5.bfloat16(), sin5.bfloat16()), "5-D")


def test_op_equals_the_decomposed_expression_on_the_cpu():
    x = queries(2, 3, 5, 64, torch.bfloat16, "cpu")
    k = torch.randn(2, 1, 5, 64).bfloat16()
    cos, sin = angles(2, 5, 64, torch.bfloat16, "cpu")
    assert_bitwise(rotary_embedding(x, cos, sin), independent_rotary(x, cos, sin), "op")
    q_out, k_out = rotary_embedding_pair(x, k, cos, sin)
    assert_bitwise(q_out, independent_rotary(x, cos, sin), "pair q")
    assert_bitwise(k_out, independent_rotary(k, cos, sin), "pair k")


def test_results_are_laid_out_in_memory_as_the_inputs():
    """As PyTorch lays out `x * cos` (model code may view the result as only that layout allows): q as a transposed
    [B, T, H, D] and k contiguous, through the launchers, the op on the CPU and its fake."""
    launchers = load_launchers("rewrite.kernels.rotary.triton_kernels")
    device = kernel_device()
    q, k = queries(2, 3, 5, 64, torch.float32, device), torch.randn(2, 1, 5, 64, device=device)
    cos, sin = angles(2, 5, 64, torch.float32, device)
    with poisoned():
        single, (q_out, k_out) = launchers.rotary_forward(q, cos, sin), launchers.rotary_pair_forward(q, k, cos, sin)
    for name, got, x in (("single", single, q), ("pair q", q_out, q), ("pair k", k_out, k)):
        assert got.stride() == (x * cos).stride(), name
        assert_bitwise(got, independent_rotary(x, cos, sin), name)
    q, k, cos, sin = (t.cpu() for t in (q, k, cos, sin))
    assert rotary_embedding(q, cos, sin).stride() == (q * cos).stride()
    with torch._subclasses.FakeTensorMode() as mode:
        fake = torch.ops.rewrite.rotary_embedding_pair(*(mode.from_tensor(t) for t in (q, k, cos, sin)))
    assert [t.stride() for t in fake] == [(q * cos).stride(), (k * cos).stride()]


def test_op_refuses_what_it_cannot_rotate():
    cos, sin = angles(1, 2, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="even last dimension"):
        rotary_embedding(torch.randn(1, 1, 2, 7), cos[..., :7], sin[..., :7])
    with pytest.raises(ValueError, match="does not broadcast"):
        rotary_embedding(torch.randn(1, 1, 1, 8), cos, sin)  # cos would grow x
    with pytest.raises(ValueError, match="one dtype"):
        rotary_embedding(torch.randn(1, 1, 2, 8).bfloat16(), cos.bfloat16(), sin)
    with pytest.raises(ValueError, match="floating-point"):
        rotary_embedding(torch.ones(1, 1, 2, 8, dtype=torch.long), cos, sin)


def test_opcheck():
    x = queries(2, 2, 3, 16, torch.float32, "cpu")
    cos, sin = angles(2, 3, 16, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.rewrite.rotary_embedding, (x, cos, sin))
    torch.library.opcheck(torch.ops.rewrite.rotary_embedding_pair, (x, torch.randn(2, 1, 3, 16), cos, sin))


def test_compile_fullgraph_without_graph_breaks():
    def rotate(q, k, cos, sin):
        q_out, k_out = rotary_embedding_pair(q * 2, k, cos, sin)
        return rotary_embedding(q_out, cos, sin) + 1, k_out

    q, k = queries(2, 2, 3, 16, torch.float32, "cpu"), torch.randn(2, 1, 3, 16)
    cos, sin = angles(2, 3, 16, torch.float32, "cpu")
    compiled = torch.compile(rotate, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(q, k, cos, sin), rotate(q, k, cos, sin), strict=True):
        assert_bitwise(got, want, "compiled")
