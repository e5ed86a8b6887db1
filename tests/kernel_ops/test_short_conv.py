"""rewrite::short_conv: op vs a token-loop reference, Triton launchers, varlen, caches, opcheck, compile."""

import pytest
import torch
import torch.nn.functional as F

from rewrite.kernels.short_conv import short_conv
from rewrite.kernels.short_conv.reference import short_conv_backward_reference, short_conv_reference
from rewrite.kernels.testing import assert_close, check_launcher, kernel_device, load_launchers

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TRITON = "rewrite.kernels.short_conv.triton_kernels"


def loop_conv(x, weight, bias, silu, cache, cu_seqlens):
    """Token by token: a window of the last W inputs (cache rows first), one dot product per channel."""
    dim, width = weight.shape
    bounds = [(b, 0, x.shape[1]) for b in range(x.shape[0])] if cu_seqlens is None else [
        (0, s, e) for s, e in zip(cu_seqlens.tolist(), cu_seqlens.tolist()[1:])]
    y = torch.zeros_like(x)
    finals = []
    for n, (b, start, end) in enumerate(bounds):
        window = [x.new_zeros(dim) if cache is None else cache[n, i] for i in range(width - 1)]
        for t in range(start, end):
            window.append(x[b, t])
            out = (torch.stack(window[-width:], 1) * weight).sum(1) + (0 if bias is None else bias)
            y[b, t] = F.silu(out) if silu else out
        finals.append(torch.stack(window[-(width - 1) :]))
    return y, torch.stack(finals)


def make_inputs(dtype, device, *, batch=2, length=11, dim=24, width=4, with_cache=True, cu_seqlens=None):
    n = batch if cu_seqlens is None else len(cu_seqlens) - 1
    x = torch.randn(batch, length, dim, dtype=dtype, device=device)
    weight = torch.randn(dim, width, dtype=dtype, device=device) / width**0.5
    bias = torch.randn(dim, dtype=dtype, device=device)
    cache = torch.randn(n, width - 1, dim, dtype=dtype, device=device) if with_cache else None
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int32, device=device)
    return x, weight, bias, cache, cu


def grads_of(fn, x, weight, bias, cache, cu, silu, dy, dfc):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias, cache)]
    y, final = fn(leaves[0], leaves[1], leaves[2], silu, leaves[3], cu)
    inputs = [t for t in leaves if t is not None]
    return (y, final, *torch.autograd.grad((y, final), inputs, (dy, dfc)))


CASES = [
    dict(batch=2, length=11, width=4, with_cache=True),
    dict(batch=3, length=1, width=2, with_cache=True),
    dict(batch=1, length=20, width=8, with_cache=False),
    dict(batch=1, length=17, width=3, with_cache=True, cu_seqlens=[0, 1, 2, 9, 17]),
    dict(batch=1, length=13, width=5, with_cache=False, cu_seqlens=[0, 6, 6, 7, 13]),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("silu", [False, True])
def test_op_output_and_grads_match_token_loop(case, silu):
    x, weight, bias, cache, cu = make_inputs(torch.float64, "cpu", **case)
    dy = torch.randn_like(x)
    dfc = torch.randn(cu.numel() - 1 if cu is not None else x.shape[0], weight.shape[1] - 1, x.shape[2], dtype=x.dtype)

    def op(x, w, b, silu, c, cu):
        return short_conv(x, w, b, activation="silu" if silu else None, cache=c, output_final_cache=True, cu_seqlens=cu)

    got = grads_of(op, x, weight, bias, cache, cu, silu, dy, dfc)
    want = grads_of(loop_conv, x, weight, bias, cache, cu, silu, dy, dfc)
    for name, a, e in zip(["y", "final_cache", "dx", "dweight", "dbias", "dcache"], got, want):
        assert_close(a, e, 1e-12, name)


def test_chained_calls_match_one_call():
    x, weight, bias, _, _ = make_inputs(torch.float64, "cpu", batch=2, length=10, width=4, with_cache=False)
    y, _ = short_conv(x, weight, bias, activation="silu")
    y1, c1 = short_conv(x[:, :6], weight, bias, activation="silu", output_final_cache=True)
    y2, c2 = short_conv(x[:, 6:7], weight, bias, activation="silu", cache=c1, output_final_cache=True)
    y3, _ = short_conv(x[:, 7:], weight, bias, activation="silu", cache=c2)
    assert_close(torch.cat([y1, y2, y3], 1), y, 1e-12)


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[4]])
@pytest.mark.parametrize("silu", [False, True])
def test_triton_forward_matches_reference(case, silu):
    launchers = load_launchers(TRITON)
    check_launcher(
        lambda x, w, b, c, cu: launchers.short_conv_forward(x, w, b, silu, c, cu),
        lambda x, w, b, c, cu: short_conv_reference(x, w, b, silu, c, cu),
        lambda dtype, device: make_inputs(dtype, device, **case),
    )


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3], CASES[4]])
def test_triton_backward_matches_reference(case):
    launchers = load_launchers(TRITON)

    def inputs(dtype, device):
        x, weight, bias, cache, cu = make_inputs(dtype, device, **case)
        n = x.shape[0] if cu is None else cu.numel() - 1
        dfc = torch.randn(n, weight.shape[1] - 1, x.shape[2], dtype=dtype, device=device)
        return torch.randn_like(x), dfc, x, weight, bias, cache, cu

    check_launcher(
        lambda *a: launchers.short_conv_backward(*a[:5], True, *a[5:]),
        lambda *a: short_conv_backward_reference(*a[:5], True, *a[5:]),
        inputs,
    )


def test_triton_handles_more_rows_and_channels_than_one_tile():
    launchers = load_launchers(TRITON)
    check_launcher(
        lambda x, w, b, c, cu: launchers.short_conv_forward(x, w, b, True, c, cu),
        lambda x, w, b, c, cu: short_conv_reference(x, w, b, True, c, cu),
        lambda dtype, device: make_inputs(dtype, device, batch=1, length=150, dim=70, width=4,
                                          cu_seqlens=[0, 63, 64, 130, 150]),
        dtypes=(torch.float32,), trials=1,
    )


@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("with_cache", [True, False])
def test_triton_backward_handles_more_rows_and_channels_than_one_tile(silu, with_cache):
    """The one-pass backward recomputes dz at shifted rows across tile and sequence boundaries."""
    launchers = load_launchers(TRITON)

    def inputs(dtype, device):
        x, weight, bias, cache, cu = make_inputs(dtype, device, batch=1, length=150, dim=140, width=4,
                                                 with_cache=with_cache, cu_seqlens=[0, 63, 64, 66, 130, 150])
        dfc = torch.randn(cu.numel() - 1, weight.shape[1] - 1, x.shape[2], dtype=dtype, device=device)
        return torch.randn_like(x), dfc, x, weight, bias, cache, cu

    check_launcher(
        lambda *a: launchers.short_conv_backward(*a[:5], silu, *a[5:]),
        lambda *a: short_conv_backward_reference(*a[:5], silu, *a[5:]),
        inputs,
        dtypes=(torch.float32,), trials=1,
    )


def test_triton_backward_dense_batch_over_tiles():
    launchers = load_launchers(TRITON)

    def inputs(dtype, device):
        x, weight, bias, cache, cu = make_inputs(dtype, device, batch=3, length=70, dim=20, width=3, with_cache=False)
        dfc = torch.randn(3, 2, 20, dtype=dtype, device=device)
        return torch.randn_like(x), dfc, x, weight, bias, cache, cu

    check_launcher(
        lambda *a: launchers.short_conv_backward(*a[:5], True, *a[5:]),
        lambda *a: short_conv_backward_reference(*a[:5], True, *a[5:]),
        inputs,
        dtypes=(torch.float32,), trials=1,
    )


def test_opcheck():
    x, weight, bias, cache, cu = make_inputs(torch.float32, "cpu", **CASES[3])
    args = (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), True, cache.requires_grad_(), cu)
    torch.library.opcheck(torch.ops.rewrite.short_conv, args)
    x, weight, bias, _, _ = make_inputs(torch.float32, "cpu", with_cache=False)
    torch.library.opcheck(torch.ops.rewrite.short_conv, (x.requires_grad_(), weight, None, False, None, None))
    dy, dfc = torch.randn_like(x), torch.randn(2, 3, x.shape[2])
    torch.library.opcheck(torch.ops.rewrite.short_conv_backward, (dy, dfc, x.detach(), weight, bias, True, None, None))


class ConvBlock(torch.nn.Module):
    def __init__(self, dim: int, width: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(dim, width) / width**0.5)
        self.bias = torch.nn.Parameter(torch.randn(dim))

    def forward(self, x, cache):
        y, final = short_conv(x * 2, self.weight, self.bias, activation="silu", cache=cache, output_final_cache=True)
        return y + 1, final


def test_compile_fullgraph_without_graph_breaks():
    module = ConvBlock(16, 4)
    x = torch.randn(2, 9, 16, requires_grad=True)
    cache = torch.randn(2, 3, 16)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    y, final = compiled(x, cache)
    y.sum().backward()
    y_ref, final_ref = module(x, cache)
    assert_close(y, y_ref, 1e-6)
    assert_close(final, final_ref, 1e-6)


@gpu
def test_cuda_bfloat16_against_float64():
    x, weight, bias, cache, cu = make_inputs(torch.bfloat16, kernel_device(), batch=1, length=3000, dim=512,
                                             width=4, cu_seqlens=[0, 1, 1000, 2999, 3000])
    dy = torch.randn_like(x)
    dfc = torch.randn_like(cache)

    def op(x, w, b, silu, c, cu):
        return short_conv(x, w, b, activation="silu", cache=c, output_final_cache=True, cu_seqlens=cu)

    got = grads_of(op, x, weight, bias, cache, cu, True, dy, dfc)
    d = [t.double() for t in (x, weight, bias, cache)]
    want = grads_of(short_conv_reference, *d, cu, True, dy.double(), dfc.double())
    for name, a, e in zip(["y", "final_cache", "dx", "dweight", "dbias", "dcache"], got, want):
        assert_close(a, e, 1e-2, name)
