"""rewrite::kv_cache_attention: the Triton split-KV decode kernel (interpreted on the CPU) and the CPU reference
against a float64 SDPA computed independently, masks with left padding and early ends, strided cache views,
fully masked queries, opcheck, torch.compile without graph breaks, a CUDA bf16 check."""

import pytest
import torch
import torch.nn.functional as F

from rewrite.kernels.alloc import poisoned
from rewrite.kernels.kv_cache_attention import kv_cache_attention
from rewrite.kernels.kv_cache_attention.reference import kv_cache_attention_reference
from rewrite.kernels.testing import TOLERANCE, assert_close, kernel_device, load_launchers

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DECODE = "rewrite.kernels.kv_cache_attention.triton_decode"


def sdpa64(q, keys, values, visible, scale):
    """Independent float64 reference: SDPA with k / v repeated per q head (zeros where a query sees nothing)."""
    group = q.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, 1)
    v = values.double().repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q.double(), k, v, attn_mask=visible, scale=scale)


def decode_mask(batch, count, slots, *, device, pad=(), ends=()):
    """[B, 1, T, S] like the decode sites build: row b's real slots are [pad[b], ends[b]); the T new tokens sit at
    slots ends[b] - T .. ends[b] - 1, each seeing the real slots up to its own."""
    pad = list(pad) + [0] * (batch - len(pad))
    ends = list(ends) + [slots] * (batch - len(ends))
    key = torch.arange(slots, device=device)
    rows = []
    for b in range(batch):
        valid = (key >= pad[b]) & (key < ends[b])
        query = ends[b] - count + torch.arange(count, device=device)
        rows.append((valid[None, :] & (key[None, :] <= query[:, None])) | (key[None, :] == query[:, None]))
    return torch.stack(rows)[:, None]


def make_inputs(dtype, device, *, batch=3, heads=4, kv_heads=1, count=1, slots=150, dk=64, dv=None, capacity=None,
                pad=(0, 5, 17), ends=(150, 90, 129)):
    """q [B, H, T, D]; keys / values as the first `slots` of a cache of `capacity` slots (non-contiguous in S)."""
    dv = dk if dv is None else dv
    capacity = slots + 13 if capacity is None else capacity
    q = torch.randn(batch, heads, count, dk, dtype=dtype, device=device)
    keys = torch.randn(batch, kv_heads, capacity, dk, dtype=dtype, device=device)[:, :, :slots]
    values = torch.randn(batch, kv_heads, capacity, dv, dtype=dtype, device=device)[:, :, :slots]
    ends = [min(e, slots) for e in ends][:batch]
    return q, keys, values, decode_mask(batch, count, slots, device=device, pad=pad[:batch], ends=ends)


CASES = [
    dict(heads=4, kv_heads=1, count=1, dk=64),
    dict(heads=4, kv_heads=4, count=2, dk=64),
    dict(heads=8, kv_heads=2, count=2, dk=80),
    dict(heads=4, kv_heads=1, count=1, dk=80, dv=48, slots=200),
    dict(heads=2, kv_heads=2, count=1, dk=64, slots=37, ends=(37, 20, 3)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_triton_matches_float64_sdpa(case, dtype):
    launchers = load_launchers(DECODE)
    torch.manual_seed(0)
    q, keys, values, visible = make_inputs(dtype, kernel_device(), **case)
    assert not keys.is_contiguous()
    with poisoned():
        o = launchers.kv_cache_attention_decode(q, keys, values, visible, 0.3)
    assert o.dtype == dtype
    assert_close(o, sdpa64(q, keys, values, visible, 0.3), TOLERANCE[dtype] * 2)


@pytest.mark.parametrize("skip_empty,mask_unseen", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("splits", [1, 3])
def test_triton_split_counts_agree(monkeypatch, splits, skip_empty, mask_unseen):
    """Force one slice or several slices (the log-sum-exp merge) on the same inputs, with and without skipping
    the tiles no query sees, and with the slots no query sees left unloaded instead."""
    launchers = load_launchers(DECODE)
    monkeypatch.setattr(launchers, "SKIP_EMPTY_TILES", skip_empty)
    monkeypatch.setattr(launchers, "MASK_UNSEEN_KEYS", mask_unseen)
    monkeypatch.setattr(launchers, "split_count", lambda slots, programs: (splits, -(-slots // (64 * splits)) * 64))
    q, keys, values, visible = make_inputs(torch.float32, kernel_device(), heads=4, kv_heads=2, count=2, slots=300,
                                           pad=(0, 70, 130), ends=(300, 140, 200))
    with poisoned():
        o = launchers.kv_cache_attention_decode(q, keys, values, visible, 0.25)
    assert_close(o, sdpa64(q, keys, values, visible, 0.25), 2e-5)


@pytest.mark.parametrize("constants", [
    {"BLOCK_N": 32, "MERGE_CHUNK": 4},
    {"BLOCK_N": 128, "TARGET_PROGRAMS": 4096, "MAX_SPLITS": 128, "NUM_WARPS": 8, "NUM_STAGES": 2},
    {"TARGET_PROGRAMS": 1},
])
def test_launch_constants_a_sweep_may_set_keep_the_result(monkeypatch, constants):
    """The launch constants `benchmarks.layer_skip --kv-kernel-variants` sweeps (tile of slots, programs aimed at,
    slices, merge chunk, warps / stages) each give the float64 SDPA result (slices of other sizes and counts)."""
    launchers = load_launchers(DECODE)
    for name, value in constants.items():
        monkeypatch.setattr(launchers, name, value)
    q, keys, values, visible = make_inputs(torch.float32, kernel_device(), heads=4, kv_heads=2, count=2, slots=300,
                                           pad=(0, 70, 130), ends=(300, 140, 200))
    with poisoned():
        o = launchers.kv_cache_attention_decode(q, keys, values, visible, 0.25)
    assert_close(o, sdpa64(q, keys, values, visible, 0.25), 2e-5)


@pytest.mark.parametrize("skip_empty,mask_unseen", [(True, False), (False, False), (False, True)])
def test_fully_masked_query_gives_zeros_like_sdpa(monkeypatch, skip_empty, mask_unseen):
    """The decode sites always let a query see its own slot; a query that sees nothing still gets SDPA's zeros."""
    launchers = load_launchers(DECODE)
    monkeypatch.setattr(launchers, "SKIP_EMPTY_TILES", skip_empty)
    monkeypatch.setattr(launchers, "MASK_UNSEEN_KEYS", mask_unseen)
    q, keys, values, visible = make_inputs(torch.float32, kernel_device(), heads=4, kv_heads=2, count=2, slots=100)
    visible = visible.clone()
    visible[1, :, 0] = False  # row 1, first new query: no slot
    expected = sdpa64(q, keys, values, visible, 0.3)
    assert torch.equal(expected[1, :, 0], torch.zeros_like(expected[1, :, 0]))
    with poisoned():
        o = launchers.kv_cache_attention_decode(q, keys, values, visible, 0.3)
    assert_close(o, expected, 2e-5)
    assert_close(kv_cache_attention_reference(q, keys, values, visible, 0.3), expected, 1e-6, "reference")


@pytest.mark.parametrize("skip_empty,mask_unseen", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("splits", [1, 3])
def test_slots_after_last_slot_are_neither_seen_nor_read(monkeypatch, splits, skip_empty, mask_unseen):
    """A cache whose shape is its whole capacity (as under a CUDA graph) filled up to slot 169: the mask lets every
    query see the unfilled tail too, which holds NaN; with `last_slot` the kernel reads none of it (a NaN read would
    reach the output through the zero-weighted product) and gives SDPA over the filled slots alone."""
    launchers = load_launchers(DECODE)
    monkeypatch.setattr(launchers, "SKIP_EMPTY_TILES", skip_empty)
    monkeypatch.setattr(launchers, "MASK_UNSEEN_KEYS", mask_unseen)
    monkeypatch.setattr(launchers, "split_count", lambda slots, programs: (splits, -(-slots // (64 * splits)) * 64))
    device, filled = kernel_device(), 170
    q, keys, values, visible = make_inputs(torch.float32, device, heads=4, kv_heads=2, count=2, slots=300,
                                           pad=(0, 70, 130), ends=(filled, 140, filled))
    expected = sdpa64(q, keys[:, :, :filled], values[:, :, :filled], visible[..., :filled], 0.25)
    visible = visible.clone()
    visible[..., filled:] = True
    keys[:, :, filled:], values[:, :, filled:] = float("nan"), float("nan")
    last = torch.tensor([filled - 1], device=device)
    with poisoned():
        o = launchers.kv_cache_attention_decode(q, keys, values, visible, 0.25, last)
    assert_close(o, expected, 2e-5)


def test_reference_and_op_take_last_slot():
    q, keys, values, visible = make_inputs(torch.float32, "cpu", heads=4, kv_heads=2, count=2, slots=120,
                                           ends=(120, 90, 100))
    visible = visible.clone()
    visible[..., 60:] = True  # seen but for last_slot
    last = torch.tensor([59])
    expected = sdpa64(q, keys[:, :, :60], values[:, :, :60], visible[..., :60], 0.3)
    assert_close(kv_cache_attention(q, keys, values, visible, 0.3, last), expected, 1e-6)
    assert_close(kv_cache_attention(q, keys, values, visible, 0.3, torch.arange(60)[-1:]), expected, 1e-6)
    with pytest.raises(ValueError, match="last_slot"):
        kv_cache_attention(q, keys, values, visible, 0.3, torch.tensor([59.0]))
    with pytest.raises(ValueError, match="last_slot"):
        kv_cache_attention(q, keys, values, visible, 0.3, torch.tensor([58, 59]))


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_float64_sdpa(case):
    q, keys, values, visible = make_inputs(torch.float64, "cpu", **case)
    assert_close(kv_cache_attention(q, keys, values, visible, 0.3), sdpa64(q, keys, values, visible, 0.3), 1e-12)


def test_broadcast_mask_and_default_scale():
    q, keys, values, visible = make_inputs(torch.float64, "cpu", batch=1, pad=(3,), ends=(120,))
    o = kv_cache_attention(q, keys, values, visible[0, 0])  # [T, S] broadcasts to [B, 1, T, S]
    assert_close(o, sdpa64(q, keys, values, visible, 64**-0.5), 1e-12)


def test_argument_checks():
    q, keys, values, visible = make_inputs(torch.float32, "cpu", kv_heads=2)
    with pytest.raises(ValueError, match="visible"):
        kv_cache_attention(q, keys, values, visible.float())
    with pytest.raises(ValueError, match="heads"):
        kv_cache_attention(q[:, :3], keys, values, visible)
    with pytest.raises(ValueError, match="broadcast"):
        kv_cache_attention(q, keys, values, visible[..., :10])


def test_backward_says_forward_only():
    q, keys, values, visible = make_inputs(torch.float32, "cpu")
    o = kv_cache_attention(q.requires_grad_(), keys, values, visible)
    with pytest.raises(RuntimeError, match="forward-only"):
        o.sum().backward()


def test_opcheck():
    q, keys, values, visible = make_inputs(torch.float32, "cpu", count=2)
    for last in (None, torch.tensor([100])):
        torch.library.opcheck(torch.ops.rewrite.kv_cache_attention, (q, keys, values, visible.contiguous(), 0.3, last),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


class Step(torch.nn.Module):
    def forward(self, q, keys, values, visible):
        return kv_cache_attention(q * 2, keys, values, visible, 0.3) + 1


def test_compile_fullgraph_without_graph_breaks():
    q, keys, values, visible = make_inputs(torch.float32, "cpu", count=2)
    compiled = torch.compile(Step(), fullgraph=True, backend="aot_eager")
    assert_close(compiled(q, keys, values, visible), Step()(q, keys, values, visible), 1e-6)


@gpu
@pytest.mark.parametrize("rows", [32, 8])
def test_cuda_bfloat16_against_float64(rows):
    """Llama-shaped decode over a 4K-slot cache: 32 q heads, 8 kv heads, D=128, through the op's CUDA kernel."""
    torch.manual_seed(0)
    q, keys, values, visible = make_inputs(torch.bfloat16, "cuda", batch=rows, heads=32, kv_heads=8, count=1,
                                           dk=128, slots=4096, capacity=4096 + 64,
                                           pad=[i * 7 for i in range(rows)], ends=[4096 - i * 100 for i in range(rows)])
    with poisoned():
        o = kv_cache_attention(q, keys, values, visible, 128**-0.5)
    assert_close(o, sdpa64(q, keys, values, visible, 128**-0.5), 1e-2)
