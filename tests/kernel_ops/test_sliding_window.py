"""rewrite::sliding_window_*: op vs a per-query loop, Triton launchers, varlen, sinks, lookahead (bidirectional
windows) against a dense-mask float64 attention, decode, opcheck, compile."""

import pytest
import torch

from rewrite.kernels.sliding_window import (
    fill_ring_cache,
    sliding_window_attention,
    sliding_window_attention_step,
)
from rewrite.kernels.sliding_window.reference import (
    sliding_window_backward_reference,
    sliding_window_decode_reference,
    sliding_window_reference,
)
from rewrite.kernels.testing import assert_close, check_launcher, kernel_device, load_launchers

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
FORWARD = "rewrite.kernels.sliding_window.triton_forward"
BACKWARD = "rewrite.kernels.sliding_window.triton_backward"
DECODE = "rewrite.kernels.sliding_window.triton_decode"


def loop_attention(q, k, v, window, sinks, scale, cu_seqlens):
    """Query by query: gather the visible keys by position, softmax, weighted sum."""
    batch, length, heads, _ = q.shape
    group = heads // k.shape[2]
    bounds = [(b, 0, length) for b in range(batch)] if cu_seqlens is None else [
        (0, s, e) for s, e in zip(cu_seqlens.tolist(), cu_seqlens.tolist()[1:])]
    rows = []
    for b, start, end in bounds:
        for t in range(end - start):
            keys = [s for s in range(t + 1) if t - s < window or s < sinks]
            idx = torch.tensor(keys) + start
            out = []
            for h in range(heads):
                scores = scale * k[b, idx, h // group] @ q[b, start + t, h]
                out.append(torch.softmax(scores, 0) @ v[b, idx, h // group])
            rows.append(((b, start + t), torch.stack(out)))
    o = torch.zeros(batch, length, heads, v.shape[-1], dtype=q.dtype)
    for (b, t), value in rows:
        o[b, t] = value
    return o


def make_inputs(dtype, device, *, batch=2, length=19, heads=4, kv_heads=2, dk=16, dv=16, cu_seqlens=None):
    q = torch.randn(batch, length, heads, dk, dtype=dtype, device=device)
    k = torch.randn(batch, length, kv_heads, dk, dtype=dtype, device=device)
    v = torch.randn(batch, length, kv_heads, dv, dtype=dtype, device=device)
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int32, device=device)
    return q, k, v, cu


CASES = [
    dict(shape=dict(batch=2, length=19, heads=4, kv_heads=2), window=5, sinks=0),
    dict(shape=dict(batch=1, length=23, heads=2, kv_heads=1, dk=24, dv=8, cu_seqlens=[0, 1, 2, 12, 12, 23]),
         window=4, sinks=2),
    dict(shape=dict(batch=1, length=9, heads=3, kv_heads=3), window=50, sinks=1),
]


@pytest.mark.parametrize("case", CASES)
def test_op_output_and_grads_match_query_loop(case):
    q, k, v, cu = make_inputs(torch.float64, "cpu", **case["shape"])
    do = torch.randn(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o = sliding_window_attention(*leaves, case["window"], sinks=case["sinks"], scale=0.4, cu_seqlens=cu)
    grads = torch.autograd.grad(o, leaves, do)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o_ref = loop_attention(*ref_leaves, case["window"], case["sinks"], 0.4, cu)
    ref_grads = torch.autograd.grad(o_ref, ref_leaves, do)
    assert_close(o, o_ref, 1e-12, "o")
    for name, a, e in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(a, e, 1e-12, name)


BLOCKS = [dict(block_m=16, block_n=16), dict(block_m=16, block_n=32), dict(block_m=32, block_n=16)]
# (dq_blocks, dkdv_blocks): (BLOCK_M, BLOCK_N, num_warps, num_stages)
BACKWARD_BLOCKS = [dict(dq_blocks=(16, 16, 4, 1), dkdv_blocks=(16, 16, 4, 1)),
                   dict(dq_blocks=(32, 16, 4, 2), dkdv_blocks=(16, 32, 4, 2))]
TRITON_CASES = [
    dict(shape=dict(batch=2, length=37, heads=4, kv_heads=2), window=7, sinks=0),
    dict(shape=dict(batch=1, length=70, heads=2, kv_heads=1, dk=24, dv=32, cu_seqlens=[0, 1, 40, 41, 70]),
         window=9, sinks=3),
    dict(shape=dict(batch=1, length=45, heads=2, kv_heads=2), window=4, sinks=20),
    # windows of several blocks: unmasked blocks between the window's edges
    dict(shape=dict(batch=1, length=150, heads=2, kv_heads=1, cu_seqlens=[0, 1, 101, 150]), window=50, sinks=2),
    dict(shape=dict(batch=1, length=120, heads=2, kv_heads=2), window=70, sinks=0),
]


@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_forward_matches_reference(case, blocks):
    launchers = load_launchers(FORWARD)
    w, s = case["window"], case["sinks"]
    check_launcher(
        lambda q, k, v, cu: launchers.sliding_window_forward(q, k, v, w, s, 0.3, cu, **blocks),
        lambda q, k, v, cu: sliding_window_reference(q, k, v, w, s, 0.3, cu),
        lambda dtype, device: make_inputs(dtype, device, **case["shape"]),
        trials=1,
    )


@pytest.mark.parametrize("blocks", BACKWARD_BLOCKS)
@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_backward_matches_reference(case, blocks):
    launchers = load_launchers(BACKWARD)
    w, s = case["window"], case["sinks"]

    def inputs(dtype, device):
        q, k, v, cu = make_inputs(dtype, device, **case["shape"])
        o, lse = sliding_window_reference(q, k, v, w, s, 0.3, cu)
        return torch.randn_like(o), q, k, v, o, lse.float(), cu

    check_launcher(
        lambda do, q, k, v, o, lse, cu: launchers.sliding_window_backward(do, q, k, v, o, lse, w, s, 0.3, cu, **blocks),
        lambda do, q, k, v, o, lse, cu: sliding_window_backward_reference(do, q, k, v, w, s, 0.3, cu),
        inputs,
        trials=1,
    )


@pytest.mark.parametrize("sinks", [0, 2])
def test_decode_steps_match_full_attention(sinks):
    window, prefill, total = 4, 3, 11
    q, k, v, _ = make_inputs(torch.float64, "cpu", batch=2, length=total, heads=4, kv_heads=2)
    full = sliding_window_attention(q, k, v, window, sinks=sinks)
    k_cache, v_cache = fill_ring_cache(k[:, :prefill], window, sinks), fill_ring_cache(v[:, :prefill], window, sinks)
    for t in range(prefill, total):
        positions = torch.full((2,), t, dtype=torch.int32)
        o = sliding_window_attention_step(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], k_cache, v_cache,
                                          positions, window, sinks=sinks)
        assert_close(o, full[:, t : t + 1], 1e-12, f"step {t}")


def test_fill_ring_cache_matches_steps_from_empty():
    window, sinks, length = 3, 1, 8
    k = torch.randn(1, length, 2, 4, dtype=torch.float64)
    cache = torch.zeros(1, sinks + window, 2, 4, dtype=torch.float64)
    v_cache = torch.zeros_like(cache)
    for t in range(length):
        sliding_window_attention_step(torch.randn(1, 1, 2, 4, dtype=torch.float64), k[:, t : t + 1], k[:, t : t + 1],
                                      cache, v_cache, torch.tensor([t]), window, sinks=sinks)
    assert torch.equal(cache, fill_ring_cache(k, window, sinks))


def test_triton_decode_matches_reference():
    launchers = load_launchers(DECODE)

    def inputs(dtype, device):
        q = torch.randn(3, 1, 4, 24, dtype=dtype, device=device)
        k_cache = torch.randn(3, 150, 2, 24, dtype=dtype, device=device)
        v_cache = torch.randn(3, 150, 2, 16, dtype=dtype, device=device)
        positions = torch.tensor([0, 70, 1000], device=device)
        return q, k_cache, v_cache, positions

    check_launcher(
        lambda q, kc, vc, pos: launchers.sliding_window_decode(q, kc, vc, pos, 0.3),
        lambda q, kc, vc, pos: sliding_window_decode_reference(q, kc, vc, pos, 0.3),
        inputs,
        trials=1,
    )


def test_opcheck():
    q, k, v, cu = make_inputs(torch.float32, "cpu", **CASES[1]["shape"])
    torch.library.opcheck(torch.ops.rewrite.sliding_window_attention,
                          (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), 4, 2, 0.3, cu))
    q, k, v, _ = make_inputs(torch.float32, "cpu")
    o, lse = torch.ops.rewrite.sliding_window_attention(q, k, v, 5, 0, 0.25, None)
    torch.library.opcheck(torch.ops.rewrite.sliding_window_attention_backward,
                          (torch.randn_like(o), q, k, v, o, lse, 5, 0, 0.25, None))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    torch.library.opcheck(torch.ops.rewrite.sliding_window_attention, (*leaves, 3, 1, 0.25, None, 2))
    o, lse = torch.ops.rewrite.sliding_window_attention(q, k, v, 3, 1, 0.25, None, 2)
    torch.library.opcheck(torch.ops.rewrite.sliding_window_attention_backward,
                          (torch.randn_like(o), q, k, v, o, lse, 3, 1, 0.25, None, 2))
    torch.library.opcheck(torch.ops.rewrite.sliding_window_decode,
                          (q[:, :1], k[:, :6], v[:, :6], torch.tensor([3, 9]), 0.25))


class Block(torch.nn.Module):
    def __init__(self, lookahead: int = 0):
        super().__init__()
        self.lookahead = lookahead

    def forward(self, q, k, v):
        return sliding_window_attention(q * 2, k, v, 6, sinks=1, lookahead=self.lookahead) + 1


@pytest.mark.parametrize("lookahead", [0, 3])
def test_compile_fullgraph_without_graph_breaks(lookahead):
    q, k, v, _ = make_inputs(torch.float32, "cpu")
    q.requires_grad_()
    compiled = torch.compile(Block(lookahead), fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    out.sum().backward()
    assert_close(out, Block(lookahead)(q, k, v), 1e-6)


def dense_attention(q, k, v, window, sinks, lookahead, scale, cu_seqlens):
    """Softmax attention in float64 over the whole [B, T] batch with an explicit dense [T, T] mask: query t sees key
    s of its own sequence iff s - t <= lookahead and (t - s < window or s < sinks), positions counted from the
    sequence start. Returns (o [B, T, H, V], lse [B, T, H]); differentiable (autograd gives the gradients)."""
    batch, length, heads, _ = q.shape
    group = heads // k.shape[2]
    bounds = [0, length] if cu_seqlens is None else cu_seqlens.tolist()
    start = torch.zeros(length, dtype=torch.long)
    seq = torch.full((length,), -1, dtype=torch.long)
    for i, (s, e) in enumerate(zip(bounds, bounds[1:])):
        start[s:e], seq[s:e] = s, i
    pos = torch.arange(length) - start
    t, s = pos[:, None], pos[None, :]
    same = (seq[:, None] == seq[None, :]) & (seq[:, None] >= 0)
    mask = same & (s - t <= lookahead) & ((t - s < window) | (s < sinks))
    qd = q.double().transpose(1, 2)  # [B, H, T, K]
    kd = k.double().transpose(1, 2).repeat_interleave(group, 1)
    vd = v.double().transpose(1, 2).repeat_interleave(group, 1)
    scores = (scale * qd @ kd.transpose(-1, -2)).masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ vd).transpose(1, 2), scores.logsumexp(-1).transpose(1, 2)


def dense_gradients(do, q, k, v, window, sinks, lookahead, scale, cu_seqlens):
    """(dq, dk, dv) of `dense_attention` given do, by autograd in float64."""
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    o, _ = dense_attention(*leaves, window, sinks, lookahead, scale, cu_seqlens)
    return torch.autograd.grad(o, leaves, do.double())


# (shape, window, sinks, lookahead): odd lengths, lengths off the block grid, short varlen sequences, GQA, sinks,
# a lookahead longer than the sequences, ModernBERT's symmetric |t - s| <= w (window w + 1, lookahead w)
LOOKAHEAD_CASES = [
    dict(shape=dict(batch=2, length=19, heads=4, kv_heads=2), window=5, sinks=0, lookahead=4),
    dict(shape=dict(batch=1, length=37, heads=2, kv_heads=1, dk=24, dv=8, cu_seqlens=[0, 1, 2, 5, 5, 20, 37]),
         window=3, sinks=0, lookahead=2),
    dict(shape=dict(batch=1, length=33, heads=3, kv_heads=1, cu_seqlens=[0, 2, 33]), window=4, sinks=2, lookahead=1),
    dict(shape=dict(batch=2, length=13, heads=2, kv_heads=2), window=2, sinks=0, lookahead=40),
    dict(shape=dict(batch=1, length=41, heads=2, kv_heads=1, cu_seqlens=[0, 1, 4, 41]), window=1, sinks=3,
         lookahead=17),
]


@pytest.mark.parametrize("case", LOOKAHEAD_CASES)
def test_op_with_lookahead_matches_dense_mask(case):
    q, k, v, cu = make_inputs(torch.float64, "cpu", **case["shape"])
    args = (case["window"], case["sinks"], case["lookahead"], 0.4, cu)
    do = torch.randn(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o = sliding_window_attention(*leaves, case["window"], sinks=case["sinks"], scale=0.4, cu_seqlens=cu,
                                 lookahead=case["lookahead"])
    grads = torch.autograd.grad(o, leaves, do)
    assert_close(o, dense_attention(q, k, v, *args)[0], 1e-12, "o")
    for name, a, e in zip(("dq", "dk", "dv"), grads, dense_gradients(do, q, k, v, *args)):
        assert_close(a, e, 1e-12, name)


def test_lookahead_zero_is_the_causal_op():
    q, k, v, cu = make_inputs(torch.float64, "cpu", **CASES[1]["shape"])
    causal = sliding_window_attention(q, k, v, 4, sinks=2, scale=0.3, cu_seqlens=cu)
    assert torch.equal(sliding_window_attention(q, k, v, 4, sinks=2, scale=0.3, cu_seqlens=cu, lookahead=0), causal)
    assert torch.equal(torch.ops.rewrite.sliding_window_attention(q, k, v, 4, 2, 0.3, cu)[0], causal)


@pytest.mark.parametrize("lookahead", [-1, 1.5, True, None])
def test_lookahead_must_be_a_non_negative_int(lookahead):
    q, k, v, _ = make_inputs(torch.float32, "cpu")
    with pytest.raises(ValueError, match="lookahead must be an int >= 0"):
        sliding_window_attention(q, k, v, 4, lookahead=lookahead)


# windows and lookaheads of several blocks (unmasked blocks on both sides of the query block) beside the small ones
TRITON_LOOKAHEAD_CASES = [*LOOKAHEAD_CASES[:3], LOOKAHEAD_CASES[4],
                          dict(shape=dict(batch=1, length=101, heads=2, kv_heads=1, cu_seqlens=[0, 3, 101]), window=35,
                               sinks=0, lookahead=40)]


@pytest.mark.parametrize("blocks", BLOCKS[:2])
@pytest.mark.parametrize("case", TRITON_LOOKAHEAD_CASES)
def test_triton_forward_with_lookahead_matches_dense_mask(case, blocks):
    launchers = load_launchers(FORWARD)
    w, s, a = case["window"], case["sinks"], case["lookahead"]
    check_launcher(
        lambda q, k, v, cu: launchers.sliding_window_forward(q, k, v, w, s, 0.3, cu, **blocks, lookahead=a),
        lambda q, k, v, cu: dense_attention(q, k, v, w, s, a, 0.3, cu),
        lambda dtype, device: make_inputs(dtype, device, **case["shape"]),
        trials=1,
    )


@pytest.mark.parametrize("blocks", BACKWARD_BLOCKS)
@pytest.mark.parametrize("case", TRITON_LOOKAHEAD_CASES)
def test_triton_backward_with_lookahead_matches_dense_mask(case, blocks):
    launchers = load_launchers(BACKWARD)
    w, s, a = case["window"], case["sinks"], case["lookahead"]

    def inputs(dtype, device):
        q, k, v, cu = make_inputs(dtype, device, **case["shape"])
        o, lse = sliding_window_reference(q, k, v, w, s, 0.3, cu, a)
        return torch.randn_like(o), q, k, v, o, lse.float(), cu

    check_launcher(
        lambda do, q, k, v, o, lse, cu: launchers.sliding_window_backward(do, q, k, v, o, lse, w, s, 0.3, cu,
                                                                          **blocks, lookahead=a),
        lambda do, q, k, v, o, lse, cu: dense_gradients(do, q, k, v, w, s, a, 0.3, cu),
        inputs,
        trials=1,
    )


@gpu
def test_cuda_bfloat16_against_float64():
    q, k, v, cu = make_inputs(torch.bfloat16, kernel_device(), batch=1, length=3000, heads=8, kv_heads=2, dk=128,
                              dv=128, cu_seqlens=[0, 1, 1200, 2999, 3000])
    do = torch.randn(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o = sliding_window_attention(*leaves, 512, sinks=4, cu_seqlens=cu)
    grads = torch.autograd.grad(o, leaves, do)
    d = [x.double() for x in (q, k, v)]
    o64, _ = sliding_window_reference(*d, 512, 4, 128**-0.5, cu)
    grads64 = sliding_window_backward_reference(do.double(), *d, 512, 4, 128**-0.5, cu)
    assert_close(o, o64, 1e-2, "o")
    for name, a, e in zip(("dq", "dk", "dv"), grads, grads64):
        assert_close(a, e, 1e-2, name)
    k_cache, v_cache = fill_ring_cache(k[:, :2000], 512, 4), fill_ring_cache(v[:, :2000], 512, 4)
    step = sliding_window_attention_step(q[:, 2000:2001], k[:, 2000:2001], v[:, 2000:2001], k_cache, v_cache,
                                         torch.tensor([2000], device=q.device), 512, sinks=4)
    full, _ = sliding_window_reference(*[x[:, :2001] for x in d], 512, 4, 128**-0.5, None)
    assert_close(step, full[:, 2000:2001], 1e-2, "decode step")


@gpu
def test_cuda_bfloat16_with_lookahead_against_float64():
    """ModernBERT's local window (64 keys each side) at length, through the Triton kernels."""
    q, k, v, cu = make_inputs(torch.bfloat16, kernel_device(), batch=1, length=3000, heads=8, kv_heads=8, dk=64,
                              dv=64, cu_seqlens=[0, 1, 40, 1200, 2999, 3000])
    do = torch.randn(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o = sliding_window_attention(*leaves, 65, cu_seqlens=cu, lookahead=64)
    grads = torch.autograd.grad(o, leaves, do)
    d = [x.double() for x in (q, k, v)]
    o64, _ = sliding_window_reference(*d, 65, 0, 64**-0.5, cu, 64)
    grads64 = sliding_window_backward_reference(do.double(), *d, 65, 0, 64**-0.5, cu, 64)
    assert_close(o, o64, 1e-2, "o")
    for name, a, e in zip(("dq", "dk", "dv"), grads, grads64):
        assert_close(a, e, 1e-2, name)
