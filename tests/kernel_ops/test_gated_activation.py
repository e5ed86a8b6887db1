"""rewrite::gated_activation: the Triton launcher against PyTorch's own `F.silu(gate) * up` and
`F.gelu(gate, approximate="tanh") * up` (float32 / bfloat16 / float16, odd widths, the strided halves of one
fused gate_up projection), the op's CPU implementation (PyTorch's ops themselves, so bitwise), its checks,
opcheck and torch.compile.

Measured under TRITON_INTERPRET=1, where the kernel's exp is NumPy's and torch's CPU kernels use SLEEF's (64 x 3000
gates ~ N(0, 9)): SiLU is bitwise in bfloat16; in float16 about 2 elements in 10^4 differ (the activation 1 ulp
apart, so the product by |up| ulps of the activation); in float32 about 16% differ, the activation within 3 ulps.
GELU-tanh differs more: its `1 + tanh(inner)` cancels for negative gates, so a tanh a float32 ulp off moves the
result by up to eps32 * |gate * up| (hundreds of output ulps where the result is tiny): about 2% (bfloat16), 3%
(float16) and 27% (float32) of the elements differ. BOUNDS states what is asserted. On CUDA the kernel calls
libdevice's exp / tanh, the functions PyTorch's CUDA kernels call; the GPU-only test asserts the same bounds (it has
not run on a GPU yet).
"""

import pytest
import torch
import torch.nn.functional as F

import rewrite.kernels  # noqa: F401  (registers the ops)
from rewrite.kernels.alloc import poisoned
from rewrite.kernels.gated_activation import gated_activation
from rewrite.kernels.testing import kernel_device, load_launchers

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KINDS = ["silu", "gelu_tanh"]
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def pytorch_gated(gate: torch.Tensor, up: torch.Tensor, kind: str) -> torch.Tensor:
    """What the model's graph computes: PyTorch's activation op, then its mul."""
    act = F.silu(gate) if kind == "silu" else F.gelu(gate, approximate="tanh")
    return act * up


def ulp(t: torch.Tensor) -> torch.Tensor:
    """The gap from |t| to the next representable value of t's dtype away from zero, in float64."""
    a = t.abs()
    return torch.nextafter(a, torch.full_like(a, float("inf"))).double() - a.double()


BOUNDS = {  # (kind, dtype): (ulps of PyTorch's activation the kernel's may be off, largest share of elements that differ)
    ("silu", torch.bfloat16): (0, 0.0),
    ("silu", torch.float16): (1, 0.01),
    ("silu", torch.float32): (4, 0.25),
    ("gelu_tanh", torch.bfloat16): (1, 0.05),
    ("gelu_tanh", torch.float16): (1, 0.05),
    ("gelu_tanh", torch.float32): (4, 0.35),
}
"""An activation off by a ulps moves the product by up to a ulps of the activation times |up|, plus 1 ulp of the
product's own rounding. A GELU-tanh activation may also be off by 4 * eps32 * |gate| (its cancelling negative
tail). The share is checked over at least 1000 elements."""


def assert_matches_pytorch(
    got: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, kind: str, name: str
) -> None:
    """`got` within BOUNDS of PyTorch's composition on the same device, and finite (no element left unwritten)."""
    expected = pytorch_gated(gate, up, kind)
    assert got.dtype == expected.dtype and got.shape == expected.shape and got.is_contiguous(), name
    a, e = got.double(), expected.double()
    assert torch.isfinite(a).all(), f"{name}: not finite (an element left unwritten?)"
    act_ulps, most_share = BOUNDS[(kind, expected.dtype)]
    act = pytorch_gated(gate, torch.ones_like(up), kind)  # the activation alone, rounded to the dtype
    act_error = act_ulps * ulp(act)
    if kind == "gelu_tanh":
        act_error = torch.maximum(act_error, 4 * torch.finfo(torch.float32).eps * gate.double().abs())
    allowed = (ulp(expected) + act_error * up.double().abs()) if act_ulps else torch.zeros_like(e)
    apart = (a - e).abs()
    assert (apart <= allowed).all(), f"{name}: off by {(apart / ulp(expected)).max().item():.3g} ulps"
    if e.numel() >= 1000:
        share = (a != e).double().mean().item()
        assert share <= most_share, f"{name}: {share:.2%} of the elements differ"


def fused_halves(rows: int, width: int, dtype: torch.dtype, device, seed: int = 0):
    """(gate, up): the two halves along the last dim of one [rows, 1, 2 * width] projection output (strided views),
    as Phi-3's `gate_up_proj(x).chunk(2, dim=-1)` gives them."""
    g = torch.Generator().manual_seed(seed)
    both = (torch.randn(rows, 1, 2 * width, generator=g) * 3).to(dtype).to(device)
    return both.chunk(2, dim=-1)


@pytest.mark.parametrize("width", [1, 37, 1000, 2500])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_triton_matches_pytorchs_activation_and_product(kind, dtype, width):
    launchers = load_launchers("rewrite.kernels.gated_activation.triton_kernels")
    gate, up = fused_halves(16, width, dtype, kernel_device(), seed=width)
    assert not gate.is_contiguous()
    with poisoned():
        got = launchers.gated_activation_forward(gate, up, kind)
    assert_matches_pytorch(got, gate, up, kind, f"{kind} {dtype} F={width}")


@pytest.mark.parametrize("kind", KINDS)
def test_triton_over_a_wide_sample_of_gates(kind):
    """Many gates over the activation's whole range (|gate| up to 12), each dtype: the bounds hold in bulk."""
    launchers = load_launchers("rewrite.kernels.gated_activation.triton_kernels")
    for dtype in DTYPES:
        g = torch.Generator().manual_seed(1)
        gate = (torch.randn(64, 4096, generator=g) * 4).clamp(-12, 12).to(dtype).to(kernel_device())
        up = (torch.randn(64, 4096, generator=g) * 2).to(dtype).to(kernel_device())
        with poisoned():
            got = launchers.gated_activation_forward(gate, up, kind)
        assert_matches_pytorch(got, gate, up, kind, f"{kind} {dtype}")


def test_triton_other_ranks_and_layouts():
    """A 3-D transposed gate (leading dims that do not merge: copied), 2-D and 1-D inputs, no rows at all."""
    launchers = load_launchers("rewrite.kernels.gated_activation.triton_kernels")
    device = kernel_device()
    gate = torch.randn(5, 3, 40, device=device).bfloat16().transpose(0, 1)
    up = torch.randn(3, 5, 40, device=device).bfloat16()
    for g, u in ((gate, up), (gate[0], up[0]), (gate[0, 0], up[0, 0]), (gate[:, :0], up[:, :0])):
        with poisoned():
            got = launchers.gated_activation_forward(g, u, "silu")
        assert_matches_pytorch(got, g, u, "silu", f"shape {tuple(g.shape)}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_op_on_the_cpu_is_pytorchs_composition_bitwise(kind, dtype):
    gate, up = fused_halves(4, 96, dtype, "cpu")
    got = gated_activation(gate, up, kind)
    assert got.is_contiguous() and torch.equal(got, pytorch_gated(gate, up, kind))


def test_op_refuses_what_it_cannot_compute():
    gate = torch.randn(2, 8)
    with pytest.raises(ValueError, match="kind must be one of"):
        gated_activation(gate, gate, "relu")
    with pytest.raises(ValueError, match="one shape"):
        gated_activation(gate, gate[:1], "silu")  # broadcasting is not the op's
    with pytest.raises(ValueError, match="share a dtype"):
        gated_activation(gate, gate.bfloat16(), "silu")
    with pytest.raises(ValueError, match="share a dtype"):
        gated_activation(gate.double(), gate.double(), "silu")
    with pytest.raises(RuntimeError, match="forward only"):
        gated_activation(gate.clone().requires_grad_(), gate, "silu").sum().backward()


@pytest.mark.parametrize("kind", KINDS)
def test_opcheck(kind):
    gate, up = fused_halves(3, 24, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.rewrite.gated_activation, (gate, up, kind))
    gate, up = fused_halves(3, 24, torch.bfloat16, "cpu")
    torch.library.opcheck(torch.ops.rewrite.gated_activation, (gate.contiguous(), up, kind))


def test_compile_fullgraph_keeps_the_op():
    def mlp(x, w):
        gate, up = (x @ w).chunk(2, dim=-1)
        return gated_activation(gate, up, "silu") + gated_activation(up, gate, "gelu_tanh")

    x, w = torch.randn(2, 3, 16), torch.randn(16, 64)
    compiled = torch.compile(mlp, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, w), mlp(x, w))


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_op_matches_pytorchs_cuda_composition(kind, dtype):
    gate, up = fused_halves(8, 14336, dtype, "cuda")
    with poisoned():
        got = gated_activation(gate, up, kind)
    assert_matches_pytorch(got, gate, up, kind, f"cuda {kind} {dtype}")
