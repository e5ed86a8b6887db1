"""Linear attention: chunked reference and Triton kernels against the naive recurrence.

The Triton launchers run on CUDA when present, else on CPU tensors in Triton's interpreter
(tiny shapes: the interpreter is slow).
"""

import contextlib
import dataclasses
import importlib
import re

import pytest
import torch

from rewrite.kernels import linear_attention, linear_attention_step
from rewrite.kernels.alloc import poisoned
from rewrite.kernels.linear_attention import api as la_api
from rewrite.kernels.linear_attention import op as la_op
from rewrite.kernels.linear_attention.feature_maps import apply_feature_map, log_decay_from_keys
from rewrite.kernels.linear_attention.naive import naive_linear_attention
from rewrite.kernels.testing import TOLERANCE, assert_close, kernel_device, load_launchers, rewrite_ops_called

from .linear_attention_cases import DIFFERENTIABLE, Case, make_inputs, naive_with_grads

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SCALE = 0.3

REFERENCE_CASES = [
    Case("none"),
    Case("none", heads=3, kv_heads=1, dk=100, dv=32),
    Case("constant", dk=64, dv=64),
    Case("scalar", heads=2, kv_heads=2, dk=128, dv=128, initial_state=False),
    Case("vector", dk=100, dv=40),
    Case("vector", length=33, heads=6, kv_heads=3, dk=32, dv=64),
    Case("none", batch=1, cu_seqlens=(0, 1, 3, 40, 70)),
    Case("scalar", batch=1, cu_seqlens=(0, 2, 3, 70)),
    Case("vector", batch=1, cu_seqlens=(0, 1, 2, 19, 70), dk=64, dv=32),
    Case("constant", batch=1, cu_seqlens=(0, 66, 67, 70), initial_state=False),
    Case("none", causal=False),
    Case("none", batch=1, cu_seqlens=(0, 1, 30, 70), causal=False),
    # empty sequences (an all-padding row under varlen): no outputs, the state passes through
    Case("scalar", batch=1, cu_seqlens=(0, 0, 5, 5, 70)),
    Case("vector", batch=1, length=20, cu_seqlens=(0, 3, 3, 20), dk=32, dv=16),
]


def run_public(case: Case, inputs: dict, *, leaves: bool):
    """Outputs and, with `leaves`, the leaf tensors of `linear_attention` called like the tests call it."""
    args = {n: inputs[n].detach().clone().requires_grad_() for n in DIFFERENTIABLE if inputs[n] is not None}
    o, final = linear_attention(
        args["q"],
        args["k"],
        args["v"],
        args.get("g"),
        decay=case.decay,
        scale=SCALE,
        initial_state=args.get("initial_state"),
        output_final_state=True,
        cu_seqlens=inputs["cu_seqlens"],
        causal=case.causal,
    )
    return o, final, args


def check_grads(grads: dict, expected: dict, scales: dict, tol: float, label: str) -> None:
    assert set(grads) == set(expected), f"{label}: gradients for {sorted(grads)}, expected {sorted(expected)}"
    for name, grad in grads.items():
        assert_close(grad, expected[name], tol, f"{label} d{name}", scale=scales.get(name))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", REFERENCE_CASES, ids=str)
def test_chunked_reference_matches_naive(case, dtype):
    inputs = make_inputs(case, dtype, "cpu")
    o, final, leaves = run_public(case, inputs, leaves=True)
    do, dht = torch.randn_like(o), torch.randn_like(final)
    grads = dict(
        zip(leaves, torch.autograd.grad((o * do).sum() + (final * dht).sum(), list(leaves.values())))
    )
    o_ref, final_ref, grads_ref, scales = naive_with_grads(case, inputs, SCALE, do, dht)
    tol = TOLERANCE[dtype]
    assert o.dtype == dtype and final.dtype == dtype
    assert_close(o, o_ref, tol, "o")
    assert_close(final, final_ref, tol, "final state")
    check_grads(grads, grads_ref, scales, tol, str(case))


TRITON_CASES = [
    Case("none", length=40, dk=32, dv=48),
    Case("constant", length=40, dk=32, dv=16),
    Case("scalar", length=40, dk=100, dv=32),
    Case("none", length=40, dk=100, dv=32),  # the shape that exposed a miscompile of the dv kernel on H200
    Case("vector", length=21, dk=32, dv=40),
    Case("none", batch=1, length=70, heads=3, kv_heads=1, dk=64, dv=16, cu_seqlens=(0, 1, 3, 70)),
    Case(
        "scalar",
        batch=1,
        length=40,
        heads=2,
        kv_heads=2,
        dk=16,
        dv=128,
        cu_seqlens=(0, 2, 3, 40),
        initial_state=False,
    ),
    Case("vector", batch=1, length=20, dk=16, dv=16, cu_seqlens=(0, 1, 2, 20)),
    # four 16-token sub-chunks per 64-token chunk, a partial key tile, a partial last chunk
    Case("vector", batch=1, length=80, heads=2, kv_heads=1, dk=100, dv=24),
    # log-decays down to -8 per token: some sub-chunks spread past the fast path's limit
    Case("vector", batch=1, length=72, heads=2, kv_heads=2, dk=32, dv=16, decay_strength=8.0),
    Case("scalar", batch=1, length=72, heads=2, kv_heads=1, dk=32, dv=16, decay_strength=8.0),
    # vector states by chunk terms + scan: an empty sequence, several chunks, K and V tiles, GQA (2 / 1)
    Case("vector", batch=1, length=150, heads=2, kv_heads=1, dk=72, dv=80, cu_seqlens=(0, 0, 70, 150)),
]


def triton_module(name: str):
    return load_launchers(f"rewrite.kernels.linear_attention.{name}")


def chunk_args(case: Case, x: dict) -> tuple:
    """The positional arguments of the Triton launchers' `chunk_forward` (and `chunk_backward` after do, dht)."""
    return x["q"], x["k"], x["v"], x["g"], case.decay, SCALE, x["initial_state"], x["cu_seqlens"]


def on_device(inputs: dict, device) -> dict:
    return {n: None if x is None else x.to(device) for n, x in inputs.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_triton_forward_and_backward_match_naive(case, dtype):
    check_triton_against_naive(case, dtype)


@pytest.mark.parametrize("path", ["masked", "whole"])
def test_triton_strong_gate_precision(path, monkeypatch):
    """The vector decay's dq / dk products with their own input precision in strong-gate chunks
    (`triton_backward.STRONG_GATE_PRECISION`), in float16 (the switch acts on 16-bit inputs)."""
    monkeypatch.setattr(triton_module("triton_backward"), "STRONG_GATE_PRECISION", "tf32x3")
    monkeypatch.setattr(triton_module("triton_gated"), "SUB_PRODUCTS", {"forward": path, "backward": path})
    case = Case("vector", batch=1, length=72, heads=2, kv_heads=1, dk=32, dv=16, decay_strength=2.0)
    check_triton_against_naive(case, torch.float16)


@pytest.mark.parametrize("strength", [0.5, 2.0, 8.0])
@pytest.mark.parametrize("path", ["masked", "batched", "whole"])
def test_triton_vector_fast_paths(path, strength, monkeypatch):
    """Each implementation of the vector decay's in-chunk products (`triton_gated.SUB_PRODUCTS`), forward
    and backward. Log-decays down to -0.5 per token spread by < 40 over a 64-token chunk (the whole-chunk
    form, where it is on); down to -2, by > 40 over a chunk but < 40 over a 16-token sub-chunk (the
    sub-chunk form); down to -8, by > 40 over a sub-chunk (the exact per-pair form)."""
    gated = triton_module("triton_gated")
    monkeypatch.setattr(gated, "SUB_PRODUCTS", {"forward": path, "backward": path})
    case = Case("vector", batch=1, length=72, heads=2, kv_heads=1, dk=32, dv=16, decay_strength=strength)
    check_triton_against_naive(case, torch.float32)


V7_VARIANTS = {  # (triton_forward attribute, value) pairs of the v7 launch choices (NOTES.md, v7)
    "scan g2": {"SCAN_GROUP": 2},
    "v5 scan (one chunk ahead, 64x32 tiles)": {"SCAN_GROUP": 1, "SCAN_TILES": (64, 32),
                                               "SCAN_MIN_PROGRAMS": 0},
    "scan for the scalar decay too": {"SCAN_MODES": (1, 2)},
    # chunk terms of several of the scan's K tiles per program (forward states and backward state gradients)
    "contrib 2 K tiles": {"CONTRIB_K_TILES": 2},
    "contrib 4 K tiles": {"CONTRIB_K_TILES": 4},
    "contrib 2 K tiles, 1 stage": {"CONTRIB_K_TILES": 2, "TERM_STAGES": 1},
}
V7_CASES = [
    # K = V = 64 (the Llama-shaped model's head dims), short packed sequences and a partial scan group
    (Case("vector", batch=1, length=150, heads=4, kv_heads=1, dk=64, dv=64, cu_seqlens=(0, 1, 3, 150)),
     torch.float32),
    # 3 q heads a kv head, odd head dims (K = 100), two V tiles at BV 32
    (Case("vector", length=70, heads=3, kv_heads=1, dk=100, dv=40), torch.float32),
    # strong gates (sub-chunk and exact forms); K = 32, half precision
    (Case("vector", batch=1, length=72, heads=2, kv_heads=1, dk=32, dv=16, decay_strength=8.0), torch.float16),
]


@pytest.mark.parametrize(
    "variant,case,dtype",
    [("scan g2", *V7_CASES[0]), ("scan g2", *V7_CASES[1]), ("scan g2", *V7_CASES[2]),
     ("v5 scan (one chunk ahead, 64x32 tiles)", *V7_CASES[0]),
     ("scan for the scalar decay too", dataclasses.replace(V7_CASES[0][0], decay="scalar"), torch.float32),
     ("contrib 2 K tiles", *V7_CASES[0]), ("contrib 2 K tiles", *V7_CASES[1]), ("contrib 4 K tiles", *V7_CASES[1]),
     ("contrib 2 K tiles, 1 stage", *V7_CASES[0]),
     ("scan for the scalar decay too", Case("scalar", length=70, heads=3, kv_heads=1, dk=100, dv=40),
      torch.float16)],
    ids=lambda x: str(x) if isinstance(x, Case) else str(x).replace("torch.", ""),
)
def test_triton_v7_variants(variant, case, dtype, monkeypatch):
    """The v7 scans (2 or 4 chunks loaded a group ahead, forward states and backward states / state
    gradients) and the scalar decay's states by the scan, against the naive recurrence: output, final state and
    every gradient, NaN-poisoned buffers. The run fails if the states did not come from the scan, or if a
    "contrib" variant's programs did not each compute several of the scan's K tiles."""
    forward = triton_module("triton_forward")
    for name, value in V7_VARIANTS[variant].items():
        monkeypatch.setattr(forward, name, value)
    scans = []
    scan_states = forward.scan_states
    monkeypatch.setattr(forward, "scan_states", lambda *a, **kw: scans.append(a[2]) or scan_states(*a, **kw))
    contrib_tiles = []
    kernel = forward._chunk_contrib_kernel

    class Recorded:  # records each launch's K tiles per program
        def __getitem__(self, grid):
            return lambda *a, **kw: contrib_tiles.append(kw["BK"] // kw["SK"]) or kernel[grid](*a, **kw)

    monkeypatch.setattr(forward, "_chunk_contrib_kernel", Recorded())
    check_triton_against_naive(case, dtype)
    assert scans and set(scans) == {forward.DECAY_MODE[case.decay]}  # the states came from the scan
    assert set(contrib_tiles) == {V7_VARIANTS[variant].get("CONTRIB_K_TILES", 1)}


# (batch, length, cu_seqlens) for the dg reverse cumsum: one sequence of 150 rows (two 64-row chunks and 22
# rows); a dense batch of two; packed sequences with an empty one, two of one row, one of exactly one chunk
# and one of three chunks (the last partial)
CUMSUM_LAYOUTS = [(1, 150, None), (2, 70, None), (1, 200, (0, 1, 1, 2, 66, 67, 200))]


@pytest.mark.parametrize("heads,feat", [(1, 1), (3, 1), (2, 64), (2, 100)])
@pytest.mark.parametrize("layout", CUMSUM_LAYOUTS, ids=str)
def test_parallel_reverse_cumsum(layout, heads, feat):
    """The v8 parallel dg reverse cumsum (chunk sums, a scan over them, chunks in parallel) against the
    sequential kernel and against a float64 flip / cumsum per sequence, with a non-zero carry; feature sizes
    1 (scalar decay), 64 and 100 (vector decay); NaN-poisoned buffers."""
    backward, common = triton_module("triton_backward"), triton_module("triton_common")
    batch, length, cu = layout
    bounds = list(cu) if cu is not None else [b * length for b in range(batch + 1)]
    device = kernel_device()
    x = torch.randn(batch * length, heads, feat, device=device)
    carry = 3 * torch.randn(len(bounds) - 1, heads, feat, device=device)
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=device)
    chunks = common.Chunks(batch, length, cu_seqlens, 64, device)
    with poisoned():
        parallel = backward.reverse_cumsum(x, carry, chunks, parallel=True).cpu()
        sequential = backward.reverse_cumsum(x, carry, chunks, parallel=False).cpu()
    xd, cd = x.cpu().double(), carry.cpu().double()
    expected, magnitude = torch.full_like(xd, float("nan")), torch.full_like(xd, float("nan"))
    for s, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        expected[start:end] = xd[start:end].flip(0).cumsum(0).flip(0) + cd[s]
        magnitude[start:end] = xd[start:end].abs().flip(0).cumsum(0).flip(0) + cd[s].abs()
    scale = magnitude.max().item()  # a sum with cancellation: its rounding error scales with |terms|
    assert parallel.dtype == torch.float32 and parallel.shape == x.shape
    assert_close(parallel, expected, TOLERANCE[torch.float32], "parallel vs float64", scale=scale)
    assert_close(sequential, expected, TOLERANCE[torch.float32], "sequential vs float64", scale=scale)
    assert_close(parallel, sequential.double(), TOLERANCE[torch.float32], "parallel vs sequential", scale=scale)


CUMSUM_CASES = [
    Case("vector", batch=1, length=200, heads=4, kv_heads=2, dk=64, dv=16, cu_seqlens=(0, 1, 67, 68, 200)),
    Case("vector", length=70, heads=2, kv_heads=1, dk=100, dv=16),
    Case("scalar", batch=1, length=150, heads=2, kv_heads=1, dk=32, dv=16),
    Case("scalar", batch=1, length=70, dk=16, dv=16, cu_seqlens=(0, 1, 2, 70)),
    Case("constant", length=70, dk=32, dv=16),
]


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
@pytest.mark.parametrize("case", CUMSUM_CASES, ids=str)
def test_triton_dg_cumsum_forms(case, parallel, monkeypatch):
    """Forward and backward with `triton_backward.CUMSUM_PARALLEL` on (the default) and off against the naive
    recurrence; the run fails if the other form of the dg reverse cumsum ran."""
    backward = triton_module("triton_backward")
    other = "_sequential_reverse_cumsum" if parallel else "_parallel_reverse_cumsum"

    def forbidden(*args):
        raise AssertionError(f"{other} ran with CUMSUM_PARALLEL = {parallel}")

    monkeypatch.setattr(backward, "CUMSUM_PARALLEL", parallel)
    monkeypatch.setattr(backward, other, forbidden)
    check_triton_against_naive(case, torch.float32)


DQK_HOISTED_CASES = [  # log-decays down to -0.5 per token: every chunk in the whole-chunk form
    # one q head a kv head; K = V = 64 (the model's head dims: V in one tile, v and the state loaded once)
    (Case("vector", length=70, heads=2, kv_heads=2, dk=64, dv=64, decay_strength=0.5), torch.float32),
    # 3 q heads a kv head, odd key dim (K = 100: a full and a partial K tile), V = 144: three V tiles of the dq / dk
    # kernels, two of the hoisted dv launch (BV 128 above K = 64); one sequence (the dense batch of two: case 0)
    (Case("vector", batch=1, length=70, heads=3, kv_heads=1, dk=100, dv=144, decay_strength=0.5), torch.float32),
    # 4 q heads a kv head, K = V = 64, packed short sequences (one and two tokens) and a partial last chunk
    (Case("vector", batch=1, length=150, heads=4, kv_heads=1, dk=64, dv=64, cu_seqlens=(0, 1, 3, 150),
          decay_strength=0.5), torch.float32),
    # strong gates in float16: the full chunk spreads past the whole-chunk limit (flagged, computed by
    # `_chunk_dqk_kernel` with the strong-gate precision), the 8-token last chunk does not
    (Case("vector", batch=1, length=72, heads=4, kv_heads=1, dk=32, dv=16, decay_strength=2.0), torch.float16),
    # log-decays down to -8 per token: the exact per-pair form in the flagged tiles
    (Case("vector", batch=1, length=72, heads=1, kv_heads=1, dk=32, dv=16, decay_strength=8.0), torch.float16),
]


def watch_hoisted_kernels(monkeypatch, case: Case, one_v: bool = True) -> dict[str, list]:
    """Turn on every hoisted kernel of the vector decay (v10 dq / dk, v11 outputs, v12 dv) for every K their tiles
    take, and record each one's flags; fail if a per-tile / per-head kernel runs on anything but flagged programs."""
    forward, backward = triton_module("triton_forward"), triton_module("triton_backward")
    for module, name, value in [(backward, "DQK_HOISTED", True), (backward, "DQK_HOISTED_ONE_V", one_v),
                                (backward, "DV_HOISTED", True), (backward, "DV_HOISTED_MAX_K", 128),
                                (forward, "OUTPUT_HOISTED", True), (forward, "OUTPUT_HOISTED_MAX_K", 128)]:
        monkeypatch.setattr(module, name, value)
    flags = {"dqk": [], "dv": [], "output": []}

    def hoisted(kind, flag_arg, one_k_tile=False):
        def check(args, kwargs):
            if one_k_tile:
                assert kwargs["BK"] >= case.dk  # K in one tile
            flags[kind].append(args[flag_arg])
        return check

    def only_flagged(kernel):
        def check(args, kwargs):
            if not kwargs.get("FLAGGED"):
                raise AssertionError(f"{kernel} ran on every program with its hoisted form on")
        return check

    for module, kernel, check in [
        (backward, "_chunk_dqk_hoisted_kernel", hoisted("dqk", 10)),
        (backward, "_chunk_dv_hoisted_kernel", hoisted("dv", 6, one_k_tile=True)),
        (forward, "_chunk_output_hoisted_kernel", hoisted("output", 6)),
        (backward, "_chunk_dqk_kernel", only_flagged("_chunk_dqk_kernel")),
        (backward, "_chunk_dv_kernel", only_flagged("_chunk_dv_kernel")),
        (forward, "_chunk_output_kernel", only_flagged("_chunk_output_kernel")),
    ]:
        monkeypatch.setattr(module, kernel, Launch(getattr(module, kernel), check))
    return flags


@pytest.mark.parametrize("case,dtype", DQK_HOISTED_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_triton_hoisted_kernels(case, dtype, monkeypatch):
    """The vector decay's hoisted kernels (v10 dq / dk, v11 outputs, v12 dv: the whole-chunk programs by the
    hoisted kernels, the flagged rest by the per-tile / per-head kernels with FLAGGED) against the naive recurrence
    with NaN-poisoned buffers (GQA 1 / 3 / 4, K = V = 64, K = 100 with V = 144 in several V tiles, packed one- and
    two-token sequences, strong gates in float16 at -2 and -8 per token). Fails if a hoisted kernel did not run,
    if a per-tile kernel ran on anything but the flagged programs, or if the flags do not match the gates (none
    for typical gates; for strong ones the 64-token chunk flagged, the 8-token one not)."""
    flags = watch_hoisted_kernels(monkeypatch, case)
    check_triton_against_naive(case, dtype)
    assert [len(f) for f in flags.values()] == [1, 1, 1]
    backward = triton_module("triton_backward")
    assert flags["dv"][0].shape[1] == -(-case.dv // backward.dv_hoisted_bv(case.dk))  # one flag per V tile
    assert flags["output"][0].dim() == 2 and flags["output"][0].shape[1] == case.kv_heads  # per (chunk, kv head)
    for kind in flags:
        check_flags(flags[kind][0], case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_bf16_score_operands_leave_other_dtypes_alone(dtype, monkeypatch):
    """`triton_gated.SCORE_OPERANDS = "input"` rounds the hoisted kernels' score operands to bfloat16 only: float32
    inputs and float16 ones (whose range k * exp(top - b) would leave) get the same bits as with "float32"."""
    case = Case("vector", batch=1, length=70, heads=4, kv_heads=2, dk=64, dv=64, decay_strength=0.5)
    watch_hoisted_kernels(monkeypatch, case)
    forward, backward = triton_module("triton_forward"), triton_module("triton_backward")
    x = make_inputs(case, dtype, kernel_device())
    args = chunk_args(case, x)
    do = torch.randn(case.batch, case.length, case.heads, case.dv, dtype=dtype, device=kernel_device())
    results = {}
    for operands in ("float32", "input"):
        monkeypatch.setattr(triton_module("triton_gated"), "SCORE_OPERANDS", operands)
        o, final = forward.chunk_forward(*args)
        results[operands] = (o, final, *backward.chunk_backward(do, torch.ones_like(final), *args))
    for a, b in zip(*results.values(), strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


def test_triton_dqk_hoisted_v_per_head(monkeypatch):
    """The v10 dq / dk kernel with v and the state loaded per q head (`DQK_HOISTED_ONE_V` off), at GQA 4 with
    packed short sequences, against the naive recurrence."""
    case, dtype = DQK_HOISTED_CASES[2]
    flags = watch_hoisted_kernels(monkeypatch, case, one_v=False)
    check_triton_against_naive(case, dtype)
    check_flags(flags["dqk"][0], case)


class Launch:
    """A kernel's `kernel[grid](...)` with `check(args, kwargs)` called before each launch."""

    def __init__(self, kernel, check):
        self.kernel, self.check = kernel, check

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.check(args, kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


def check_flags(flags: torch.Tensor, case: Case) -> None:
    """Flags [chunks, tiles, kv heads] of a hoisted kernel against the gates of a DQK_HOISTED_CASES case."""
    bounds = case.cu_seqlens or [b * case.length for b in range(case.batch + 1)]
    real = sum(-(-(end - start) // 64) for start, end in zip(bounds[:-1], bounds[1:]))
    flagged = flags[:real].cpu()  # packed: the grid's last programs have no chunk (and write no flag)
    if case.decay_strength == 2.0:  # the 64-token chunk spreads by ~64 > 40, the 8-token one by <= 16
        assert flagged[0].all() and not flagged[1].any()
    elif case.decay_strength > 2.0:
        assert flagged[0].all()
    else:
        assert not flagged.any()


@pytest.mark.parametrize("case,dtype", DQK_HOISTED_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_triton_output_hoisted_from_kept_states(case, dtype, monkeypatch):
    """The v11 forward output path from the states the forward keeps for the backward (`save=True`: computed
    wide), against the naive recurrence with NaN-poisoned buffers; the hoisted and flagged launches as in
    `test_triton_hoisted_kernels` (which runs the forward without keeping states)."""
    flags = watch_hoisted_kernels(monkeypatch, case)
    forward = triton_module("triton_forward")
    x = make_inputs(case, dtype, kernel_device())
    args = chunk_args(case, x)
    with poisoned():
        o, final, _ = forward.chunk_forward(*args, save=True)
    cpu = on_device(x, "cpu")
    o_ref, final_ref = naive_linear_attention(
        *(cpu[n].double() for n in ("q", "k", "v", "g")), decay=case.decay, scale=SCALE,
        initial_state=cpu["initial_state"].double(), cu_seqlens=cpu["cu_seqlens"],
    )
    tol = TOLERANCE[dtype]
    assert_close(o.cpu(), o_ref, tol, "o")
    assert_close(final.cpu(), final_ref, tol, "final state")
    assert len(flags["output"]) == 1
    check_flags(flags["output"][0], case)


def test_triton_dv_hoisted_not_past_its_k(monkeypatch):
    """K above DV_HOISTED_TILES' first entry (K in one tile) or a decay other than the vector one: the per-tile
    `_chunk_dv_kernel` alone, without FLAGGED."""
    backward = triton_module("triton_backward")
    monkeypatch.setattr(backward, "DV_HOISTED", True)
    monkeypatch.setattr(backward, "DV_HOISTED_MAX_K", 128)  # every K the hoisted tile takes, past the default 64
    monkeypatch.setattr(backward, "DV_HOISTED_TILES", (32, 64, 8))
    ran = []

    def hoisted(args, kwargs):
        raise AssertionError("_chunk_dv_hoisted_kernel ran")

    def default(args, kwargs):
        assert not kwargs["FLAGGED"]
        ran.append(kwargs["MODE"])

    monkeypatch.setattr(backward, "_chunk_dv_hoisted_kernel", Launch(backward._chunk_dv_hoisted_kernel, hoisted))
    monkeypatch.setattr(backward, "_chunk_dv_kernel", Launch(backward._chunk_dv_kernel, default))
    check_triton_against_naive(Case("vector", length=20, heads=2, kv_heads=1, dk=48, dv=16), torch.float32)
    check_triton_against_naive(Case("scalar", length=20, heads=2, kv_heads=1, dk=16, dv=16), torch.float32)
    assert ran == [2, 1]


def check_triton_against_naive(case: Case, dtype: torch.dtype) -> None:
    forward, backward = triton_module("triton_forward"), triton_module("triton_backward")
    x = make_inputs(case, dtype, kernel_device())
    args = chunk_args(case, x)
    with poisoned():
        o, final = forward.chunk_forward(*args)
    do = torch.randn_like(o)
    dht = torch.randn_like(final)
    with poisoned():
        dq, dk, dv, dg, dh0 = backward.chunk_backward(do, dht, *args)
    cpu = on_device(x, "cpu")
    o_ref, final_ref, grads_ref, scales = naive_with_grads(case, cpu, SCALE, do.cpu(), dht.cpu())
    tol = TOLERANCE[dtype]
    assert_close(o.cpu(), o_ref, tol, "o")
    assert_close(final.cpu(), final_ref, tol, "final state")
    grads = {"q": dq, "k": dk, "v": dv, "g": dg, "initial_state": dh0}
    grads = {n: g.cpu() for n, g in grads.items() if g is not None}
    check_grads(grads, grads_ref, scales, tol, str(case))


# v9: the forward keeps its chunk states h for the backward (op.SAVE_STATES). Every decay kind; packed short
# sequences (one and two tokens, an empty one); GQA 4 / 2 and 3 / 1; with and without an initial state; a partial
# last chunk; several chunks, K and V tiles (the scan's layout) for the vector decay
SAVED_CASES = [
    Case("none", batch=1, length=70, heads=3, kv_heads=1, dk=32, dv=16, cu_seqlens=(0, 1, 3, 70)),
    Case("constant", length=40, dk=32, dv=16),
    Case("scalar", batch=1, length=40, heads=2, kv_heads=2, dk=16, dv=32, cu_seqlens=(0, 2, 3, 40),
         initial_state=False),
    Case("vector", length=21, dk=32, dv=40),
    Case("vector", batch=1, length=150, heads=4, kv_heads=2, dk=72, dv=40, cu_seqlens=(0, 0, 1, 70, 150)),
]


@contextlib.contextmanager
def triton_ops_here():
    """The linear-attention ops dispatch to their CUDA implementations (the Triton launchers) on this machine's
    kernel device: on the CPU (no CUDA here), their CPU kernels are replaced by those functions for the block, so
    the launchers run in the interpreter behind the ops, the autograd and the SAVE_STATES switch."""
    if kernel_device().type == "cuda":
        yield
        return
    with torch.library._scoped_library("rewrite", "IMPL") as lib:
        lib.impl("linear_attention", la_op._forward_cuda, "CPU")
        lib.impl("linear_attention_backward", la_op._backward_cuda, "CPU")
        lib.impl("linear_attention_saving", la_op._saving_cuda, "CPU")
        lib.impl("linear_attention_backward_saved", la_op._backward_saved_cuda, "CPU")
        yield


def count_state_calls(monkeypatch) -> dict:
    """{"forward": n, "backward": n}: calls of `triton_forward.chunk_states` by the forward launcher and by the
    backward launcher (its recompute), counted from here on."""
    forward, backward = triton_module("triton_forward"), triton_module("triton_backward")
    calls = {"forward": 0, "backward": 0}

    def counting(module, name):
        original = module.chunk_states

        def states(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, "chunk_states", states)

    counting(forward, "forward")
    counting(backward, "backward")
    return calls


@pytest.mark.parametrize("case", SAVED_CASES, ids=str)
def test_saved_states_through_the_op_match_naive(case, monkeypatch):
    """SAVE_STATES on: `linear_attention` with inputs requiring grad runs `rewrite::linear_attention_saving` and its
    backward `rewrite::linear_attention_backward_saved` (Triton launchers, NaN-poisoned buffers); the backward
    did not recompute the states (no `chunk_states` call), the forward computed them once; output, final state
    and every gradient against the naive recurrence (float32)."""
    monkeypatch.setattr(la_op, "SAVE_STATES", True)
    calls = count_state_calls(monkeypatch)
    x = make_inputs(case, torch.float32, kernel_device())
    with triton_ops_here(), poisoned():
        out = []
        ops = rewrite_ops_called(lambda: out.append(run_public(case, x, leaves=True)))
        (o, final, leaves), = out
        assert calls == {"forward": 1, "backward": 0}
        do, dht = torch.randn_like(o), torch.randn_like(final)
        grads = dict(
            zip(leaves, torch.autograd.grad((o * do).sum() + (final * dht).sum(), list(leaves.values())))
        )
    assert ops == {"rewrite::linear_attention_saving"}
    assert calls == {"forward": 1, "backward": 0}, "the backward recomputed the states the forward kept"
    o_ref, final_ref, grads_ref, scales = naive_with_grads(case, on_device(x, "cpu"), SCALE, do.cpu(), dht.cpu())
    tol = TOLERANCE[torch.float32]
    assert_close(o.cpu(), o_ref, tol, "o")
    assert_close(final.cpu(), final_ref, tol, "final state")
    check_grads({n: g.cpu() for n, g in grads.items()}, grads_ref, scales, tol, str(case))


def test_states_recomputed_through_the_op_when_not_saving(monkeypatch):
    """SAVE_STATES off (and on, for a non-causal call): `rewrite::linear_attention`, whose backward recomputes the
    states (one `chunk_states` call in the backward launcher); the gradients still match the naive recurrence."""
    monkeypatch.setattr(la_op, "SAVE_STATES", False)
    calls = count_state_calls(monkeypatch)
    case = SAVED_CASES[3]
    x = make_inputs(case, torch.float32, kernel_device())
    with triton_ops_here(), poisoned():
        out = []
        assert rewrite_ops_called(lambda: out.append(run_public(case, x, leaves=True))) == {"rewrite::linear_attention"}
        (o, final, leaves), = out
        do, dht = torch.randn_like(o), torch.randn_like(final)
        grads = dict(
            zip(leaves, torch.autograd.grad((o * do).sum() + (final * dht).sum(), list(leaves.values())))
        )
    assert calls == {"forward": 1, "backward": 1}
    o_ref, final_ref, grads_ref, scales = naive_with_grads(case, on_device(x, "cpu"), SCALE, do.cpu(), dht.cpu())
    tol = TOLERANCE[torch.float32]
    assert_close(o.cpu(), o_ref, tol, "o")
    check_grads({n: g.cpu() for n, g in grads.items()}, grads_ref, scales, tol, str(case))
    monkeypatch.setattr(la_op, "SAVE_STATES", True)
    noncausal = Case("none", batch=1, length=20, dk=16, dv=8, causal=False)
    y = make_inputs(noncausal, torch.float32, "cpu")
    assert rewrite_ops_called(lambda: run_public(noncausal, y, leaves=True)) == {"rewrite::linear_attention"}


@pytest.mark.parametrize("case,dtype", [(SAVED_CASES[4], torch.float16), (SAVED_CASES[2], torch.float16),
                                        (SAVED_CASES[1], torch.float32)], ids=str)
def test_triton_kept_states_are_the_backward_recompute(case, dtype):
    """chunk_forward(save=True) returns h equal, bit for bit, to the states the backward recomputes (its own
    `chunk_states` call: float32 operands with a decay), and the final state equal to the recompute's; h has the
    shape the saving op's fake gives on CUDA (`op.kept_shape`, the documented memory cost). Half precision, where
    the backward's wide products differ from the default forward's."""
    forward = triton_module("triton_forward")
    x = make_inputs(case, dtype, kernel_device())
    args = chunk_args(case, x)
    with poisoned():
        o, final, h = forward.chunk_forward(*args, save=True)
        chunks, decay_kw = forward.prepare(x["q"], x["k"], x["g"], case.decay, x["cu_seqlens"])
        h_bwd, final_bwd = forward.chunk_states(x["k"], x["v"], decay_kw, x["initial_state"], chunks,
                                                wide=decay_kw["MODE"] != 0)
    assert tuple(h.shape) == la_op.kept_shape(x["q"], x["k"], x["v"], x["cu_seqlens"]) and h.dtype == torch.float32
    # rows past the last real chunk (packed: the chunk count is an upper bound) are never written: NaN in both
    torch.testing.assert_close(h, h_bwd, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(final, final_bwd, rtol=0, atol=0)
    assert torch.isfinite(final).all()
    o_ref, final_ref = naive_linear_attention(
        *(None if t is None else t.cpu().double() for t in (x["q"], x["k"], x["v"], x["g"])),
        decay=case.decay, scale=SCALE, cu_seqlens=None if x["cu_seqlens"] is None else x["cu_seqlens"].cpu(),
        initial_state=None if x["initial_state"] is None else x["initial_state"].cpu().double(),
    )
    assert_close(o.cpu(), o_ref, TOLERANCE[dtype], "o")


@pytest.mark.parametrize("case,dtype", [(SAVED_CASES[4], torch.float16), (SAVED_CASES[0], torch.float16),
                                        (SAVED_CASES[2], torch.float16), (SAVED_CASES[3], torch.float32)], ids=str)
def test_triton_forward_states_in_the_input_dtype_give_the_same_outputs(case, dtype, monkeypatch):
    """A forward that keeps nothing stores the states before each chunk in q's dtype (`STATES_IN_INPUT_DTYPE`):
    outputs and final state equal bit for bit those of float32 storage, and the states buffer is 16-bit for 16-bit
    inputs (float32 for float32 inputs); NaN-poisoned buffers (vector decay: scan path; none / scalar: the
    sequential states kernel)."""
    forward = triton_module("triton_forward")
    x = make_inputs(case, dtype, kernel_device())
    stored = []
    chunk_states = forward.chunk_states
    monkeypatch.setattr(forward, "chunk_states",
                        lambda *a, **kw: (lambda out: stored.append(out[0].dtype) or out)(chunk_states(*a, **kw)))
    results = {}
    for narrow in (True, False):
        monkeypatch.setattr(forward, "STATES_IN_INPUT_DTYPE", narrow)
        with poisoned():
            results[narrow] = forward.chunk_forward(*chunk_args(case, x))
    assert stored == [dtype, torch.float32]
    for got, expected, name in zip(results[True], results[False], ("o", "final state")):
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=f"{name} differs with 16-bit states")
    assert torch.isfinite(results[True][0]).all()


def test_saving_only_when_autograd_needs_it(monkeypatch):
    """With SAVE_STATES on, inference (no grad mode, or no input requiring grad) runs rewrite::linear_attention
    (nothing kept), training runs rewrite::linear_attention_saving and its backward
    rewrite::linear_attention_backward_saved; switched off, rewrite::linear_attention and its backward."""
    case = Case("vector", batch=1, length=20, dk=16, dv=8, cu_seqlens=(0, 3, 20))
    x = make_inputs(case, torch.float32, "cpu")
    monkeypatch.setattr(la_op, "SAVE_STATES", True)
    call = lambda: linear_attention(x["q"], x["k"], x["v"], x["g"], cu_seqlens=x["cu_seqlens"])  # noqa: E731
    assert rewrite_ops_called(call) == {"rewrite::linear_attention"}
    x["g"].requires_grad_()
    with torch.no_grad():
        assert rewrite_ops_called(call) == {"rewrite::linear_attention"}
    with torch.inference_mode():
        assert rewrite_ops_called(call) == {"rewrite::linear_attention"}
    assert rewrite_ops_called(call) == {"rewrite::linear_attention_saving"}
    assert rewrite_ops_called(lambda: call()[0].sum().backward()) == {"rewrite::linear_attention_saving",
                                                            "rewrite::linear_attention_backward_saved"}
    monkeypatch.setattr(la_op, "SAVE_STATES", False)
    assert rewrite_ops_called(lambda: call()[0].sum().backward()) == {"rewrite::linear_attention",
                                                            "rewrite::linear_attention_backward"}


@pytest.mark.parametrize("used", ["o", "final state"])
def test_saving_op_grads_with_one_output_used(used, monkeypatch):
    """SAVE_STATES on, only o or only the final state used: the other's gradient is not materialised by autograd
    (zeros stand in), and neither is one for the kept states; every gradient matches the naive recurrence
    (CPU reference ops, float64)."""
    monkeypatch.setattr(la_op, "SAVE_STATES", True)
    case = Case("scalar", batch=1, length=30, heads=4, kv_heads=2, dk=8, dv=6, cu_seqlens=(0, 1, 30))
    x = make_inputs(case, torch.float64, "cpu")
    o, final, leaves = run_public(case, x, leaves=True)
    do = torch.randn_like(o) if used == "o" else torch.zeros_like(o)
    dht = torch.randn_like(final) if used == "final state" else torch.zeros_like(final)
    target, grad = (o, do) if used == "o" else (final, dht)
    grads = dict(zip(leaves, torch.autograd.grad(target, list(leaves.values()), grad)))
    _, _, grads_ref, scales = naive_with_grads(case, x, SCALE, do, dht)
    check_grads(grads, grads_ref, scales, TOLERANCE[torch.float64], str(case))


@pytest.mark.parametrize("programs", [0, 128])
@pytest.mark.parametrize("decay", ["none", "constant", "scalar", "vector"])
def test_triton_step_chained_equals_chunked_forward(decay, programs, monkeypatch):
    step, forward = triton_module("triton_step"), triton_module("triton_forward")
    monkeypatch.setattr(step, "STEP_PROGRAMS", programs)  # 0: one 32-column V tile; 128: 8-column tiles
    assert step.step_tile(2, 24) == (32 if programs == 0 else 8)
    case = Case(decay, length=7, heads=6, kv_heads=2, dk=40, dv=24)
    for dtype in (torch.float32, torch.float16):
        x = make_inputs(case, dtype, kernel_device())
        with poisoned():
            o_full, final_full = forward.chunk_forward(
                x["q"], x["k"], x["v"], x["g"], decay, SCALE, x["initial_state"], None
            )
        state, outputs = x["initial_state"], []
        for start, end in ((0, 1), (1, 4), (4, 5), (5, 7)):  # one token and a few at a time
            g = x["g"] if decay in ("none", "constant") else x["g"][:, start:end]
            sl = slice(start, end)
            with poisoned():
                o, state = step.recurrent_step(
                    x["q"][:, sl], x["k"][:, sl], x["v"][:, sl], g, decay, SCALE, state
                )
            outputs.append(o)
        tol = TOLERANCE[dtype]
        assert_close(torch.cat(outputs, 1), o_full, tol, f"o {dtype}")
        assert_close(state, final_full, tol, f"state {dtype}")


@pytest.mark.parametrize("decay", ["none", "vector"])
def test_public_step_chained_equals_linear_attention(decay):
    case = Case(decay, length=9, dk=16, dv=8)
    x = make_inputs(case, torch.float32, "cpu")
    o_full, final_full = linear_attention(
        x["q"], x["k"], x["v"], x["g"], scale=SCALE, initial_state=x["initial_state"], output_final_state=True
    )
    state, outputs = x["initial_state"], []
    for t in range(case.length):
        g = None if x["g"] is None else x["g"][:, t : t + 1]
        o, state = linear_attention_step(
            x["q"][:, t : t + 1], x["k"][:, t : t + 1], x["v"][:, t : t + 1], g, scale=SCALE, state=state
        )
        outputs.append(o)
    assert_close(torch.cat(outputs, 1), o_full, 1e-5, "o")
    assert_close(state, final_full, 1e-5, "state")


def normalized_step_inputs(case: Case, dtype: torch.dtype, device) -> dict:
    """`make_inputs` with positive q and k (elu + 1, as a normalising mixer's feature map gives them) and an
    initial state of V + 1 columns whose last, the running sum of k, is positive too."""
    x = make_inputs(case, dtype, device)
    x["q"], x["k"] = apply_feature_map(x["q"], "elu"), apply_feature_map(x["k"], "elu")
    z = torch.rand_like(x["initial_state"][..., :1]) * 4
    x["initial_state"] = torch.cat([x["initial_state"], z], dim=-1)
    return x


def normalized_reference(x: dict, decay: str, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, final state) in float64 by the naive recurrence over v with a column of ones appended, divided
    by that column's output: the definition of a normalised step."""
    v = torch.cat([x["v"], torch.ones_like(x["v"][..., :1])], dim=-1).double()
    g = None if x["g"] is None else x["g"].double()
    o, final = naive_linear_attention(
        x["q"].double(), x["k"].double(), v, g, decay=decay, scale=SCALE, initial_state=x["initial_state"].double()
    )
    return o[..., :-1] / (o[..., -1:] + eps), final


STEP_VARIANTS = ("functional", "inplace", "normalized", "normalized_inplace")
"""Step launchers: new state or state updated in place (`recurrent_step_`), without normalisation or with
(the functional kernel keeps the running sum of k itself, the in-place one is given it per token)."""


@pytest.mark.parametrize("variant", STEP_VARIANTS)
@pytest.mark.parametrize("decay", ["none", "constant", "scalar", "vector"])
def test_triton_step_variants_chained_equal_the_naive_recurrence(decay, variant, monkeypatch):
    """Chained over one and several tokens at a time, each step variant gives the naive recurrence's outputs
    and state (odd head dims K = 20, V = 12 split into two 8-column tiles, GQA 6 / 2, float32 and float16);
    an in-place step returns no new state and writes the one it was given. With 8-column tiles every tile
    of a kv head reads the running sum of k that one of them writes: the interpreter runs programs in
    order, so a tile reading it after the first wrote it would show here."""
    from rewrite.kernels.linear_attention.api import running_key_sums

    step = triton_module("triton_step")
    monkeypatch.setattr(step, "STEP_PROGRAMS", 128)
    assert step.step_tile(2 * 2, 12) == 8
    normalize, inplace = variant.startswith("normalized"), variant.endswith("inplace")
    case = Case(decay, batch=2, length=5, heads=6, kv_heads=2, dk=20, dv=12)
    eps = 1e-6
    for dtype in (torch.float32, torch.float16):
        x = (normalized_step_inputs if normalize else make_inputs)(case, dtype, kernel_device())
        if normalize:
            o_ref, final_ref = normalized_reference(on_device(x, "cpu"), decay, eps)
        else:
            o_ref, final_ref = naive_linear_attention(
                *(None if t is None else t.cpu().double() for t in (x["q"], x["k"], x["v"], x["g"])),
                decay=decay, scale=SCALE, initial_state=x["initial_state"].cpu().double(),
            )
        state, outputs = x["initial_state"].clone(), []
        for start, end in ((0, 1), (1, 4), (4, 5)):
            g = x["g"] if decay in ("none", "constant") else x["g"][:, start:end]
            q, k, v = (x[n][:, start:end] for n in ("q", "k", "v"))
            with poisoned():
                if inplace:
                    z = running_key_sums(state, k, g, decay) if normalize else None
                    held = state
                    o = step.recurrent_step_(q, k, v, g, decay, SCALE, state, z, eps)
                    assert state is held
                else:
                    o, state = step.recurrent_step(q, k, v, g, decay, SCALE, state, normalize, eps)
            outputs.append(o)
        tol = TOLERANCE[dtype]
        assert_close(torch.cat(outputs, 1).cpu(), o_ref, tol, f"o {dtype}")
        assert_close(state.cpu(), final_ref, tol, f"state {dtype}")


@pytest.mark.parametrize("decay", ["none", "vector"])
@pytest.mark.parametrize("precomputed", ["always", "never"])
def test_public_step_normalized_and_inplace_equal_the_ones_column(decay, precomputed, monkeypatch):
    """linear_attention_step(normalize=True) equals the step over v with a column of ones divided by that
    column (what the mixers did), token by token, functional and in place (the running sum of k computed
    before the kernel, or the functional kernel and a copy); GQA, float32 (CPU reference ops)."""
    api = importlib.import_module("rewrite.kernels.linear_attention.api")
    monkeypatch.setattr(api, "PRECOMPUTED_NORMALIZER", precomputed)
    case = Case(decay, batch=2, length=4, heads=4, kv_heads=2, dk=12, dv=6)
    x = normalized_step_inputs(case, torch.float32, "cpu")
    ones = torch.cat([x["v"], torch.ones_like(x["v"][..., :1])], dim=-1)
    functional, held = x["initial_state"].clone(), x["initial_state"].clone()
    reference = x["initial_state"].clone()
    for t in range(case.length):
        g = None if x["g"] is None else x["g"][:, t : t + 1]
        q, k, v = x["q"][:, t : t + 1], x["k"][:, t : t + 1], x["v"][:, t : t + 1]
        o_ref, reference = linear_attention_step(q, k, ones[:, t : t + 1], g, scale=SCALE, state=reference)
        o_ref = o_ref[..., :-1] / (o_ref[..., -1:] + 1e-6)
        o, functional = linear_attention_step(q, k, v, g, scale=SCALE, state=functional, normalize=True)
        o_in, out = linear_attention_step(q, k, v, g, scale=SCALE, state=held, normalize=True, inplace=True)
        assert out is held
        assert_close(o, o_ref, 1e-5, f"o {t}")
        assert_close(o_in, o_ref, 1e-5, f"o in place {t}")
    assert_close(functional, reference, 1e-6, "state")
    assert_close(held, reference, 1e-6, "state in place")
    with pytest.raises(ValueError, match="in-place step needs a contiguous"):
        linear_attention_step(q, k, v, g, scale=SCALE, state=held.transpose(-1, -2).contiguous().mT,
                              normalize=True, inplace=True)
    with pytest.raises(ValueError, match=r"V \+ 1\]"):
        linear_attention_step(q, k, v, g, scale=SCALE, state=held[..., :-1], normalize=True)


def test_compiled_inplace_step_writes_the_state_input_without_a_copy():
    """Under torch.compile (CPU Inductor) the decode path's in-place normalised step runs the mutable op on
    the state input itself: no clone or copy of the state in the generated code, the running sum of k
    fused into the kernel computing the feature map, and the eager step's values."""
    from torch._inductor.utils import run_and_get_code

    def step(q, k, v, g, state):
        q, k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
        o, _ = linear_attention_step(q, k, v, g, scale=SCALE, state=state, normalize=True, inplace=True)
        return o * 2

    case = Case("vector", batch=1, length=1, heads=4, kv_heads=2, dk=8, dv=4)
    x = normalized_step_inputs(case, torch.float32, "cpu")
    args = (x["q"], x["k"], x["v"], x["g"])
    eager_state, state = x["initial_state"].clone(), x["initial_state"].clone()
    expected = step(*args, eager_state)
    compiled = torch.compile(step, backend="inductor", fullgraph=True, dynamic=False)
    o, codes = run_and_get_code(compiled, *args, state)
    code = "\n".join(codes)
    call = code[code.index("def call("):]
    assert "linear_attention_step_.default(" in call
    assert not re.search(r"clone|\.copy_\(|cpp_fused_copy_", call), call
    kernels = [line for line in call.splitlines() if line.strip().startswith("cpp_fused")]
    assert len(kernels) == 2, kernels  # phi(q), phi(k) and z in one kernel; o * 2 in the other
    assert_close(o, expected, 1e-6, "o")
    assert_close(state, eager_state, 1e-6, "state")


@pytest.mark.parametrize("feature_map", ["softmax", "elu", "relu"])
@pytest.mark.parametrize("decay", ["scalar", "vector"])
def test_feature_maps_and_key_gate(feature_map, decay):
    case = Case(decay, length=20, dk=16, dv=8)
    x = make_inputs(case, torch.float64, "cpu")
    o, final = linear_attention(
        x["q"],
        x["k"],
        x["v"],
        decay=decay,
        feature_map=feature_map,
        key_gate_normalizer=16.0,
        output_final_state=True,
        initial_state=x["initial_state"],
    )
    g = torch.nn.functional.logsigmoid(x["k"] if decay == "vector" else x["k"].mean(-1)) / 16
    assert_close(log_decay_from_keys(x["k"], decay, 16.0), g.float(), 1e-6, "gate")
    phi = {
        "softmax": lambda t: t.softmax(-1),
        "elu": lambda t: torch.nn.functional.elu(t) + 1,
        "relu": torch.relu,
    }[feature_map]
    assert_close(apply_feature_map(x["q"], feature_map), phi(x["q"]), 1e-12, "feature map")
    o_ref, final_ref = naive_linear_attention(
        phi(x["q"]), phi(x["k"]), x["v"], g, decay=decay, initial_state=x["initial_state"]
    )
    assert_close(o, o_ref, 1e-6, "o")
    assert_close(final, final_ref, 1e-6, "final state")


# The vector key gate computed inside the kernels (`api.KERNEL_KEY_GATE`, the ops' key_gate): (case, dtype, normalizer,
# states). An odd length (a partial chunk) with GQA 2 and two V tiles; K = 100 (a partial key tile, the per-head
# output and per-tile dv kernels) with GQA 3 and no initial state; packed one- and two-token sequences in float16;
# strong gates (normalizer 1: about -0.8 per token, chunks past the whole-chunk limit, so the flagged per-tile
# kernels and the sub-chunk / exact forms run); the sequential states kernels (`SCAN_MODES` empty: the forward's
# `_chunk_states_kernel`, the backward's `_chunk_dstates_kernel`)
KEY_GATE_CASES = [
    (Case("vector", length=21, dk=32, dv=40), torch.float32, 16.0, "scan"),
    (Case("vector", batch=1, length=80, heads=3, kv_heads=1, dk=100, dv=24, initial_state=False), torch.float32,
     16.0, "scan"),
    (Case("vector", batch=1, length=70, heads=4, kv_heads=2, dk=32, dv=16, cu_seqlens=(0, 1, 3, 70)),
     torch.float16, 16.0, "scan"),
    (Case("vector", batch=1, length=72, heads=2, kv_heads=1, dk=32, dv=16), torch.float32, 1.0, "scan"),
    (Case("vector", length=21, heads=2, kv_heads=1, dk=32, dv=16), torch.float32, 16.0, "sequential"),
]


def key_gate_inputs(case: Case, dtype: torch.dtype, feature_map: str) -> dict:
    """`make_inputs` plus "raw_k", the raw keys (the gate's source), with k = phi(raw keys) for the attention
    and g the gate's log-decays computed outside the kernels (float32) from the raw keys."""
    x = make_inputs(case, dtype, kernel_device())
    x["raw_k"] = x["k"]
    x["k"] = apply_feature_map(x["raw_k"], feature_map).contiguous()
    return x


@pytest.mark.parametrize("feature_map", ["identity", "elu"])
@pytest.mark.parametrize("case,dtype,normalizer,states", KEY_GATE_CASES,
                         ids=lambda x: str(x).replace("torch.", ""))
def test_triton_key_gate_matches_the_gate_outside(case, dtype, normalizer, states, feature_map, monkeypatch):
    """The launchers with key_gate (g = the raw keys, the log-decay computed in every kernel that reads g) against
    the same launchers given g = log_decay_from_keys(raw keys) computed outside, and both against the naive
    recurrence on that g in float64: output, final state, dq, dk (the attention's keys phi(raw keys)), dv, the
    log-decay gradient and d initial state, NaN-poisoned buffers. With the elu feature map the gate reads the raw
    keys while the attention reads phi(k)."""
    forward, backward = triton_module("triton_forward"), triton_module("triton_backward")
    if states == "sequential":
        monkeypatch.setattr(forward, "SCAN_MODES", ())
    x = key_gate_inputs(case, dtype, feature_map)
    g_outside = log_decay_from_keys(x["raw_k"], "vector", normalizer)
    common = (case.decay, SCALE, x["initial_state"], x["cu_seqlens"])
    results = {}
    for name, g, key_gate in (("kernel gate", x["raw_k"], normalizer), ("gate outside", g_outside, 0.0)):
        with poisoned():
            o, final = forward.chunk_forward(x["q"], x["k"], x["v"], g, *common, key_gate=key_gate)
        if not results:
            do, dht = torch.randn_like(o), torch.randn_like(final)
        with poisoned():
            grads = backward.chunk_backward(do, dht, x["q"], x["k"], x["v"], g, *common, key_gate=key_gate)
        dq, dk, dv, dg, dh0 = grads
        assert dg.dtype == torch.float32 and dg.shape == x["raw_k"].shape
        grads = {"q": dq, "k": dk, "v": dv, "g": dg, "initial_state": dh0}
        results[name] = (o, final, {n: t.cpu() for n, t in grads.items() if t is not None})
    cpu = on_device({**x, "g": log_decay_from_keys(x["raw_k"].double(), "vector", normalizer)}, "cpu")
    o_ref, final_ref, grads_ref, scales = naive_with_grads(case, cpu, SCALE, do.cpu(), dht.cpu())
    tol = TOLERANCE[dtype]
    (o, final, grads), (o_out, final_out, grads_out) = results["kernel gate"], results["gate outside"]
    assert_close(o.cpu(), o_out.cpu(), tol, "o vs the gate outside")
    assert_close(final.cpu(), final_out.cpu(), tol, "final state vs the gate outside")
    check_grads(grads, grads_out, scales, tol, f"{case} vs the gate outside")
    assert_close(o.cpu(), o_ref, tol, "o")
    assert_close(final.cpu(), final_ref, tol, "final state")
    check_grads(grads, grads_ref, scales, tol, str(case))


def key_gate_public(leaves: dict, cu_seqlens, feature_map: str, normalizer: float):
    return linear_attention(leaves["q"], leaves["k"], leaves["v"], scale=SCALE, feature_map=feature_map,
                            key_gate_normalizer=normalizer, initial_state=leaves["initial_state"],
                            output_final_state=True, cu_seqlens=cu_seqlens)


def gate_outside_is_an_error(*args, **kwargs):
    raise AssertionError("the vector key gate was computed with PyTorch ops")


KEY_GATE_LEAVES = ("q", "k", "v", "initial_state")


def check_key_gate_against_float64(x, o, final, grads, do, dht, feature_map, tol, monkeypatch):
    """o, final and the gradients of KEY_GATE_LEAVES (for the cotangents do, dht) within `tol` of float64 autograd
    on the CPU through the PyTorch gate (`KERNEL_KEY_GATE` off, reference ops)."""
    monkeypatch.setattr(la_api, "KERNEL_KEY_GATE", False)
    ref_leaves = {n: x[n].detach().cpu().double().requires_grad_() for n in KEY_GATE_LEAVES}
    o_ref, final_ref = key_gate_public(ref_leaves, on_device(x, "cpu")["cu_seqlens"], feature_map, 16.0)
    grads_ref = torch.autograd.grad((o_ref * do.cpu().double()).sum() + (final_ref * dht.cpu().double()).sum(),
                                    list(ref_leaves.values()))
    assert_close(o.cpu(), o_ref, tol, "o")
    assert_close(final.cpu(), final_ref, tol, "final state")
    for name, grad, expected in zip(KEY_GATE_LEAVES, grads, grads_ref):
        assert_close(grad.cpu(), expected, tol, f"d{name}")


@pytest.mark.parametrize("save", [True, False], ids=["saving op", "plain op"])
@pytest.mark.parametrize("feature_map", ["identity", "elu"])
def test_key_gate_through_the_op_grads_reach_the_raw_keys(feature_map, save, monkeypatch):
    """`linear_attention(..., key_gate_normalizer=16)` with the gate in the kernels (Triton launchers behind the ops,
    interpreted here; NaN-poisoned buffers; SAVE_STATES on and off): the raw keys are both the attention's keys
    (through phi) and the gate's source, so their gradient sums both paths (the ops' backward applies the gate's
    derivative to the kernels' log-decay gradient). Output, final state and the gradients of q, the raw keys, v and
    the initial state against float64 autograd through the PyTorch gate (`KERNEL_KEY_GATE` off, reference ops).
    The gate was not computed with PyTorch ops."""
    monkeypatch.setattr(la_op, "SAVE_STATES", save)
    monkeypatch.setattr(la_api, "KERNEL_KEY_GATE", True)
    monkeypatch.setattr(la_api, "log_decay_from_keys", gate_outside_is_an_error)
    monkeypatch.setattr(la_op, "log_decay_from_keys", gate_outside_is_an_error)
    case = Case("vector", batch=1, length=70, heads=4, kv_heads=2, dk=32, dv=24, cu_seqlens=(0, 2, 5, 70))
    x = make_inputs(case, torch.float32, kernel_device())
    leaves = {n: x[n].detach().clone().requires_grad_() for n in KEY_GATE_LEAVES}
    with triton_ops_here(), poisoned():
        out = []
        ops = rewrite_ops_called(lambda: out.append(key_gate_public(leaves, x["cu_seqlens"], feature_map, 16.0)))
        (o, final), = out
        do, dht = torch.randn_like(o), torch.randn_like(final)
        grads = torch.autograd.grad((o * do).sum() + (final * dht).sum(), list(leaves.values()))
    assert ops == {"rewrite::linear_attention_saving" if save else "rewrite::linear_attention"}
    monkeypatch.undo()
    check_key_gate_against_float64(x, o, final, grads, do, dht, feature_map, TOLERANCE[torch.float32], monkeypatch)


@pytest.mark.parametrize("feature_map", ["identity", "elu"])
def test_key_gate_reference_ops_equal_the_gate_outside(feature_map, monkeypatch):
    """The ops' CPU reference implementations with key_gate (they convert the raw keys themselves) give, in float64,
    the outputs and gradients of the PyTorch gate computed before the op (`KERNEL_KEY_GATE` off), including the raw
    keys' gradient through the attention and the gate, for the plain and the saving ops."""
    case = Case("vector", batch=1, length=40, heads=4, kv_heads=2, dk=16, dv=8, cu_seqlens=(0, 1, 25, 40))
    x = make_inputs(case, torch.float64, "cpu")
    names = ("q", "k", "v", "initial_state")
    do = torch.randn(1, 40, 4, 8, dtype=torch.float64)
    dht = torch.randn(3, 2, 16, 8, dtype=torch.float64)
    results = {}
    for save in (True, False):
        monkeypatch.setattr(la_op, "SAVE_STATES", save)
        for in_kernels in (True, False):
            monkeypatch.setattr(la_api, "KERNEL_KEY_GATE", in_kernels)
            leaves = {n: x[n].detach().clone().requires_grad_() for n in names}
            o, final = key_gate_public(leaves, x["cu_seqlens"], feature_map, 16.0)
            grads = torch.autograd.grad((o * do).sum() + (final * dht).sum(), list(leaves.values()))
            results[save, in_kernels] = (o, final, *grads)
    labels = ("o", "final state", *(f"d{n}" for n in names))
    for save in (True, False):
        for label, a, b in zip(labels, results[save, True], results[save, False]):
            assert_close(a, b, TOLERANCE[torch.float64], f"{label} (save {save})")


class KeyGateMixer(torch.nn.Module):
    def forward(self, q, k, v, cu_seqlens):
        o, state = linear_attention(q.sigmoid(), k, v, cu_seqlens=cu_seqlens, output_final_state=True,
                                    feature_map="elu", key_gate_normalizer=16.0)
        return o * 2, state


@pytest.mark.parametrize("save", [False, True])
def test_compile_fullgraph_with_the_key_gate(save, monkeypatch):
    """torch.compile(fullgraph=True) of a call with the vector key gate in the kernels (SAVE_STATES on and off): no
    graph break, forward and backward match eager (q and the raw keys'
    gradients, the latter through the attention and the gate); the exported op gets key_gate = 16."""
    monkeypatch.setattr(la_op, "SAVE_STATES", save)
    monkeypatch.setattr(la_api, "KERNEL_KEY_GATE", True)
    case = Case("vector", batch=1, length=20, dk=16, dv=8, cu_seqlens=(0, 5, 20))
    x = make_inputs(case, torch.float32, "cpu")
    args = [x["q"].requires_grad_(), x["k"].requires_grad_(), x["v"], x["cu_seqlens"]]
    compiled = torch.compile(KeyGateMixer(), fullgraph=True, backend="aot_eager")
    o, state = compiled(*args)
    grads = torch.autograd.grad(o.sum() + state.sum(), args[:2])
    o_eager, state_eager = KeyGateMixer()(*args)
    grads_eager = torch.autograd.grad(o_eager.sum() + state_eager.sum(), args[:2])
    assert_close(o, o_eager, 1e-6, "o")
    assert_close(state, state_eager, 1e-6, "final state")
    for name, a, b in zip(("dq", "dk"), grads, grads_eager):
        assert_close(a, b, 1e-6, name)
    exported = torch.export.export(KeyGateMixer(), tuple(a.detach() for a in args))  # inference: the plain op
    calls = [n for n in exported.graph.nodes
             if n.op == "call_function" and n.target == torch.ops.rewrite.linear_attention.default]
    assert len(calls) == 1 and calls[0].args[-1] == 16.0, [n.args for n in calls]


def test_opcheck():
    case = Case("vector", length=20, dk=16, dv=8, batch=1, cu_seqlens=(0, 3, 20))
    x = make_inputs(case, torch.float32, "cpu")
    args = (x["q"], x["k"], x["v"], x["g"], "vector", SCALE, x["initial_state"], x["cu_seqlens"], True)
    torch.library.opcheck(torch.ops.rewrite.linear_attention, args)
    leaf = tuple(
        a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
    )
    torch.library.opcheck(torch.ops.rewrite.linear_attention, leaf)
    do, dht = torch.randn(1, 20, 4, 8), torch.randn(2, 2, 16, 8)
    plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.rewrite.linear_attention_backward, (do, dht, *plain))
    first_two = [t.detach()[:, :2] for t in plain[:4]]
    step_args = (*first_two, "vector", SCALE, torch.randn(1, 2, 16, 8))
    torch.library.opcheck(torch.ops.rewrite.linear_attention_step, step_args)
    wide = torch.cat([step_args[-1], torch.rand(1, 2, 16, 1)], dim=-1)
    torch.library.opcheck(torch.ops.rewrite.linear_attention_step, (*step_args[:-1], wide, True, 1e-6))
    z = torch.rand(1, 2, 2, 16)
    torch.library.opcheck(torch.ops.rewrite.linear_attention_step_, (*step_args, None, 0.0))
    torch.library.opcheck(torch.ops.rewrite.linear_attention_step_, (*step_args[:-1], wide, z, 1e-6))
    # the forward that keeps its states for the backward (SAVE_STATES), and the backward taking them
    torch.library.opcheck(torch.ops.rewrite.linear_attention_saving, plain[:-1])
    torch.library.opcheck(torch.ops.rewrite.linear_attention_saving, leaf[:-1])
    o, final, h = torch.ops.rewrite.linear_attention_saving(*plain[:-1])
    torch.library.opcheck(torch.ops.rewrite.linear_attention_backward_saved, (do, dht, *plain[:-1], h, final))
    for decay, g in (("none", None), ("constant", -torch.rand(2))):
        args = (plain[0], plain[1], plain[2], g, decay, SCALE, None, plain[7])  # no initial state
        o, final, h = torch.ops.rewrite.linear_attention_saving(*args)
        torch.library.opcheck(torch.ops.rewrite.linear_attention_backward_saved, (do, dht, *args, h, final))
    # the vector key gate in the kernels: g holds the raw keys (here k itself), key_gate the normalizer
    gated = (*plain[:3], plain[1], "vector", SCALE, *plain[6:], 16.0)
    gated_leaf = (*leaf[:3], leaf[1], "vector", SCALE, *leaf[6:], 16.0)
    torch.library.opcheck(torch.ops.rewrite.linear_attention, gated)
    torch.library.opcheck(torch.ops.rewrite.linear_attention, gated_leaf)
    torch.library.opcheck(torch.ops.rewrite.linear_attention_backward, (do, dht, *gated))
    saving = (*gated[:8], 16.0)
    torch.library.opcheck(torch.ops.rewrite.linear_attention_saving, saving)
    torch.library.opcheck(torch.ops.rewrite.linear_attention_saving, (*gated_leaf[:8], 16.0))
    o, final, h = torch.ops.rewrite.linear_attention_saving(*saving)
    torch.library.opcheck(torch.ops.rewrite.linear_attention_backward_saved, (do, dht, *gated[:8], h, final, 16.0))


class Mixer(torch.nn.Module):
    def forward(self, q, k, v, g, cu_seqlens):
        o, state = linear_attention(q.sigmoid(), k, v, g, cu_seqlens=cu_seqlens, output_final_state=True)
        return o * 2, state


def test_compile_fullgraph_and_export_keep_the_op():
    case = Case("scalar", batch=1, length=20, dk=16, dv=8, cu_seqlens=(0, 5, 20), initial_state=False)
    x = make_inputs(case, torch.float32, "cpu")
    args = [x["q"].requires_grad_(), x["k"], x["v"], x["g"], x["cu_seqlens"]]
    compiled = torch.compile(Mixer(), fullgraph=True, backend="aot_eager")
    o, state = compiled(*args)
    (o.sum() + state.sum()).backward()
    o_eager, state_eager = Mixer()(*args)
    assert_close(o, o_eager, 1e-6, "o")
    exported = torch.export.export(Mixer(), tuple(a.detach() for a in args))
    targets = {n.target for n in exported.graph.nodes if n.op == "call_function"}
    assert torch.ops.rewrite.linear_attention.default in targets


@pytest.mark.parametrize("save", [False, True])
def test_compile_fullgraph_with_saved_states(save, monkeypatch):
    """torch.compile(fullgraph=True) with SAVE_STATES on and off: no graph break, forward and backward run,
    and the output and gradients match eager."""
    monkeypatch.setattr(la_op, "SAVE_STATES", save)
    case = Case("vector", batch=1, length=20, dk=16, dv=8, cu_seqlens=(0, 5, 20))
    x = make_inputs(case, torch.float32, "cpu")
    args = [x["q"].requires_grad_(), x["k"], x["v"], x["g"].requires_grad_(), x["cu_seqlens"]]
    compiled = torch.compile(Mixer(), fullgraph=True, backend="aot_eager")
    o, state = compiled(*args)
    grads = torch.autograd.grad(o.sum() + state.sum(), [args[0], args[3]])
    o_eager, state_eager = Mixer()(*args)
    grads_eager = torch.autograd.grad(o_eager.sum() + state_eager.sum(), [args[0], args[3]])
    assert_close(o, o_eager, 1e-6, "o")
    assert_close(state, state_eager, 1e-6, "final state")
    for name, a, b in zip(("dq", "dg"), grads, grads_eager):
        assert_close(a, b, 1e-6, name)


class ProjectedMixer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, q, k, v, g):
        return linear_attention(self.proj(q), k, v, g)[0]


@pytest.mark.parametrize("save", [False, True])
def test_export_keeps_the_saving_op(save, monkeypatch):
    """torch.export of a module whose parameters require grad: with SAVE_STATES the graph holds
    rewrite::linear_attention_saving (training), else rewrite::linear_attention; both run and match eager."""
    monkeypatch.setattr(la_op, "SAVE_STATES", save)
    case = Case("scalar", batch=1, length=12, heads=2, kv_heads=2, dk=16, dv=8, initial_state=False)
    x = make_inputs(case, torch.float32, "cpu")
    module = ProjectedMixer()
    inputs = (x["q"], x["k"], x["v"], x["g"])
    program = torch.export.export(module, inputs)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert ("rewrite.linear_attention_saving.default" in targets) == save
    assert ("rewrite.linear_attention.default" in targets) != save
    assert_close(program.module()(*inputs), module(*inputs), 1e-6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"decay": "cosine"}, "decay must be one of"),
        ({"feature_map": "tanh"}, "feature_map must be one of"),
        ({"g": torch.zeros(2, 5, 2, 3)}, "g must have shape"),
        ({"k": torch.zeros(2, 5, 3, 8)}, r"heads \(3\) must divide"),
        ({"causal": False, "g": torch.zeros(2)}, "causal=False is defined only"),
        ({"cu_seqlens": torch.tensor([0, 2, 4])}, "cu_seqlens needs packed inputs"),
        ({"initial_state": torch.zeros(2, 2, 8, 4)}, "initial_state must have shape"),
    ],
)
def test_bad_arguments_raise_clear_errors(change, message):
    kwargs = {
        "q": torch.zeros(2, 5, 4, 8),
        "k": torch.zeros(2, 5, 2, 8),
        "v": torch.zeros(2, 5, 2, 6),
        **change,
    }
    if "v" not in change and kwargs["k"].shape[2] != 2:
        kwargs["v"] = torch.zeros(2, 5, kwargs["k"].shape[2], 6)
    with pytest.raises(ValueError, match=message):
        linear_attention(**kwargs)


def test_bad_cu_seqlens_values():
    q, k, v = torch.zeros(1, 5, 2, 8), torch.zeros(1, 5, 2, 8), torch.zeros(1, 5, 2, 4)
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to T"):
        linear_attention(q, k, v, cu_seqlens=torch.tensor([0, 3, 4]))


@gpu
@pytest.mark.parametrize(
    "decay,path",
    [("none", None), ("constant", None), ("scalar", None)] + [("vector", p) for p in ("masked", "batched", "whole")],
)
def test_cuda_bfloat16_against_float64(decay, path, monkeypatch):
    if path is not None:
        gated = triton_module("triton_gated")
        monkeypatch.setattr(gated, "SUB_PRODUCTS", {"forward": path, "backward": path})
    case = Case(decay, batch=2, length=300, heads=8, kv_heads=2, dk=128, dv=96)
    check_public_against_naive(case, torch.bfloat16, 1e-2)


@gpu
def test_cuda_strong_gates_bfloat16_against_float64(monkeypatch):
    """Strong gates (log-decays down to -2 per token: no chunk takes the whole-chunk form) in bf16 with the
    in-chunk dq / dk products as three TF32 products: every gradient, dg included, within 1e-2 of float64."""
    monkeypatch.setattr(triton_module("triton_backward"), "STRONG_GATE_PRECISION", "tf32x3")
    case = Case("vector", batch=1, length=1000, heads=4, kv_heads=2, dk=128, dv=128, decay_strength=2.0)
    check_public_against_naive(case, torch.bfloat16, 1e-2)


@gpu
@pytest.mark.parametrize("score_operands", ["float32", "input"])
@pytest.mark.parametrize("dv_warps", [8, 4])
@pytest.mark.parametrize("strength", [0.5, 2.0])
@pytest.mark.parametrize("dims", [(64, 64), (100, 32), (128, 128)])
def test_cuda_hoisted_kernels_bfloat16_against_float64(dims, strength, dv_warps, score_operands, monkeypatch):
    """The hoisted kernels (v10 dq / dk, v11 outputs, v12 dv) in bf16 against float64 through the public op:
    typical gates (every program in the hoisted kernels) and strong ones (log-decays down to -2 per token: the
    flagged programs by the per-tile kernels, three TF32 products there); GQA group 4 at K = V = 64, packed
    sequences at K = 100, V = 32 (the shape of the dv kernel's miscompile at BK 64 / 4 warps on triton 3.6), two
    V tiles at K = V = 128; the hoisted dv at the default 8 warps and at the sweep's 4 ("dv hoisted w4"); the
    whole-chunk scores from float32 (TF32) operands and from bf16 ones (`triton_gated.SCORE_OPERANDS`)."""
    monkeypatch.setattr(triton_module("triton_gated"), "SCORE_OPERANDS", score_operands)
    dk, dv = dims
    cu = (0, 1, 130, 700) if dk == 100 else None
    case = Case("vector", batch=1 if cu else 2, length=700 if cu else 300, heads=8, kv_heads=2, dk=dk, dv=dv,
                cu_seqlens=cu, decay_strength=strength)
    flags = watch_hoisted_kernels(monkeypatch, case)
    backward = triton_module("triton_backward")
    monkeypatch.setattr(backward, "STRONG_GATE_PRECISION", "tf32x3")
    monkeypatch.setattr(backward, "DV_HOISTED_TILES", backward.DV_HOISTED_TILES[:2] + (dv_warps,))
    check_public_against_naive(case, torch.bfloat16, 1e-2)
    assert all(flags.values()), {kind: len(f) for kind, f in flags.items()}


@gpu
@pytest.mark.parametrize("variant", list(V7_VARIANTS))
@pytest.mark.parametrize("dims", [(64, 64), (100, 32)])
def test_cuda_v7_variants_bfloat16_against_float64(variant, dims, monkeypatch):
    """The v7 launch choices on the GPU in bf16 against float64: GQA group 4 at K = V = 64 (the model's
    shape), and K = 100, V = 32 (the shape of the dv-kernel miscompile) with packed sequences."""
    forward = triton_module("triton_forward")
    for name, value in V7_VARIANTS[variant].items():
        monkeypatch.setattr(forward, name, value)
    dk, dv = dims
    cu = None if dk == 64 else (0, 1, 130, 700)
    case = Case("vector", batch=1 if cu else 2, length=700 if cu else 300, heads=8, kv_heads=2, dk=dk, dv=dv,
                cu_seqlens=cu)
    check_public_against_naive(case, torch.bfloat16, 1e-2)


@gpu
@pytest.mark.parametrize("feature_map", ["identity", "elu"])
def test_cuda_key_gate_bfloat16_against_float64(feature_map, monkeypatch):
    """The vector key gate in the kernels on the GPU (bf16 raw keys read as g), through the public op with GQA 4 at
    K = V = 64 and packed sequences: output, final state and the gradients of q, the raw keys (attention and gate),
    v and the initial state within 1e-2 of float64 autograd through the PyTorch gate (reference ops on the CPU)."""
    monkeypatch.setattr(la_api, "KERNEL_KEY_GATE", True)
    case = Case("vector", batch=1, length=700, heads=8, kv_heads=2, dk=64, dv=64, cu_seqlens=(0, 1, 130, 700))
    x = make_inputs(case, torch.bfloat16, "cuda")
    leaves = {n: x[n].detach().clone().requires_grad_() for n in KEY_GATE_LEAVES}
    o, final = key_gate_public(leaves, x["cu_seqlens"], feature_map, 16.0)
    do, dht = torch.randn_like(o), torch.randn_like(final)
    grads = torch.autograd.grad((o * do).sum() + (final * dht).sum(), list(leaves.values()))
    check_key_gate_against_float64(x, o, final, grads, do, dht, feature_map, 1e-2, monkeypatch)


@gpu
def test_cuda_varlen_long_sequences():
    case = dataclasses.replace(
        Case("vector", batch=1, length=1000, cu_seqlens=(0, 1, 2, 500, 1000)), dk=64, dv=64
    )
    check_public_against_naive(case, torch.float16, 5e-3)


def check_public_against_naive(case: Case, dtype: torch.dtype, tol: float, device: str = "cuda") -> None:
    """The public op (output, final state, every gradient) against the naive recurrence in float64."""
    x = make_inputs(case, dtype, device)
    o, final, leaves = run_public(case, x, leaves=True)
    do, dht = torch.randn_like(o), torch.randn_like(final)
    grads = dict(
        zip(leaves, torch.autograd.grad((o * do).sum() + (final * dht).sum(), list(leaves.values())))
    )
    o_ref, final_ref, grads_ref, scales = naive_with_grads(case, x, SCALE, do, dht)
    assert_close(o, o_ref, tol, "o")
    assert_close(final, final_ref, tol, "final state")
    check_grads(grads, grads_ref, scales, tol, str(case))


@gpu
def test_cuda_saved_states_memory_grads_and_opcheck(monkeypatch):
    """SAVE_STATES on CUDA: no grad -> nothing held after the forward (as off); with grad -> the kept states' bytes
    (`op.kept_shape`, the documented cost) plus the final state's, and gradients bitwise those of the recompute
    (the forward computes h with the backward's own call); opcheck of the two ops on CUDA (fake shapes against
    the Triton buffers)."""
    case = Case("vector", batch=1, length=300, heads=4, kv_heads=2, dk=64, dv=64, cu_seqlens=(0, 1, 150, 299, 300))
    x = make_inputs(case, torch.bfloat16, "cuda")
    kept_bytes = 4 * torch.Size(la_op.kept_shape(x["q"], x["k"], x["v"], x["cu_seqlens"])).numel()
    final_bytes = 4 * case.n * case.kv_heads * case.dk * case.dv

    def held(save, grad):
        monkeypatch.setattr(la_op, "SAVE_STATES", save)
        leaves = {n: x[n].clone().requires_grad_(grad) for n in DIFFERENTIABLE}
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        o, _ = linear_attention(leaves["q"], leaves["k"], leaves["v"], leaves["g"], decay=case.decay, scale=SCALE,
                                initial_state=leaves["initial_state"], cu_seqlens=x["cu_seqlens"])
        torch.cuda.synchronize()
        extra = torch.cuda.memory_allocated() - start - o.numel() * o.element_size()
        grads = torch.autograd.grad(o, list(leaves.values()), torch.ones_like(o)) if grad else None
        return extra, grads

    held(False, True), held(True, True)  # compiles first
    with torch.no_grad():
        assert held(True, False)[0] == held(False, False)[0] == 0
    assert held(True, False)[0] == 0  # grad mode on, nothing requires grad
    extra_on, grads_on = held(True, True)
    extra_off, grads_off = held(False, True)
    assert extra_off == 0
    # the caching allocator rounds each of the two buffers up (512 B; a block is not split for less than 1 MiB left)
    assert kept_bytes + final_bytes <= extra_on < kept_bytes + final_bytes + 2 * 2**20
    for name, a, b in zip(DIFFERENTIABLE, grads_on, grads_off):
        assert torch.equal(a, b), name
    y = make_inputs(Case("scalar", length=70, dk=16, dv=16), torch.float32, "cuda")
    args = (y["q"], y["k"], y["v"], y["g"], "scalar", SCALE, y["initial_state"], None)
    torch.library.opcheck(torch.ops.rewrite.linear_attention_saving,
                          tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args))
    o, final, h = torch.ops.rewrite.linear_attention_saving(*args)
    assert tuple(h.shape) == la_op.kept_shape(y["q"], y["k"], y["v"], None)
    torch.library.opcheck(torch.ops.rewrite.linear_attention_backward_saved,
                          (torch.randn_like(o), torch.randn_like(final), *args, h, final))
