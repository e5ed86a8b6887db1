"""Sliding-window attention by PyTorch's flash kernels (`flash_window.py`): which calls they take, the
log-sum-exp layouts, and on the GPU the op's output and gradients against float64 and against the Triton kernels,
packed batches, GQA, lookahead, CUDA-graph capture."""

import pytest
import torch

from rewrite.kernels.packed_bounds import trusted_cu_seqlens
from rewrite.kernels.sliding_window import op as ops
from rewrite.kernels.sliding_window import sliding_window_attention
from rewrite.kernels.sliding_window.flash_window import _lse_to_flash, _lse_to_ours, flash_window_refusal
from rewrite.kernels.sliding_window.reference import (
    sliding_window_backward_reference,
    sliding_window_reference,
)
from rewrite.kernels.testing import assert_close

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def qkv(dtype=torch.bfloat16, device="cpu", *, batch=1, length=64, heads=4, kv_heads=2, dk=64, dv=64):
    return (torch.randn(batch, length, heads, dk, dtype=dtype, device=device),
            torch.randn(batch, length, kv_heads, dk, dtype=dtype, device=device),
            torch.randn(batch, length, kv_heads, dv, dtype=dtype, device=device))


@pytest.mark.parametrize(("inputs", "sinks", "why"), [
    (dict(dtype=torch.float32), 0, "dtype torch.float32"),
    (dict(), 4, "4 sink tokens"),
    (dict(dv=32), 0, "value head dim 32 differs from the key head dim 64"),
    (dict(dk=100, dv=100), 0, "head dim 100"),
    (dict(dk=264, dv=264), 0, "head dim 264"),
    (dict(), 0, "inputs on cpu, not CUDA"),
], ids=["float32", "sinks", "k-v-dims", "dim-100", "dim-264", "cpu"])
def test_refusal_says_why_the_flash_kernels_cannot_take_the_call(inputs, sinks, why):
    assert why in flash_window_refusal(*qkv(**inputs), sinks)


@pytest.mark.parametrize(("packed", "packed_switch", "want"), [
    (False, False, "flash"), (True, False, "ours"), (True, True, "flash")])
def test_backward_takes_the_flash_kernels_on_dense_calls_and_packed_ones_only_when_switched(
        packed, packed_switch, want, monkeypatch):
    """FLASH_BACKWARD (the default) sends dense calls' backward to the flash kernels; packed calls keep ours (no host
    read of cu_seqlens for the flash kernels' longest sequence) unless FLASH_BACKWARD_PACKED; both implementations
    stand in as recorders here, the dispatch is the op's CUDA implementation itself."""
    taken = []
    monkeypatch.setattr(ops, "FLASH_BACKWARD", True)
    monkeypatch.setattr(ops, "FLASH_BACKWARD_PACKED", packed_switch)
    monkeypatch.setattr(ops, "flash_window_refusal", lambda *args: None)
    monkeypatch.setattr(ops, "flash_window_backward", lambda *args: taken.append("flash"))

    class Ours:
        @staticmethod
        def sliding_window_backward(*args, **kwargs):
            taken.append("ours")

    monkeypatch.setattr(ops, "load_triton_module", lambda name: Ours)
    q, k, v = qkv()
    cu = torch.tensor([0, 20, 64], dtype=torch.int32) if packed else None
    ops._backward_cuda(torch.randn_like(v), q, k, v, v, q[..., 0].float(), 8, 0, 0.125, cu)
    assert taken == [want]


@pytest.mark.parametrize("padded", [False, True], ids=["per-token", "padded-per-sequence"])
def test_lse_layouts_round_trip(padded):
    """Ours [total, H] -> the kernels' layout -> ours, for packed sequences of uneven lengths (one empty)."""
    cu = torch.tensor([0, 3, 3, 10, 11], dtype=torch.int32)
    ours = torch.randn(11, 4)
    flash = _lse_to_flash(ours, cu, 7, padded)
    assert flash.shape == ((4, 4, 7) if padded else (4, 11))
    if padded:  # sequence 2 (tokens 3..9), offset 5 is token 8
        assert torch.equal(flash[2, :, 5], ours[8])
    assert torch.equal(_lse_to_ours(flash, cu, 11), ours)


CASES = {  # shape, window, lookahead, cu_seqlens
    "dense-gqa": (dict(batch=2, length=700, heads=8, kv_heads=2, dk=128, dv=128), 129, 0, None),
    "packed-short": (dict(length=900, heads=4, kv_heads=4, dk=64, dv=64), 200, 0, [0, 1, 2, 300, 300, 899, 900]),
    "lookahead": (dict(length=600, heads=4, kv_heads=1, dk=64, dv=64), 65, 64, [0, 37, 600]),
    "window-past-length": (dict(batch=1, length=300, heads=2, kv_heads=2, dk=32, dv=32), 4096, 0, None),
    "window-two": (dict(batch=1, length=257, heads=2, kv_heads=1, dk=256, dv=256), 2, 0, None),
}


def _kernels(monkeypatch, forward: bool, backward: bool) -> None:
    """The op's forward / backward by PyTorch's flash kernels (True, packed calls too) or by the Triton kernels."""
    monkeypatch.setattr(ops, "FLASH_FORWARD", forward)
    monkeypatch.setattr(ops, "FLASH_BACKWARD", backward)
    monkeypatch.setattr(ops, "FLASH_BACKWARD_PACKED", backward)


def _run(q, k, v, do, window, lookahead, cu):
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o = sliding_window_attention(*leaves, window, cu_seqlens=cu, lookahead=lookahead)
    return [o, *torch.autograd.grad(o, leaves, do)]


@gpu
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_flash_kernels_match_float64_and_the_triton_kernels(case, monkeypatch):
    shape, window, lookahead, cu_list = case
    torch.manual_seed(0)
    q, k, v = qkv(device="cuda", **shape)
    assert flash_window_refusal(q, k, v, 0) is None
    cu = None if cu_list is None else torch.tensor(cu_list, dtype=torch.int32, device="cuda")
    do = torch.randn_like(q[..., : v.shape[-1]])
    _kernels(monkeypatch, True, True)
    flash = _run(q, k, v, do, window, lookahead, cu)
    d = [x.double() for x in (q, k, v)]
    scale = q.shape[-1] ** -0.5
    o64, _ = sliding_window_reference(*d, window, 0, scale, cu, lookahead)
    grads64 = sliding_window_backward_reference(do.double(), *d, window, 0, scale, cu, lookahead)
    for name, got, want in zip(("o", "dq", "dk", "dv"), flash, (o64, *grads64)):
        assert_close(got, want, 1e-2, name)
    _kernels(monkeypatch, False, False)
    for name, got, want in zip(("o", "dq", "dk", "dv"), flash, _run(q, k, v, do, window, lookahead, cu)):
        assert_close(got, want, 1e-2, f"{name} (flash vs Triton)")


@gpu
@pytest.mark.parametrize(("forward", "backward"), [(False, True), (True, False)], ids=["triton-flash", "flash-triton"])
def test_either_backward_follows_either_forward(forward, backward, monkeypatch):
    """The op's o and lse mean the same on both paths: a forward by one kind of kernel, its backward by the other
    (a Triton forward with the flash backward is what the H100 timings favour), against float64."""
    torch.manual_seed(1)
    q, k, v = qkv(device="cuda", length=500)
    do = torch.randn_like(q)
    _kernels(monkeypatch, forward, backward)
    o, *grads = _run(q, k, v, do, 100, 0, None)
    d = [x.double() for x in (q, k, v)]
    assert_close(o, sliding_window_reference(*d, 100, 0, 64**-0.5, None)[0], 1e-2, "o")
    for name, got, want in zip(("dq", "dk", "dv"), grads,
                               sliding_window_backward_reference(do.double(), *d, 100, 0, 64**-0.5, None)):
        assert_close(got, want, 1e-2, name)


@gpu
def test_packed_call_replays_from_a_cuda_graph(monkeypatch):
    """Captured with packed sequences (no host read of cu_seqlens while capturing), replayed on new inputs."""
    torch.manual_seed(2)
    q, k, v = qkv(device="cuda", length=400)
    cu = torch.tensor([0, 5, 250, 400], dtype=torch.int32, device="cuda")
    _kernels(monkeypatch, True, True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sliding_window_attention(q, k, v, 64, cu_seqlens=cu)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), trusted_cu_seqlens():
        out = sliding_window_attention(q, k, v, 64, cu_seqlens=cu)
    for x in (q, k, v):
        x.copy_(torch.randn_like(x))
    graph.replay()
    want, _ = sliding_window_reference(*(x.double() for x in (q, k, v)), 64, 0, 64**-0.5, cu)
    assert_close(out, want, 1e-2, "replayed o")
