"""rewrite::rms_norm_cast: the Triton launcher against the Hugging Face norms written out in PyTorch (every cast
order, float32 / bfloat16 / float16), the op's CPU implementation, its checks, and its missing backward; the same
for rewrite::add_rms_norm_cast, the residual add before the norm (its sum bitwise aten.add's) and the norm of the sum.

Measured under TRITON_INTERPRET=1 (the bounds below leave room): float32 within 4e-7 relative of the decomposed
norm; bfloat16 / float16 equal to it in all but about 1 element in 10^4, those 1 unit in the last place apart
(the reduction order changes float32 rounding, which now and then moves a rounding to the narrow dtype).
"""

import pytest
import torch

import rewrite.kernels  # noqa: F401  (registers the ops)
from rewrite.kernels.alloc import poisoned
from rewrite.kernels.rms_norm import add_rms_norm_cast, rms_norm_cast
from rewrite.kernels.testing import assert_close, kernel_device, load_launchers

EPS = 1e-6


def llama_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm.forward (also Mistral, Qwen2, Qwen3, Phi-3, Granite)."""
    hidden = x.to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + EPS)
    return weight * hidden.to(x.dtype)


def gemma_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """GemmaRMSNorm.forward (also Gemma2, Gemma3)."""
    hidden = x.float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + EPS)
    return (hidden * (1.0 + weight.float())).type_as(x)


def olmo2_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Olmo2RMSNorm.forward."""
    hidden = x.to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + EPS)
    return (weight * hidden).to(x.dtype)


VARIANTS = {  # name: (the model's norm, rms_norm_cast keywords given x and weight)
    "llama": (llama_norm, lambda x, w: {"round_normed": True, "out_dtype": torch.promote_types(w.dtype, x.dtype)}),
    "gemma": (gemma_norm, lambda x, w: {"weight_offset": 1.0}),
    "olmo2": (olmo2_norm, lambda x, w: {}),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def inputs(shape, dtype, weight_dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(dtype).to(device)
    weight = (torch.randn(shape[-1], generator=g) * 0.3 + 1.0).to(weight_dtype).to(device)
    return x, weight


def assert_matches_the_model(got: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """float32 within 1e-6 relative; a narrow dtype at most 1 unit in the last place apart, in under 1% of elements."""
    assert got.dtype == expected.dtype and got.shape == expected.shape, name
    if expected.dtype == torch.float32:
        assert_close(got, expected, 1e-6, name)
        return
    a, e = got.double(), expected.double()
    assert torch.isfinite(a).all(), f"{name}: not finite"
    ulp = torch.finfo(expected.dtype).eps * e.abs()
    assert ((a - e).abs() <= ulp).all(), f"{name}: more than 1 ulp apart: {(a - e).abs().max().item():.3g}"
    apart = (a != e).float().mean().item()
    assert apart < 0.01, f"{name}: {apart:.2%} of the elements differ"


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 100), (2, 3, 2048)])
def test_triton_matches_the_models_norm(variant, dtype, shape):
    launchers = load_launchers("rewrite.kernels.rms_norm.triton_kernels")
    model_norm, keywords = VARIANTS[variant]
    for weight_dtype in dict.fromkeys([dtype, torch.float32]):  # model dtype, and norm weights kept in float32
        x, weight = inputs(shape, dtype, weight_dtype, kernel_device())
        options = {"weight_offset": 0.0, "round_normed": False, "out_dtype": x.dtype, **keywords(x, weight)}
        with poisoned():
            got = launchers.rms_norm_cast_forward(x, weight, EPS, options["weight_offset"], options["round_normed"],
                                                  options["out_dtype"])
        assert_matches_the_model(got, model_norm(x, weight), f"{variant} {dtype} weight {weight_dtype} {shape}")


def test_triton_reads_rows_of_a_strided_input():
    """A transposed [B, H, T, D] input (Gemma3's q / k norms) gives the contiguous input's result."""
    launchers = load_launchers("rewrite.kernels.rms_norm.triton_kernels")
    x, weight = inputs((2, 5, 3, 16), torch.bfloat16, torch.bfloat16, kernel_device())
    x = x.transpose(1, 2)
    with poisoned():
        got = launchers.rms_norm_cast_forward(x, weight, EPS, 1.0, False, torch.bfloat16)
    assert got.shape == x.shape
    assert_matches_the_model(got, gemma_norm(x.contiguous(), weight), "strided")


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_op_on_the_cpu_is_the_models_norm(variant, dtype):
    model_norm, keywords = VARIANTS[variant]
    x, weight = inputs((3, 4, 24), dtype, torch.float32 if variant == "llama" else dtype, "cpu")
    got = rms_norm_cast(x, weight, EPS, **keywords(x, weight))
    assert torch.equal(got, model_norm(x, weight))


def test_opcheck():
    x, weight = inputs((4, 24), torch.bfloat16, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.rewrite.rms_norm_cast, (x, weight, EPS, 0.0, True, torch.float32))
    torch.library.opcheck(torch.ops.rewrite.rms_norm_cast, (x, weight.bfloat16(), EPS, 1.0, False, torch.bfloat16))


def test_compile_fullgraph_keeps_the_op():
    x, weight = inputs((3, 5, 32), torch.float32, torch.float32, "cpu")

    def norm(x, weight):
        return rms_norm_cast(x * 2, weight, EPS, weight_offset=1.0) + 1

    compiled = torch.compile(norm, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, weight), norm(x, weight))


def test_backward_is_refused_and_bad_arguments_are_named():
    x, weight = inputs((3, 8), torch.float32, torch.float32, "cpu")
    y = rms_norm_cast(x.requires_grad_(), weight)
    with pytest.raises(RuntimeError, match="forward only"):
        y.sum().backward()
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm_cast(x, weight[:4])
    with pytest.raises(ValueError, match="x must be float32, float16 or bfloat16"):
        rms_norm_cast(x.detach().double(), weight)


def residual_add(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """A decoder layer's `residual + hidden` as aten.add computes it: in float32, rounded to the inputs' dtype."""
    return (x.to(torch.float32) + residual.to(torch.float32)).to(x.dtype)


def add_inputs(shape, dtype, weight_dtype, device, seed=0):
    """(layer output, residual stream, norm weight); the residual larger, so that the sum rounds."""
    x, weight = inputs(shape, dtype, weight_dtype, device, seed)
    g = torch.Generator().manual_seed(seed + 1)
    residual = (torch.randn(shape, generator=g) * 20).to(dtype).to(device)
    return x, residual, weight


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7, 100), (2, 3, 2048)])
def test_triton_add_then_norm_matches_the_models_add_and_norm(variant, dtype, shape):
    launchers = load_launchers("rewrite.kernels.rms_norm.triton_kernels")
    model_norm, keywords = VARIANTS[variant]
    for weight_dtype in dict.fromkeys([dtype, torch.float32]):
        x, residual, weight = add_inputs(shape, dtype, weight_dtype, kernel_device())
        options = {"weight_offset": 0.0, "round_normed": False, "out_dtype": x.dtype, **keywords(x, weight)}
        with poisoned():
            total, got = launchers.add_rms_norm_cast_forward(
                x, residual, weight, EPS, options["weight_offset"], options["round_normed"], options["out_dtype"])
        name = f"{variant} {dtype} weight {weight_dtype} {shape}"
        expected_total = residual_add(x, residual)
        assert torch.equal(expected_total, x + residual), name  # the written-out add is aten's
        assert total.dtype == dtype and total.shape == x.shape and torch.equal(total, expected_total), name
        assert_matches_the_model(got, model_norm(expected_total, weight), name)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_op_on_the_cpu_is_the_models_add_and_norm(variant, dtype):
    model_norm, keywords = VARIANTS[variant]
    x, residual, weight = add_inputs((3, 4, 24), dtype, torch.float32 if variant == "llama" else dtype, "cpu")
    total, got = add_rms_norm_cast(x, residual, weight, EPS, **keywords(x, weight))
    assert torch.equal(total, residual_add(x, residual))
    assert torch.equal(got, model_norm(residual_add(x, residual), weight))


def test_add_opcheck():
    x, residual, weight = add_inputs((4, 24), torch.bfloat16, torch.float32, "cpu")
    op = torch.ops.rewrite.add_rms_norm_cast
    torch.library.opcheck(op, (x, residual, weight, EPS, 0.0, True, torch.float32))
    torch.library.opcheck(op, (x, residual, weight.bfloat16(), EPS, 1.0, False, torch.bfloat16))
    torch.library.opcheck(op, (x.float(), residual.float(), weight, EPS, 0.0, False, torch.float32))


def test_compile_fullgraph_keeps_the_add_op():
    x, residual, weight = add_inputs((3, 5, 32), torch.float32, torch.float32, "cpu")
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    def layer_tail(x, residual, weight):
        total, normed = add_rms_norm_cast(x * 2, residual, weight, EPS, weight_offset=1.0)
        return total - 1, normed + 1

    compiled = torch.compile(layer_tail, fullgraph=True, backend=recording)
    for got, expected in zip(compiled(x, residual, weight), layer_tail(x, residual, weight), strict=True):
        assert torch.equal(got, expected)
    assert len(graphs) == 1 and "add_rms_norm_cast" in graphs[0]
    aot = torch.compile(layer_tail, fullgraph=True, backend="aot_eager")
    for got, expected in zip(aot(x, residual, weight), layer_tail(x, residual, weight), strict=True):
        assert torch.equal(got, expected)


def test_add_backward_is_refused_and_bad_arguments_are_named():
    x, residual, weight = add_inputs((3, 8), torch.float32, torch.float32, "cpu")
    total, normed = add_rms_norm_cast(x.requires_grad_(), residual, weight)
    with pytest.raises(RuntimeError, match="forward only"):
        (total.sum() + normed.sum()).backward()
    with pytest.raises(ValueError, match="residual must have x's dtype and shape"):
        add_rms_norm_cast(x, residual[:2], weight)
    with pytest.raises(ValueError, match="residual must have x's dtype and shape"):
        add_rms_norm_cast(x, residual.bfloat16(), weight)
    with pytest.raises(ValueError, match="add_rms_norm_cast: weight must have shape"):
        add_rms_norm_cast(x, residual, weight[:4])
    with pytest.raises(ValueError, match="x must be float32, float16 or bfloat16"):
        add_rms_norm_cast(x.detach().double(), residual.double(), weight)
