"""flex_sliding_window_attention (FlexAttention with a block mask of the window) against the dense-mask reference:
block classes against an element-wise mask, eager outputs and gradients on the CPU, the compiled (block-sparse)
CPU kernel, the block-mask cache, the public BACKEND switch, and bf16 on CUDA."""

import itertools

import pytest
import torch
import torch.nn.attention.flex_attention as torch_flex

import rewrite.kernels.sliding_window.api as api
import rewrite.kernels.sliding_window.flex as flex
from rewrite.kernels.sliding_window import sliding_window_attention
from rewrite.kernels.sliding_window.flex import flex_sliding_window_attention
from rewrite.kernels.sliding_window.reference import (
    sliding_window_backward_reference,
    sliding_window_reference,
    visible,
)
from rewrite.kernels.testing import TOLERANCE, assert_close

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on the CPU


def make_inputs(dtype, device, *, batch=1, length=19, heads=4, kv_heads=2, dk=16, dv=16, cu_seqlens=None):
    q = torch.randn(batch, length, heads, dk, dtype=dtype, device=device)
    k = torch.randn(batch, length, kv_heads, dk, dtype=dtype, device=device)
    v = torch.randn(batch, length, kv_heads, dv, dtype=dtype, device=device)
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int32, device=device)
    return q, k, v, cu


CASES = [  # odd lengths, window below and above T, sinks 0 and 2, lookahead 0 and > 0, GQA, packed short sequences
    dict(shape=dict(batch=2, length=19, heads=4, kv_heads=2, dk=16, dv=8), window=5, sinks=0, lookahead=0),
    dict(shape=dict(length=23, heads=2, kv_heads=1, dk=24, dv=8, cu_seqlens=[0, 1, 2, 12, 12, 23]),
         window=4, sinks=2, lookahead=3),
    dict(shape=dict(length=9, heads=3, kv_heads=3), window=50, sinks=2, lookahead=0),
    dict(shape=dict(length=31, heads=4, kv_heads=1), window=7, sinks=2, lookahead=0),
    dict(shape=dict(length=17, heads=2, kv_heads=2, cu_seqlens=[0, 3, 4, 17]), window=20, sinks=0, lookahead=5),
    dict(shape=dict(batch=2, length=13, heads=2, kv_heads=1), window=1, sinks=0, lookahead=2),
    dict(shape=dict(length=11, heads=2, kv_heads=1, cu_seqlens=[0, 2, 2, 3, 11]), window=3, sinks=2, lookahead=0),
]


def _case_id(case):
    return f"T{case['shape']['length']}-w{case['window']}-s{case['sinks']}-a{case['lookahead']}" + (
        "-packed" if case["shape"].get("cu_seqlens") else "")


def _options(case):
    return dict(sinks=case["sinks"], lookahead=case["lookahead"])


@pytest.fixture
def cpu_flex_backward(monkeypatch):
    """PyTorch refuses FlexAttention's backward on the CPU up front, yet its eager (math) backward runs there;
    lifting the refusal lets the CPU check our layout, mask function and GQA gradients. The compiled CUDA
    backward is checked by the CUDA test."""
    monkeypatch.setattr(torch_flex, "_validate_device", lambda query, key, value: None)


# -- block classes ------------------------------------------------------------------------------------------


def dense_visible(length, window, sinks, lookahead, cu_seqlens):
    """[T, T] element-wise visibility, per sequence when packed (from the reference's rule)."""
    if cu_seqlens is None:
        return visible(length, window, sinks, torch.device("cpu"), lookahead)
    mask = torch.zeros(length, length, dtype=torch.bool)
    for start, end in itertools.pairwise(cu_seqlens):
        mask[start:end, start:end] = visible(end - start, window, sinks, torch.device("cpu"), lookahead)
    return mask


def block_any_all(mask, block_size):
    """(some element visible, every element visible and inside [0, T)) per block pair of a [T, T] mask."""
    length = mask.shape[0]
    n = -(-length // block_size)
    padded = torch.zeros(n * block_size, n * block_size, dtype=torch.bool)
    padded[:length, :length] = mask
    blocks = padded.view(n, block_size, n, block_size).transpose(1, 2)
    return blocks.any((-2, -1)), blocks.all(-1).all(-1)


BLOCK_SWEEP = list(itertools.product(
    [1, 7, 33, 64, 100],  # length
    [1, 3, 8, 20, 200],  # window
    [0, 2, 9],  # sinks
    [0, 5],  # lookahead
    [4, 16],  # block size
))


@pytest.mark.parametrize("packed", [False, True])
def test_block_classes_cover_the_mask_and_full_blocks_are_full(packed):
    for length, window, sinks, lookahead, block_size in BLOCK_SWEEP:
        cu = None
        if packed:
            cu = sorted({0, length, min(1, length), min(2, length), length // 3, length // 3, (2 * length) // 3})
            cu = [0, *[c for c in cu if 0 < c < length], length]
            cu.insert(2, cu[1])  # an empty sequence
        mask = dense_visible(length, window, sinks, lookahead, cu)
        tables = None if cu is None else flex._sequence_tables(
            torch.tensor(cu), -(-length // block_size) * block_size, torch.device("cpu"))
        partial, full = flex.block_classes(length, window, sinks, lookahead, tables, block_size, torch.device("cpu"))
        any_visible, all_visible = block_any_all(mask, block_size)
        label = f"T={length} w={window} sinks={sinks} lookahead={lookahead} block={block_size} cu={cu}"
        assert not (partial & full).any(), label
        assert not (full & ~all_visible).any(), f"a full block hides a key: {label}"
        assert not (any_visible & ~(partial | full)).any(), f"a block with visible keys is skipped: {label}"
        if not packed:  # without packing the listed blocks are exactly those with a visible key
            assert torch.equal(partial | full, any_visible), label


def test_sequence_tables_skip_empty_sequences_and_mark_padding():
    ids, starts = flex._sequence_tables(torch.tensor([0, 2, 2, 3, 7]), 8, torch.device("cpu"))
    assert ids.tolist() == [0, 0, 2, 3, 3, 3, 3, -1]
    assert starts.tolist() == [0, 0, 2, 3, 3, 3, 3, 0]


# -- outputs and gradients on the CPU (eager FlexAttention) -------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_output_matches_reference(case, dtype):
    q, k, v, cu = make_inputs(dtype, "cpu", **case["shape"])
    o = flex_sliding_window_attention(q, k, v, case["window"], scale=0.3, cu_seqlens=cu, **_options(case))
    o_ref, _ = sliding_window_reference(q, k, v, case["window"], case["sinks"], 0.3, cu, case["lookahead"])
    assert o.dtype == dtype and o.is_contiguous()
    assert_close(o, o_ref, TOLERANCE[dtype], "o")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_gradients_match_reference(case, dtype, cpu_flex_backward):
    q, k, v, cu = make_inputs(dtype, "cpu", **case["shape"])
    do = torch.randn(*q.shape[:-1], v.shape[-1], dtype=dtype)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o = flex_sliding_window_attention(*leaves, case["window"], cu_seqlens=cu, **_options(case))
    grads = torch.autograd.grad(o, leaves, do)
    scale = q.shape[-1] ** -0.5
    expected = sliding_window_backward_reference(do, q, k, v, case["window"], case["sinks"], scale, cu,
                                                 case["lookahead"])
    for name, actual, reference in zip(("dq", "dk", "dv"), grads, expected):
        assert_close(actual, reference, TOLERANCE[dtype], name)


def test_default_scale_and_empty_input():
    q, k, v, _ = make_inputs(torch.float64, "cpu", length=12)
    o = flex_sliding_window_attention(q, k, v, 4, sinks=1)
    assert_close(o, sliding_window_reference(q, k, v, 4, 1, 16**-0.5, None)[0], TOLERANCE[torch.float64])
    empty = flex_sliding_window_attention(q[:, :0], k[:, :0], v[:, :0], 4)
    assert empty.shape == (1, 0, 4, 16)


# -- the compiled CPU kernel: it skips the blocks the mask leaves out, so it checks the block mask itself ----


@pytest.mark.parametrize("case", [
    dict(length=150, cu_seqlens=None, window=20, sinks=2, lookahead=3),
    dict(length=150, cu_seqlens=[0, 1, 40, 40, 97, 150], window=24, sinks=2, lookahead=0),
], ids=["plain", "packed"])
def test_compiled_cpu_kernel_with_small_blocks_matches_reference(case):
    q, k, v, cu = make_inputs(torch.float32, "cpu", length=case["length"], heads=2, kv_heads=1,
                              cu_seqlens=case["cu_seqlens"])
    block_mask = flex.sliding_window_block_mask(case["length"], case["window"], case["sinks"], case["lookahead"], cu,
                                                torch.device("cpu"), block_size=16)
    assert block_mask.sparsity() > 30  # most blocks are skipped
    compiled = torch.compile(torch_flex.flex_attention, dynamic=False)
    o = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, scale=0.3,
                 enable_gqa=True).transpose(1, 2)
    o_ref, _ = sliding_window_reference(q, k, v, case["window"], case["sinks"], 0.3, cu, case["lookahead"])
    assert_close(o, o_ref, TOLERANCE[torch.float32], "o")


# -- block-mask cache ---------------------------------------------------------------------------------------


def test_block_mask_is_reused_and_keyed_on_packing_values():
    cpu = torch.device("cpu")
    first = flex.cached_block_mask(40, 6, 1, 0, None, cpu)
    assert flex.cached_block_mask(40, 6, 1, 0, None, cpu) is first
    assert flex.cached_block_mask(40, 6, 1, 2, None, cpu) is not first
    for bounds in ([0, 10, 40], [0, 30, 40], [0, 10, 40]):  # same T, other sequences: no stale mask
        q, k, v, cu = make_inputs(torch.float64, "cpu", length=40, cu_seqlens=bounds)
        o = flex_sliding_window_attention(q, k, v, 6, sinks=1, scale=0.3, cu_seqlens=cu)
        assert_close(o, sliding_window_reference(q, k, v, 6, 1, 0.3, cu)[0], TOLERANCE[torch.float64], str(bounds))
    for length in range(50, 50 + flex._CACHE_ENTRIES + 3):
        flex.cached_block_mask(length, 6, 1, 0, None, cpu)
    assert len(flex._block_masks) == flex._CACHE_ENTRIES


# -- the public function's BACKEND switch -------------------------------------------------------------------


def test_backend_flex_routes_the_public_function_through_flex(monkeypatch):
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return flex_sliding_window_attention(*args, **kwargs)

    monkeypatch.setattr(api, "BACKEND", "flex")
    monkeypatch.setattr(flex, "flex_sliding_window_attention", counted)
    case = CASES[1]
    q, k, v, cu = make_inputs(torch.float64, "cpu", **case["shape"])
    o = sliding_window_attention(q, k, v, case["window"], cu_seqlens=cu, **_options(case))
    o_ref, _ = sliding_window_reference(q, k, v, case["window"], case["sinks"], 24**-0.5, cu, case["lookahead"])
    assert calls == [1]
    assert_close(o, o_ref, TOLERANCE[torch.float64], "o")


def test_backend_default_is_triton_and_unknown_backends_are_refused(monkeypatch):
    assert api.BACKEND == "triton"
    q, k, v, _ = make_inputs(torch.float32, "cpu")
    monkeypatch.setattr(api, "BACKEND", "flash")
    with pytest.raises(ValueError, match="BACKEND"):
        sliding_window_attention(q, k, v, 4)


# -- CUDA: compiled FlexAttention in bf16 -------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("case", [
    dict(shape=dict(heads=8, kv_heads=2), window=128, sinks=0, lookahead=0),
    dict(shape=dict(heads=8, kv_heads=8, cu_seqlens=[0, 1, 300, 999, 1000]), window=128, sinks=4, lookahead=16),
], ids=["gqa", "packed-sinks-lookahead"])
def test_cuda_bfloat16_against_float64(case):
    q, k, v, cu = make_inputs(torch.bfloat16, "cuda", length=1000, dk=128, dv=128, **case["shape"])
    do = torch.randn(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o = flex_sliding_window_attention(*leaves, case["window"], cu_seqlens=cu, **_options(case))
    grads = torch.autograd.grad(o, leaves, do)
    d = [x.double() for x in (q, k, v)]
    args = (case["window"], case["sinks"], 128**-0.5, cu, case["lookahead"])
    o64, _ = sliding_window_reference(*d, *args)
    grads64 = sliding_window_backward_reference(do.double(), *d, *args)
    assert_close(o, o64, 1e-2, "o")
    for name, actual, reference in zip(("dq", "dk", "dv"), grads, grads64):
        assert_close(actual, reference, 1e-2, name)
