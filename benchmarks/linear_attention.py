"""Linear-attention kernels next to SDPA (flash) and flash-linear-attention, in one run.

bf16, H=16, D=128, B=1 at L in {2K, 8K, 32K, 128K}, plus B=4 at L=8K; forward and forward+backward.
In order: first-call time of each decay kind, each in a fresh subprocess with an empty Triton
cache (so it includes every compile); a check of each decay kind on the GPU against a float64
reference; kernel launches per call; the timing table; optionally (--sweep) the SWEEP variants
(the previous implementation of the vector decay's in-chunk products, launch shapes) at --sweep-lengths.
Run: python -m benchmarks.linear_attention [--lengths 2048,8192] [--out runs/linear_attention.json]
Host time of a call: python -m benchmarks.linear_attention --host-split --lengths 8192,32768 --decays vector
Old vs new only: python -m benchmarks.linear_attention --sweep-only --decays vector [--sweep-breakdown]
Key gate in the kernels vs in PyTorch: python -m benchmarks.linear_attention --sweep-only --decays "vector keygate"
--sweep-variants "base,key gate in kernels" ("vector keygate": no g input, `key_gate_normalizer` from the keys).
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks import runner
from benchmarks.runner import Measurement, environment, measure, write_results
from benchmarks.variants import apply_changes, restore
from rewrite.kernels import linear_attention

H, D = 16, 128
KV_H = H
"""Query heads, key / value heads and head dim of every timed call (`--sweep-shape` changes them for a sweep)."""
KEY_GATE_DECAY = "vector keygate"
"""A decay name of this benchmark (with --decays): the vector decay from the keys' gate, `key_gate_normalizer=16` and
no g input; computed with PyTorch ops before the kernels unless the "key gate in kernels" sweep variant turns `api.KERNEL_KEY_GATE`
on."""
KEY_GATE_NORMALIZER = 16.0


def _decay_kwargs(decay: str) -> dict:
    """`linear_attention`'s decay keywords for a decay name of this benchmark."""
    if decay == KEY_GATE_DECAY:
        return {"decay": "vector", "key_gate_normalizer": KEY_GATE_NORMALIZER}
    return {"decay": decay}


def _inputs(b: int, t: int, decay: str, requires_grad: bool):
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(b, t, H, D, device=dev, dtype=dt) * 0.5
    k = F.normalize(torch.randn(b, t, KV_H, D, device=dev, dtype=torch.float32), dim=-1).to(dt)
    v = torch.randn(b, t, KV_H, D, device=dev, dtype=dt)
    g = None
    if decay == "scalar":
        g = F.logsigmoid(torch.randn(b, t, KV_H, device=dev) + 4.0)
    elif decay == "vector":
        g = F.logsigmoid(torch.randn(b, t, KV_H, D, device=dev) + 4.0)
    elif decay == "constant":
        g = -torch.rand(KV_H, device=dev) * 0.1
    # KEY_GATE_DECAY: no g; the gate logsigmoid(k) / 16 of these unit-norm keys is about -0.04 per token
    tensors = [q, k, v] + ([g] if g is not None else [])
    for x in tensors:
        x.requires_grad_(requires_grad)
    return q, k, v, g


def _ours(decay: str) -> Callable:
    def run(q, k, v, g):
        return linear_attention(q, k, v, g, **_decay_kwargs(decay))[0]

    return run


def _fla_gla() -> Callable | None:
    """FLA's `chunk_gla` as (q, k, v, g) -> o, or None (with the reason printed) where it does not import."""
    try:
        from fla.ops.gla import chunk_gla
    except Exception as exc:  # report, do not hide
        print(f"fla chunk_gla unavailable: {type(exc).__name__}: {exc}")
        return None
    return lambda q, k, v, g: chunk_gla(q, k, v, g)[0]


def _fwd_bwd(fn: Callable, args: tuple) -> Callable[[], None]:
    out = fn(*args)
    grad = torch.randn_like(out)

    def step():
        for a in args:
            if isinstance(a, torch.Tensor) and a.grad is not None:
                a.grad = None
        fn(*args).backward(grad)

    return step


def first_call_child(decay: str, length: int) -> None:
    """(In a fresh process) seconds of the first forward+backward call at B=1, L=length."""
    q, k, v, g = _inputs(1, length, decay, True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    linear_attention(q, k, v, g, **_decay_kwargs(decay))[0].sum().backward()
    torch.cuda.synchronize()
    print(f"FIRST_CALL {decay} {time.perf_counter() - t0:.2f}", flush=True)


def first_call_seconds(decay: str, length: int = 4096) -> float:
    """First-call time (compiles included) in a subprocess with an empty Triton cache."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TRITON_CACHE_DIR=cache)
        cmd = [sys.executable, "-m", "benchmarks.linear_attention", "--first-call-child", f"{decay}:{length}"]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    for line in out.stdout.splitlines():
        if line.startswith("FIRST_CALL"):
            return float(line.split()[-1])
    raise RuntimeError(f"first-call child failed: {out.stderr[-2000:]}")


def check_against_fp64(lengths=(1000, 2048), decays=("none", "constant", "scalar", "vector")) -> list[str]:
    """Relative error (2-norm) of output and gradients vs a float64 run of the same op (CPU reference)."""
    lines = []
    for decay in decays:
        for t in lengths:
            torch.manual_seed(t)
            errs = _errors_vs_fp64(_inputs(1, t, decay, True), decay)
            lines.append(f"check {decay:8s} L={t:5d} {_format_errors(errs)}")
    return lines


def _errors_vs_fp64(inputs, decay: str, reference=None) -> dict:
    """{output or gradient: relative error vs the float64 CPU run}; `reference` reuses that run's
    (o, grads), as returned in the "ref" entry."""
    q, k, v, g = inputs
    o = linear_attention(q, k, v, g, **_decay_kwargs(decay))[0]
    gen = torch.Generator(device=o.device).manual_seed(0)
    do = torch.randn(o.shape, generator=gen, device=o.device, dtype=o.dtype)
    o.backward(do)
    leaves = [x for x in (q, k, v, g) if x is not None]
    if reference is None:
        ref_args = [x.detach().double().cpu().requires_grad_(True) for x in leaves]
        ro = linear_attention(*ref_args[:3], ref_args[3] if g is not None else None, **_decay_kwargs(decay))[0]
        ro.backward(do.double().cpu())
        reference = (ro.detach(), [r.grad for r in ref_args])
    errs = {"o": _rel(o, reference[0])}
    for name, a, r in zip(("dq", "dk", "dv", "dg"), leaves, reference[1]):
        errs[name] = _rel(a.grad, r)
        a.grad = None
    errs["ref"] = reference
    return errs


def _format_errors(errs: dict) -> str:
    vals = {k: v for k, v in errs.items() if k != "ref"}
    worst = max(vals.values())
    return " ".join(f"{k}={v:.1e}" for k, v in vals.items()) + ("  OK" if worst < 1e-2 else "  FAIL")


def _sweep_check_inputs(decays, length: int = 1000) -> dict:
    """{label: (decay, inputs)} for the per-variant check. Vector decay: the benchmark's gates (log-decay ~ -0.03
    per token: the whole-chunk form) and strong ones (~ -0.8 per token, spread > 40 over a 64-token chunk
    and < 40 over 16 tokens: the sub-chunk form); KEY_GATE_DECAY: the keys' gate."""
    checks = {}
    if "vector" in decays:
        torch.manual_seed(0)
        q, k, v, g = _inputs(1, length, "vector", True)
        strong = F.logsigmoid(torch.randn_like(g)).detach().requires_grad_(True)
        checks.update({"typical gates": ("vector", (q, k, v, g)), "strong gates": ("vector", (q, k, v, strong))})
    if KEY_GATE_DECAY in decays:
        torch.manual_seed(0)
        checks["key gate"] = (KEY_GATE_DECAY, _inputs(1, length, KEY_GATE_DECAY, True))
    return checks


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def launch_counts(decay: str, length: int = 2048) -> tuple[int, int]:
    """(CUDA kernels launched by one forward, by one forward+backward) at B=1."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v, g = _inputs(1, length, decay, True)
    fn = _ours(decay)
    counts = []
    for backward in (False, True):
        step = _fwd_bwd(fn, (q, k, v, g)) if backward else functools.partial(fn, q, k, v, g)
        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        counts.append(sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA"))
    return counts[0], counts[1]


def kernel_breakdown(decay: str, b: int, t: int, backward: bool = True) -> list[str]:
    """GPU time per kernel of one call (profiler), and the call's wall time: what launches cost."""
    q, k, v, g = _inputs(b, t, decay, True)
    fn = _ours(decay)
    step = _fwd_bwd(fn, (q, k, v, g)) if backward else functools.partial(fn, q, k, v, g)
    return runner.kernel_breakdown(f"{decay} B={b} L={t} {'fwd+bwd' if backward else 'fwd'}", step)


def diagnose_dv() -> list[str]:
    """The fp16 scalar-decay dv error (K=100, V=32): which part, which dtype, which dv-kernel tiles."""
    from rewrite.kernels.linear_attention import triton_backward as tb
    from rewrite.kernels.linear_attention.naive import naive_linear_attention

    lines = []
    tiles = {"64,64,4": (64, 64, 4), "32,64,4": (32, 64, 4), "128,64,4": (128, 64, 4), "64,64,8": (64, 64, 8)}
    base = dict(tb.DV_TILES)
    for dtype in (torch.float16, torch.bfloat16):
        for dk, dv in ((100, 32), (128, 32), (100, 64)):
            for tile_name, tile in tiles.items():
                if (dk, dv) != (100, 32) and tile_name != "64,64,4":
                    continue
                tb.DV_TILES = {**base, 1: tile}
                for part in ("intra", "state"):
                    torch.manual_seed(0)
                    q = torch.randn(2, 40, 4, dk, device="cuda").to(dtype)
                    k = torch.randn(2, 40, 2, dk, device="cuda").to(dtype)
                    v = torch.randn(2, 40, 2, dv, device="cuda").to(dtype)
                    g = -torch.rand(2, 40, 2, device="cuda")
                    h0 = torch.randn(2, 2, dk, dv, device="cuda")
                    do = torch.randn(2, 40, 4, dv, device="cuda").to(dtype)
                    dht = torch.randn(2, 2, dk, dv, device="cuda")
                    if part == "intra":
                        dht.zero_()
                    else:
                        do.zero_()
                    dv_ = tb.chunk_backward(do, dht, q, k, v, g, "scalar", 0.3, h0, None)[2]
                    leaves = [x.detach().double().cpu().requires_grad_() for x in (q, k, v)]
                    o, final = naive_linear_attention(
                        *leaves, g.double().cpu(), decay="scalar", scale=0.3, initial_state=h0.double().cpu()
                    )
                    ((o * do.double().cpu()).sum() + (final * dht.double().cpu()).sum()).backward()
                    ref = leaves[2].grad
                    err = ((dv_.double().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
                    lines.append(
                        f"diag dv {str(dtype)[6:]:8s} K={dk} V={dv} {part:5s} tiles {tile_name:9s} err {err:.2e}"
                    )
                    print(lines[-1], flush=True)
    tb.DV_TILES = base
    return lines


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write)."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    row = measure("copy", lambda: y.copy_(x), warmup=3, runs=20)
    return 2 * x.numel() / (row.median_ms * 1e-3)


# variants for --sweep: (module attribute, value) pairs applied in turn (a dict value updates the
# module's dict). "base" is the default (v5 "whole" in-chunk products, 8-warp dq/dk tiles for the vector
# decay); the "v4 ..." variants select the v4 in-chunk products (triton_gated.SUB_PRODUCTS), so old and
# new are timed in one run.
_V5 = ("triton_gated", "SUB_PRODUCTS", {"forward": "whole", "backward": "whole"})
_DV_ANY_K = ("triton_backward", "DV_HOISTED_MAX_K", 128)  # the hoisted dv for every K its tile takes
_OUTPUT_ANY_K = ("triton_forward", "OUTPUT_HOISTED_MAX_K", 128)  # the hoisted output for every K up to 128
SWEEP = {
    "base": [],
    "v4 in-chunk (masked)": [("triton_gated", "SUB_PRODUCTS", {"forward": "masked", "backward": "masked"})],
    "v5 whole": [_V5],
    "v5 batched only": [("triton_gated", "SUB_PRODUCTS", {"forward": "batched", "backward": "batched"})],
    "v5 fwd v4 bwd": [("triton_gated", "SUB_PRODUCTS", {"forward": "whole", "backward": "masked"})],
    "v5 out 32x128 w8": [_V5, ("triton_forward", "OUTPUT_TILES", {2: (32, 128, 8)})],
    "v5 out 16x64 w4": [_V5, ("triton_forward", "OUTPUT_TILES", {2: (16, 64, 4)})],
    "v5 out 64x64 w8": [_V5, ("triton_forward", "OUTPUT_TILES", {2: (64, 64, 8)})],
    "v4 out 32x128 w8": [("triton_forward", "OUTPUT_TILES", {2: (32, 128, 8)})],
    "v5 dqk w8": [_V5, ("triton_backward", "DQK_TILES", {2: (32, 64, 8)})],
    "v5 dv w8": [_V5, ("triton_backward", "DV_TILES", {2: (32, 64, 8)})],
    "v3 states (no scan)": [("triton_forward", "SCAN_MODES", ())],
    # the scalar decay's states by chunk terms + the grouped scan too (v4 found the one-chunk-ahead scan slower
    # for scalar: 0.82 vs 0.76 ms at 8K; the grouped scan is ~1.5x faster at the model shape)
    "scan scalar too": [("triton_forward", "SCAN_MODES", (1, 2))],
    # the vector decay's in-chunk dq / dk products as three TF32 products in strong-gate chunks (dg's error there)
    "strong gates tf32x3": [("triton_backward", "STRONG_GATE_PRECISION", "tf32x3")],
    # launch shapes for small head dims (D=64, the Llama-shaped model's 32 q / 8 kv heads: --sweep-shape 32,8,64)
    "out 64x64 w4": [("triton_forward", "OUTPUT_TILES", {2: (64, 64, 4)})],
    "out 64x32 w4": [("triton_forward", "OUTPUT_TILES", {2: (64, 32, 4)})],
    "dqk 64x64 w8": [("triton_backward", "DQK_TILES", {2: (64, 64, 8)})],
    "dqk 32x64 w8 at K <= 64 (v5)": [("triton_backward", "DQK_SMALL_K", 0)],
    "dqk 64x32 w4": [("triton_backward", "DQK_TILES", {2: (64, 32, 4)})],
    "scan 32x16": [("triton_forward", "SCAN_TILES", (32, 16))],
    "scan 16x16": [("triton_forward", "SCAN_TILES", (16, 16))],
    # v7 (not yet run on a GPU): scans loading 2 / 4 chunks' terms a group ahead (fwd states, bwd states and
    # state gradients); the vector decay's output kernel per kv head (K in one tile; GQA only); both
    "scan g2": [("triton_forward", "SCAN_GROUP", 2)],
    "scan g4": [("triton_forward", "SCAN_GROUP", 4)],
    "scan g4 32x16": [("triton_forward", "SCAN_GROUP", 4), ("triton_forward", "SCAN_TILES", (32, 16))],
    "scan g4, 32x16 under 128 programs (default)": [],
    "scan g4 64x32": [("triton_forward", "SCAN_GROUP", 4), ("triton_forward", "SCAN_MIN_PROGRAMS", 0)],
    "v5 scan (g1 64x32)": [("triton_forward", "SCAN_GROUP", 1), ("triton_forward", "SCAN_MIN_PROGRAMS", 0)],
    # v8 (not yet run on a GPU): the dg reverse cumsum as chunk sums, a scan over them, then chunks in parallel
    "cumsum parallel": [("triton_backward", "CUMSUM_PARALLEL", True)],
    "cumsum parallel 128 cols": [("triton_backward", "CUMSUM_PARALLEL", True),
                                 ("triton_backward", "CUMSUM_PARALLEL_COLS", 128)],
    # v9 (not yet run on a GPU): the forward keeps its chunk states h for the backward, which then skips their
    # recompute; its lines add the memory held from the forward to the backward (h and the final state)
    "save states": [("op", "SAVE_STATES", True)],
    "cumsum parallel + save states": [("triton_backward", "CUMSUM_PARALLEL", True), ("op", "SAVE_STATES", True)],
    "cumsum parallel + save states + strong tf32x3": [("triton_backward", "CUMSUM_PARALLEL", True),
                                                       ("op", "SAVE_STATES", True),
                                                       ("triton_backward", "STRONG_GATE_PRECISION", "tf32x3")],
    # the three switches of v8 / v9 / the strong-gate precision are on by default since 2026-12-06 (fourth session);
    # these variants turn them off again
    "sequential cumsum": [("triton_backward", "CUMSUM_PARALLEL", False)],
    "recompute states": [("op", "SAVE_STATES", False)],
    "strong gates tf32": [("triton_backward", "STRONG_GATE_PRECISION", None)],
    "before v8 / v9 / tf32x3": [("triton_backward", "CUMSUM_PARALLEL", False), ("op", "SAVE_STATES", False),
                                ("triton_backward", "STRONG_GATE_PRECISION", None)],
    # v10 (not yet run on a GPU): the vector decay's dq / dk by `_chunk_dqk_hoisted_kernel` (decay factors once per
    # program for all q heads of a kv head, no exp in the head loop, no strong-gate code) plus `_chunk_dqk_kernel`
    # on the tiles it flags; 64x64 tiles 8 warps (sm_90: 255 regs + 216 B stack vs 1096), 32x64 (233, no stack),
    # and v / the state loaded per q head instead of once per program
    "dqk hoisted": [("triton_backward", "DQK_HOISTED", True)],
    "dqk per tile": [("triton_backward", "DQK_HOISTED", False)],  # the path before v10
    "dqk hoisted 32x64": [("triton_backward", "DQK_HOISTED", True),
                          ("triton_backward", "DQK_HOISTED_TILES", (32, 64, 8))],
    "dqk hoisted v per head": [("triton_backward", "DQK_HOISTED", True),
                               ("triton_backward", "DQK_HOISTED_ONE_V", False)],
    # 2 CTAs per SM by a 128-register cap (sm_90 compile: 432 B of spill at 32x64)
    "dqk hoisted 32x64 maxnreg 128": [("triton_backward", "DQK_HOISTED", True),
                                      ("triton_backward", "DQK_HOISTED_TILES", (32, 64, 8)),
                                      ("triton_backward", "DQK_HOISTED_MAXNREG", 128)],
    # v12: the vector decay's dv by `_chunk_dv_hoisted_kernel` (g's cumsum, the whole-chunk test, the decay
    # factors and the scaled keys once per program for all q heads of a kv head; K in one tile) plus
    # `_chunk_dv_kernel` on the programs it flags; on by default for K <= 64 (DV_HOISTED_MAX_K), these variants take
    # it to every K of the tile (128); "bv128": V in one tile up to 128 (the default shape's V = 128); "w4": 4 warps
    # (sm_90 at K = 64: 238 registers, no spill; check test_cuda_dv_hoisted first: the dv kernel was miscompiled at
    # BK 64 / 4 warps before)
    "dv hoisted": [_DV_ANY_K],
    "dv per tile": [("triton_backward", "DV_HOISTED", False)],  # the path before v12
    "dv hoisted w4": [_DV_ANY_K, ("triton_backward", "DV_HOISTED_TILES", (128, 64, 4))],
    "dv hoisted bv128": [_DV_ANY_K, ("triton_backward", "DV_HOISTED_TILES", (128, 128, 8))],
    # v11: the vector decay's forward outputs by `_chunk_output_hoisted_kernel` (one program per chunk, V tile and
    # kv head, K in one tile: g's cumsum, the decay factors, the keys, v and the state tile once for the kv head's
    # q heads; no exp in the head loop) plus `_chunk_output_kernel` on the chunks it flags; on by default for
    # K <= 64 (OUTPUT_HOISTED_MAX_K), these variants take it to K <= 128
    "output hoisted": [_OUTPUT_ANY_K],
    "output per head": [("triton_forward", "OUTPUT_HOISTED", False)],  # the path before v11
    "dv + output hoisted": [_DV_ANY_K, _OUTPUT_ANY_K],
    "before v11 / v12": [("triton_backward", "DV_HOISTED", False), ("triton_forward", "OUTPUT_HOISTED", False)],
    # BV 32: twice the programs (8192 at the model shape), the kv-head work redone per V tile; sm_90 compile 188
    # registers, no spill (BV 64: 204, no spill; either at 4 warps spills: 80 / 216 B)
    "output hoisted bv32": [_OUTPUT_ANY_K, ("triton_forward", "OUTPUT_HOISTED_TILES", (32, 8))],
    # the vector key gate (`linear_attention(..., key_gate_normalizer=N)`, --decays "vector keygate") computed inside
    # the kernels from the raw keys instead of with PyTorch ops before them (the default: a float32 [B, T, Hkv, K]
    # log-decay written and read back); changes nothing for the other decays
    "key gate in kernels": [("api", "KERNEL_KEY_GATE", True)],
    # v13: the hoisted kernels' whole-chunk scores from operands rounded to bf16 (one bf16 product instead of a TF32
    # one; o and dv only). At K = 128 the dv kernel is hoisted by default, the output kernel only with _OUTPUT_ANY_K
    "scores bf16": [("triton_gated", "SCORE_OPERANDS", "input")],
    "scores bf16 + output hoisted": [("triton_gated", "SCORE_OPERANDS", "input"), _OUTPUT_ANY_K],
    # eager calls through the custom ops (`op.EAGER_DIRECT` off): the path before the direct one
    "through the ops": [("op", "EAGER_DIRECT", False)],
    # forward-only calls store their chunk states in float32 (the path before `STATES_IN_INPUT_DTYPE`; fwd rows only)
    "fwd states float32": [("triton_forward", "STATES_IN_INPUT_DTYPE", False)],
    # v14: each `_chunk_contrib_kernel` program computes the chunk terms of 2 of the scan's K tiles (K = 128 in one
    # program at the default shape: v and do loaded once per chunk, half the programs); with 16 warps
    "contrib 2 K tiles": [("triton_forward", "CONTRIB_K_TILES", 2)],
    "contrib 2 K tiles w16": [("triton_forward", "CONTRIB_K_TILES", 2), ("triton_forward", "TERM_WARPS", 16)],
    "contrib w4": [("triton_forward", "TERM_WARPS", 4)],
    # v15: the chunk-term kernel with 1 or 2 pipelining stages (two programs per multiprocessor instead of one)
    "contrib stages 1": [("triton_forward", "TERM_STAGES", 1)],
    "contrib stages 2": [("triton_forward", "TERM_STAGES", 2)],
    "contrib stages 1 + 2 K tiles w16": [("triton_forward", "TERM_STAGES", 1), ("triton_forward", "CONTRIB_K_TILES", 2),
                                         ("triton_forward", "TERM_WARPS", 16)],
}


def _held_after_forward(fn: Callable, args: tuple) -> float:
    """MB allocated by one forward (inputs requiring grad) and still held after it, beyond its output: what
    autograd keeps for the backward."""
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    out = fn(*args)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - start - out.numel() * out.element_size()
    del out
    return held / 2**20


def sweep(shapes=((1, 8192), (1, 32768)), decays=("vector", "scalar"), breakdown: bool = False,
          variants: list[str] | None = None) -> list[str]:
    """Each SWEEP variant's (or each of `variants`') fwd and fwd+bwd time (the first shape only for decays
    other than vector); with `breakdown`, also its per-kernel GPU times for vector fwd+bwd at the first shape."""
    unknown = sorted(set(variants or ()) - set(SWEEP))
    if unknown:
        raise SystemExit(f"unknown sweep variants {unknown}; choose from {list(SWEEP)}")
    lines = []
    checks = _sweep_check_inputs(decays)
    references = {}
    for name, changes in SWEEP.items():
        if variants and name not in variants:
            continue
        undo = []
        try:
            undo = apply_changes("rewrite.kernels.linear_attention", changes)
            for label, (decay, inputs) in checks.items():  # every variant's vector results vs float64
                errs = _errors_vs_fp64(inputs, decay, references.get(label))
                references[label] = errs["ref"]
                lines.append(f"sweep {name:20s} check {decay} {label} L=1000: {_format_errors(errs)}")
                print(lines[-1], flush=True)
            for decay in decays:
                for b, t in shapes if decay in ("vector", KEY_GATE_DECAY) else shapes[:1]:
                    q, k, v, g = _inputs(b, t, decay, True)
                    fn = _ours(decay)
                    with torch.no_grad():
                        fwd = measure(name, functools.partial(fn, q, k, v, g), warmup=3, runs=10)
                    both = measure(name, _fwd_bwd(fn, (q, k, v, g)), warmup=2, runs=10)
                    held = f" held after fwd {_held_after_forward(fn, (q, k, v, g)):8.1f} MB"
                    lines.append(
                        f"sweep {name:20s} {decay:7s} B={b} L={t:6d} fwd {fwd.median_ms:7.3f} "
                        f"fwd+bwd {both.median_ms:7.3f} ms{held}"
                    )
                    print(lines[-1], flush=True)
            if breakdown and "vector" in decays:
                for line in kernel_breakdown("vector", *shapes[0]):
                    lines.append(f"sweep {name:20s} {line}")
                    print(lines[-1], flush=True)
        except Exception as exc:
            lines.append(f"sweep {name}: {type(exc).__name__}: {str(exc)[:300]}")
            print(lines[-1], flush=True)
        finally:
            restore(undo)
        torch.cuda.empty_cache()
    return lines


def _graphed(step: Callable[[], None]) -> Callable[[], None]:
    """`step` captured once in a CUDA graph (its inputs and output gradient fixed): a replay launches its kernels
    with no host work, so its time is the kernels' plus their gaps on the GPU."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def host_split(decay: str, b: int, t: int, runs: int = 30, fla: Callable | None = None) -> list[str]:
    """Where one eager fwd+bwd call's time goes: its event-timed wall time, the host's time to enqueue it
    (perf_counter around the call, the GPU idle at its start), and the same call replayed from a CUDA graph
    (kernels only), for ours (eager calls direct, `op.EAGER_DIRECT`), ours through the custom ops and FLA; the
    forward's eager time too; then the host functions that take the most of ours' enqueue time (cProfile, 20
    calls)."""
    import cProfile
    import io
    import pstats

    lines = []
    ours = _ours(decay)
    for name, fn, changes in (("ours direct", ours, [("op", "EAGER_DIRECT", True)]),
                              ("ours through the ops", ours, [("op", "EAGER_DIRECT", False)]),
                              ("fla", fla, [])):
        if fn is None:
            continue
        undo = apply_changes("rewrite.kernels.linear_attention", changes)
        q, k, v, g = _inputs(b, t, decay, True)
        step = _fwd_bwd(fn, (q, k, v, g))
        with torch.no_grad():
            fwd = measure(name, functools.partial(fn, q, k, v, g), warmup=3, runs=runs)
        eager = measure(name, step, warmup=3, runs=runs)
        enqueue = []
        for _ in range(runs):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            enqueue.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        try:
            replay = f"{measure(name, _graphed(step), warmup=3, runs=runs).median_ms:.3f} ms"
        except Exception as exc:  # report, do not hide
            replay = f"not captured ({type(exc).__name__}: {str(exc)[:200]})"
        lines.append(f"host split {name} {decay} B={b} L={t}: fwd {fwd.median_ms:.3f} ms; fwd+bwd eager "
                     f"{eager.median_ms:.3f} ms, host enqueue {sorted(enqueue)[len(enqueue) // 2]:.3f} ms, graph replay "
                     f"{replay}")
        print(lines[-1], flush=True)
        if name == "ours direct":
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(20):
                step()
            profiler.disable()
            torch.cuda.synchronize()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
            profile = [f"host profile (20 calls) {line}" for line in text.getvalue().splitlines() if line.strip()]
            lines += profile
            print("\n".join(profile), flush=True)
        restore(undo)
        torch.cuda.empty_cache()
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,8192,32768,131072")
    parser.add_argument("--decays", default="none,scalar,vector")
    parser.add_argument("--out", default="runs/linear_attention.json")
    parser.add_argument("--no-fla", action="store_true")
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--no-table", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="time the variants in SWEEP (old vs new, launch shapes)")
    parser.add_argument("--sweep-lengths", default="8192,32768", help="B=1 lengths the sweep times")
    parser.add_argument("--sweep-breakdown", action="store_true", help="per-kernel GPU times of each variant")
    parser.add_argument("--sweep-only", action="store_true", help="only the sweep (no first call, check or table)")
    parser.add_argument("--sweep-variants", help="comma-separated SWEEP names to time (default: all)")
    parser.add_argument("--sweep-shape", help="H,HKV,D of the sweep's calls (default 16,16,128; the Llama-shaped "
                        "model of the mixer benchmark is 32,8,64)")
    parser.add_argument("--diagnose", action="store_true", help="dv diagnosis and per-kernel breakdowns only")
    parser.add_argument("--host-split", action="store_true",
                        help="only: eager vs host enqueue vs CUDA-graph time of fwd+bwd at --lengths (B=1), with FLA "
                             "unless --no-fla, and a host profile of ours")
    parser.add_argument("--first-call-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.first_call_child:
        decay, length = args.first_call_child.split(":")
        first_call_child(decay, int(length))
        return
    decays = args.decays.split(",")
    sweep_shapes = tuple((1, int(x)) for x in args.sweep_lengths.split(","))
    swept = tuple(d for d in decays if d != "none")  # no variant changes the no-decay kernels
    variants = args.sweep_variants.split(",") if args.sweep_variants else None
    if args.sweep_shape:
        if not args.sweep_only:
            raise SystemExit("--sweep-shape changes the shape of the sweep only: pass --sweep-only with it")
        global H, KV_H, D
        H, KV_H, D = (int(x) for x in args.sweep_shape.split(","))
    if args.host_split:
        fla_fn = None if args.no_fla else _fla_gla()
        for length in args.lengths.split(","):
            for decay in decays:
                host_split(decay, 1, int(length), fla=fla_fn if decay == "vector" else None)
        return
    run_sweep = functools.partial(sweep, sweep_shapes, swept, args.sweep_breakdown, variants)
    if args.sweep_only:
        print("\n".join(run_sweep()))
        return
    if args.diagnose:
        diag = diagnose_dv()
        for decay, b, t, bwd in (
            ("none", 1, 2048, False),
            ("scalar", 1, 8192, True),
            ("vector", 1, 8192, True),
        ):
            print("\n".join(kernel_breakdown(decay, b, t, bwd)), flush=True)
        sweep_lines = run_sweep() if args.sweep else []
        print("\n".join(diag + sweep_lines))
        return
    first_call = {d: first_call_seconds(d) for d in decays}  # before anything compiles here
    print("first call s (fresh process, empty Triton cache, B=1 L=4096 fwd+bwd): " + str(first_call))
    if not args.no_check:
        for line in check_against_fp64():
            print(line, flush=True)
    for decay in decays:
        fwd_n, both_n = launch_counts(decay)
        print(f"launches {decay:8s} fwd {fwd_n}  fwd+bwd {both_n}", flush=True)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    sweep_lines = run_sweep() if args.sweep else []
    if args.no_table:
        return
    fla = {}
    fla_fn = None if args.no_fla else _fla_gla()
    if fla_fn is not None:
        fla["fla chunk_gla (vector)"] = ("vector", fla_fn)
    shapes = [(1, int(x)) for x in args.lengths.split(",")] + [(4, 8192)]
    rows: list[Measurement] = []
    for b, t in shapes:
        runs = 20 if t <= 32768 else 5
        variants: dict[str, tuple[str, Callable]] = {
            "sdpa flash causal": ("none", None),
            **{f"ours {d}": (d, _ours(d)) for d in decays},
            **fla,
        }
        for name, (decay, fn) in variants.items():
            try:
                q, k, v, g = _inputs(b, t, decay, True)
                if fn is None:
                    qh, kh, vh = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
                    call = functools.partial(F.scaled_dot_product_attention, is_causal=True)
                    call_args = (qh, kh, vh)
                else:
                    call, call_args = fn, (q, k, v, g)
                params = {"B": b, "L": t}
                with torch.no_grad():
                    fwd = measure(
                        name,
                        functools.partial(call, *call_args),
                        {**params, "pass": "fwd"},
                        warmup=3,
                        runs=runs,
                    )
                floor_ms = 4 * b * t * H * D * 2 / bw * 1e3
                fwd.extra["x memory floor"] = f"{fwd.median_ms / floor_ms:.1f}"
                step = _fwd_bwd(call, call_args)
                both = measure(name, step, {**params, "pass": "fwd+bwd"}, warmup=2, runs=runs)
                rows += [fwd, both]
                print(
                    f"{name:32s} B={b} L={t:6d} fwd {fwd.median_ms:8.3f} ms  fwd+bwd {both.median_ms:8.3f} ms",
                    flush=True,
                )
            except Exception as exc:
                print(f"{name} B={b} L={t}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            torch.cuda.empty_cache()
    env = environment()
    env["copy TB/s"] = f"{bw / 1e12:.2f}"
    env["first call s (fresh process)"] = ", ".join(f"{k} {v:.1f}" for k, v in first_call.items())
    print(write_results(args.out, "Linear attention vs SDPA and FLA (bf16, H=16, D=128)", rows, env))
    for line in sweep_lines:
        print(line)


if __name__ == "__main__":
    main()
