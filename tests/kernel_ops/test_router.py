"""rewrite::route: op and Triton launcher vs a float64 loop, gradients, opcheck, export."""

import pytest
import torch

import rewrite.kernels.router  # noqa: F401  (registers the op)
from rewrite.kernels.alloc import poisoned
from rewrite.kernels.router import route
from rewrite.kernels.router.naive import route_naive
from rewrite.kernels.testing import assert_close, kernel_device, load_launchers

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SHAPES = [(5, 7, 24), (3, 40, 130), (1, 1, 8)]


def random_inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    weight = (torch.randn(shape[-1], generator=g, dtype=torch.float64) / shape[-1] ** 0.5 * 8).to(dtype=dtype, device=device)
    bias = torch.tensor([0.1], dtype=dtype, device=device)
    return x, weight, bias


def threshold_between(probs: torch.Tensor) -> float:
    """A threshold well away from every probability, with rows on both sides when there are two or more."""
    values = sorted(probs.tolist())
    if len(values) == 1:
        return values[0] - 0.01
    gaps = [(b - a, (a + b) / 2) for a, b in zip(values, values[1:])]
    return max(gaps)[1]


def check_against_naive(prob, order, count, x, weight, bias, threshold, tol):
    want_prob, want_order, want_count = route_naive(x, weight, float(bias.double()), threshold)
    assert_close(prob, want_prob, tol, "prob")
    assert order.tolist() == want_order
    assert int(count) == want_count


@pytest.mark.parametrize("shape", SHAPES)
def test_op_matches_naive_loop(shape):
    x, weight, bias = random_inputs(shape, torch.float32, "cpu")
    probs, _, _ = route(x, weight, bias, 1.0)
    threshold = threshold_between(probs)
    check_against_naive(*route(x, weight, bias, threshold), x, weight, bias, threshold, 1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_launcher_matches_naive_loop(shape, dtype):
    launchers = load_launchers("rewrite.kernels.router.triton_kernels")
    x, weight, bias = random_inputs(shape, dtype, kernel_device(), seed=1)
    probs, _, _ = route(x.cpu().float(), weight.cpu().float(), bias.cpu().float(), 1.0)
    threshold = threshold_between(probs)
    with poisoned():
        got = launchers.route_forward(x, weight, bias, threshold)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    check_against_naive(*(t.cpu() for t in got), x.cpu(), weight.cpu(), bias.cpu(), threshold, tol)


def test_triton_launcher_all_skipped_and_none_skipped():
    launchers = load_launchers("rewrite.kernels.router.triton_kernels")
    x, weight, bias = random_inputs((6, 9, 16), torch.float32, kernel_device())
    with poisoned():
        _, order, count = launchers.route_forward(x, weight, bias, -1.0)
    assert int(count) == 0 and order.tolist() == list(range(6))
    with poisoned():
        _, order, count = launchers.route_forward(x, weight, bias, 1.0)
    assert int(count) == 6 and order.tolist() == list(range(6))


def test_gradients_match_autograd_of_the_formula():
    x, weight, bias = random_inputs((4, 6, 10), torch.float64, "cpu")
    for t in (x, weight, bias):
        t.requires_grad_()
    dprob = torch.randn(4, dtype=torch.float64)
    prob, _, _ = route(x, weight, bias)
    got = torch.autograd.grad(prob, (x, weight, bias), dprob)
    want_prob = torch.sigmoid(x.mean(1) @ weight + bias)
    want = torch.autograd.grad(want_prob, (x, weight, bias), dprob)
    for g, w, name in zip(got, want, ("dx", "dweight", "dbias")):
        assert_close(g.double(), w, 1e-6, name)


def test_bad_arguments_name_the_argument():
    x, weight, bias = random_inputs((2, 3, 8), torch.float32, "cpu")
    with pytest.raises(ValueError, match="weight must have shape \\[8\\]"):
        route(x, weight[:4], bias)
    with pytest.raises(ValueError, match="x must be a floating-point \\[B, L, D\\]"):
        route(x[0], weight, bias)
    with pytest.raises(ValueError, match="bias must hold one value"):
        route(x, weight, torch.zeros(2))


def test_opcheck():
    x, weight, bias = random_inputs((3, 5, 8), torch.float32, "cpu")
    torch.library.opcheck(torch.ops.rewrite.route, (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), 0.5))


class Router(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(dim))
        self.bias = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor):
        return route(x * 2, self.weight, self.bias)


def test_export_keeps_the_op():
    exported = torch.export.export(Router(8), (torch.randn(3, 5, 8),))
    targets = {node.target for node in exported.graph.nodes if node.op == "call_function"}
    assert torch.ops.rewrite.route.default in targets


@gpu
def test_cuda_bfloat16_long_sequence_against_float64():
    x, weight, bias = random_inputs((3, 5000, 1024), torch.bfloat16, "cuda")
    prob, order, count = route(x, weight, bias, 0.5)
    want = torch.sigmoid(x.double().mean(1) @ weight.double() + bias.double())
    assert_close(prob, want, 1e-2, "prob")
    skipped = prob > 0.5
    assert int(count) == int((~skipped).sum())
    assert order.tolist() == torch.argsort(skipped.to(torch.int8).cpu(), stable=True).tolist()
