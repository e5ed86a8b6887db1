"""rewrite::rms_norm: op vs an independent reference, Triton launchers, opcheck, compile and export."""

import pytest
import torch

import rewrite.kernels  # noqa: F401  (registers the ops)
from rewrite.kernels import rms_norm
from rewrite.kernels.rms_norm.reference import rms_norm_backward_reference, rms_norm_reference
from rewrite.kernels.testing import assert_close, check_launcher, load_launchers

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def independent_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * (x.pow(2).mean(-1, keepdim=True) + eps).rsqrt() * weight


def random_inputs(shape, dtype, device):
    x = torch.randn(shape, dtype=dtype, device=device) * 3
    weight = torch.rand(shape[-1], dtype=dtype, device=device) + 0.5
    return x, weight


@pytest.mark.parametrize("shape", [(7, 33), (2, 3, 64)])
def test_op_output_and_grads_match_autograd_in_float64(shape):
    x, weight = random_inputs(shape, torch.float64, "cpu")
    x.requires_grad_()
    weight.requires_grad_()
    dy = torch.randn(shape, dtype=torch.float64)
    y = rms_norm(x, weight, 1e-5)
    dx, dw = torch.autograd.grad(y, (x, weight), dy)
    y_ref = independent_rms_norm(x, weight, 1e-5)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x, weight), dy)
    assert_close(y, y_ref, 1e-12, "y")
    assert_close(dx, dx_ref, 1e-12, "dx")
    assert_close(dw, dw_ref, 1e-12, "dweight")


@pytest.mark.parametrize("n_cols", [16, 100])
def test_triton_forward_matches_reference(n_cols):
    launchers = load_launchers("rewrite.kernels.rms_norm.triton_kernels")
    check_launcher(
        lambda x, w: launchers.rms_norm_forward(x, w, 1e-6),
        lambda x, w: rms_norm_reference(x, w, 1e-6),
        lambda dtype, device: random_inputs((5, n_cols), dtype, device),
    )


@pytest.mark.parametrize("n_cols", [16, 100])
def test_triton_backward_matches_reference(n_cols):
    launchers = load_launchers("rewrite.kernels.rms_norm.triton_kernels")

    def make_inputs(dtype, device):
        x, weight = random_inputs((9, n_cols), dtype, device)
        return torch.randn_like(x), x, weight

    check_launcher(
        lambda dy, x, w: launchers.rms_norm_backward(dy, x, w, 1e-6),
        lambda dy, x, w: rms_norm_backward_reference(dy, x, w, 1e-6),
        make_inputs,
    )


def test_opcheck():
    x, weight = random_inputs((4, 24), torch.float32, "cpu")
    torch.library.opcheck(torch.ops.rewrite.rms_norm, (x.requires_grad_(), weight.requires_grad_(), 1e-6))
    dy = torch.randn_like(x)
    torch.library.opcheck(torch.ops.rewrite.rms_norm_backward, (dy, x.detach(), weight.detach(), 1e-6))


class Norm(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x * 2, self.weight) + 1


def test_compile_fullgraph_without_graph_breaks():
    module = Norm(32)
    x = torch.randn(3, 5, 32, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.sum().backward()
    assert_close(y, module(x), 1e-6)


def test_export_keeps_the_op():
    exported = torch.export.export(Norm(32), (torch.randn(3, 5, 32),))
    targets = {node.target for node in exported.graph.nodes if node.op == "call_function"}
    assert torch.ops.rewrite.rms_norm.default in targets


@gpu
def test_cuda_bfloat16_against_float64():
    x, weight = random_inputs((64, 4096), torch.bfloat16, "cuda")
    x.requires_grad_()
    weight.requires_grad_()
    dy = torch.randn_like(x)
    y = rms_norm(x, weight)
    dx, dw = torch.autograd.grad(y, (x, weight), dy)
    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    y64 = independent_rms_norm(x64, w64, 1e-6)
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double())
    assert_close(y, y64, 1e-2, "y")
    assert_close(dx, dx64, 1e-2, "dx")
    assert_close(dw, dw64, 1e-2, "dweight")
