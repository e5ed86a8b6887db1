"""Gated delta rule, sliding-window attention and short conv next to SDPA (flash) in one run.

bf16, B=1, H=16, D=128 at L in {2K, 8K, 32K, 128K}: gated delta rule fwd+bwd; sliding-window
attention (w = 512, 4096) fwd and fwd+bwd; short causal conv (hidden 4096, width 4) against its
memory floor. Checks each kernel on the GPU against a float64 run first.
Run: python -m benchmarks.delta_conv_swa [--lengths ...] [--only delta,swa,conv,flex,triton] [--sweep] [--conv-sweep]
     [--delta-variants [NAMES]] [--delta-breakdown] [--out runs/delta_conv_swa.json]
--sweep also times the sliding-window kernels at L = 32K under several block configurations
(forward: BLOCK_M, BLOCK_N, warps, stages; backward: the dq and dk/dv kernels' blocks);
--conv-sweep times the short-conv forward launcher under several tiles at L = 32K.
--only ...,flex adds "flex sliding window" rows next to ours: the same attention through compiled FlexAttention
(`rewrite.kernels.sliding_window.flex`), checked against our op on the GPU first; its rows time the steady
state and give the first call's seconds (compilation, block mask) as "first call s". Not in the default
--only: each length and window compiles its own kernels.
--only swa,triton adds rows of each CUDA path of the op (`KERNEL_PATHS`: its Triton kernels, PyTorch's flash
kernels, or the Triton forward with the flash backward; `rewrite.kernels.sliding_window.op.FLASH_FORWARD`,
`FLASH_BACKWARD`); the plain rows take the op's defaults.
--delta-variants checks each DELTA_VARIANTS entry (old and new delta-rule backward forms, launch
shapes) against float64 and times its fwd and fwd+bwd at --delta-lengths, after SDPA's fwd+bwd at each
of those lengths in the same run; with --delta-breakdown, also
the per-kernel GPU times of one fwd+bwd at the first of those lengths.
Short conv is timed twice: eager calls synchronised one by one (host time included, as in a
decode loop) and back to back (`triton.testing.do_bench`, host time hidden as in a model's stream).
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
import torch.nn.functional as F

from benchmarks.linear_attention import copy_bandwidth
from benchmarks.runner import Measurement, environment, kernel_breakdown, measure, write_results
from benchmarks.variants import apply_changes, restore
from rewrite.kernels import delta_rule, short_conv, sliding_window_attention
from rewrite.kernels.sliding_window import op as sliding_window_ops
from rewrite.kernels.sliding_window.flex import flex_sliding_window_attention

H, D = 16, 128


def _qkv(t: int, b: int = 1):
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(b, t, H, D, device=dev, dtype=dt)
    k = F.normalize(torch.randn(b, t, H, D, device=dev), dim=-1).to(dt)
    v = torch.randn(b, t, H, D, device=dev, dtype=dt)
    return q, k, v


def _rel(a, ref) -> float:
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def delta_check(label: str = "gated_delta_rule", t: int = 1000) -> str:
    """Gated delta rule output and gradients (bf16, on the GPU) against float64 on the CPU."""
    torch.manual_seed(0)
    q, k, v = (x.requires_grad_() for x in _qkv(t))
    beta = torch.rand(1, t, H, device="cuda").requires_grad_()
    g = F.logsigmoid(torch.randn(1, t, H, device="cuda") + 4).requires_grad_()
    o = delta_rule(q, k, v, beta, g)[0]
    do = torch.randn_like(o)
    o.backward(do)
    refs = [x.detach().double().cpu().requires_grad_() for x in (q, k, v, beta, g)]
    ro = delta_rule(*refs)[0]
    ro.backward(do.double().cpu())
    errs = {"o": _rel(o, ro), **{f"d{n}": _rel(a.grad, r.grad) for n, a, r in zip(("q", "k", "v", "beta", "g"), (q, k, v, beta, g), refs)}}
    return f"check {label} " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()) + ("  OK" if max(errs.values()) < 1e-2 else "  FAIL")


def flex_check(t: int = 3000, window: int = 512, sinks: int = 4) -> str:
    """FlexAttention sliding window (bf16) against our op (bf16), both on the GPU: output and gradients."""
    torch.manual_seed(0)
    q, k, v = (x.requires_grad_() for x in _qkv(t))
    o = sliding_window_attention(q, k, v, window, sinks=sinks)
    do = torch.randn_like(o)
    ours = [o, *torch.autograd.grad(o, (q, k, v), do)]
    try:
        f = flex_sliding_window_attention(q, k, v, window, sinks=sinks)
        theirs = [f, *torch.autograd.grad(f, (q, k, v), do)]
    except Exception as exc:  # noqa: BLE001 - the timed rows record the failure too
        return f"check flex vs ours     failed: {type(exc).__name__}: {str(exc)[:200]}"
    errs = {n: _rel(a, b) for n, a, b in zip(("o", "dq", "dk", "dv"), theirs, ours)}
    return "check flex vs ours     " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()) + (
        "  OK" if max(errs.values()) < 1e-2 else "  FAIL")


KERNEL_PATHS = {"Triton": (False, False), "flash": (True, True), "Triton fwd, flash bwd": (False, True)}
"""The sliding-window op's CUDA paths --only ...,triton times: (forward by flash, backward by flash)."""


def sliding_window_kernels(forward: bool, backward: bool, packed: bool | None = None) -> tuple[bool, bool, bool]:
    """Set whether the sliding-window op's forward / backward run PyTorch's flash kernels (the backward on packed
    calls too when `packed`, by default as `backward`); returns the settings before."""
    ops = sliding_window_ops
    before = ops.FLASH_FORWARD, ops.FLASH_BACKWARD, ops.FLASH_BACKWARD_PACKED
    ops.FLASH_FORWARD, ops.FLASH_BACKWARD = forward, backward
    ops.FLASH_BACKWARD_PACKED = backward if packed is None else packed
    return before


def sliding_window_check(label: str, sinks: int, kv_heads: int = H, cu_seqlens: list[int] | None = None,
                         lookahead: int = 0, flash: tuple[bool, bool] = (False, False)) -> str:
    """Sliding-window attention (bf16, on the GPU, w = 512) against float64 on the CPU: output and gradients;
    `flash`: (forward, backward) by PyTorch's flash kernels (else the op's Triton kernels)."""
    before = sliding_window_kernels(*flash)
    try:
        return _sliding_window_errors(label, sinks, kv_heads, cu_seqlens, lookahead)
    finally:
        sliding_window_kernels(*before)


def _sliding_window_errors(label, sinks, kv_heads, cu_seqlens, lookahead) -> str:
    torch.manual_seed(0)
    q, k, v = _qkv(3000)
    k, v = k[:, :, :kv_heads].contiguous(), v[:, :, :kv_heads].contiguous()
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int32, device="cuda")
    o = sliding_window_attention(q, k, v, 512, sinks=sinks, cu_seqlens=cu, lookahead=lookahead)
    do = torch.randn_like(o)
    o.backward(do)
    refs = [x.detach().double().cpu().requires_grad_() for x in (q, k, v)]
    ro = sliding_window_attention(*refs, 512, sinks=sinks, cu_seqlens=None if cu is None else cu.cpu(),
                                  lookahead=lookahead)
    ro.backward(do.double().cpu())
    errs = {"o": _rel(o, ro), **{f"d{n}": _rel(a.grad, r.grad) for n, a, r in zip("qkv", (q, k, v), refs)}}
    return f"check {label:40s}" + " ".join(f"{n}={e:.1e}" for n, e in errs.items()) + (
        "  OK" if max(errs.values()) < 1e-2 else "  FAIL")


def checks() -> list[str]:
    lines = [delta_check()]
    lines.append(sliding_window_check("swa sinks (Triton)", sinks=4))
    for kernels, flash in KERNEL_PATHS.items():
        lines.append(sliding_window_check(f"swa ({kernels})", sinks=0, flash=flash))
        lines.append(sliding_window_check(f"swa GQA packed ({kernels})", sinks=0, kv_heads=4,
                                          cu_seqlens=[0, 7, 1100, 1101, 3000], flash=flash))
        lines.append(sliding_window_check(f"swa lookahead ({kernels})", sinks=0, lookahead=100, flash=flash))
    # short conv
    x = torch.randn(1, 3000, 512, device="cuda", dtype=torch.bfloat16).requires_grad_()
    w = torch.randn(512, 4, device="cuda", dtype=torch.bfloat16).requires_grad_()
    bias = torch.randn(512, device="cuda", dtype=torch.bfloat16).requires_grad_()
    y = short_conv(x, w, bias, activation="silu")[0]
    dy = torch.randn_like(y)
    y.backward(dy)
    refs = [t.detach().double().cpu().requires_grad_() for t in (x, w, bias)]
    ry = short_conv(*refs, activation="silu")[0]
    ry.backward(dy.double().cpu())
    errs = {"y": _rel(y, ry), **{f"d{n}": _rel(a.grad, r.grad) for n, a, r in zip(("x", "w", "b"), (x, w, bias), refs)}}
    lines.append("check short_conv       " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()) + ("  OK" if max(errs.values()) < 1e-2 else "  FAIL"))
    return lines


# variants for --delta-variants: (module in rewrite.kernels.delta_rule, attribute, value) changes applied in
# turn and undone after; the default is "v3 + light dstates", "v3" and "v2" the previous ones, so old and new are
# timed in one run. Every entry names its backward form, state-gradient pass and whether the forward keeps its
# buffers for the backward (op.SAVE_FOR_BACKWARD), so a later change of the defaults does not change what it times.
_RECOMPUTE = ("op", "SAVE_FOR_BACKWARD", False)
_SAVED = ("op", "SAVE_FOR_BACKWARD", True)
_V3 = ("triton_backward", "BACKWARD_VERSION", "v3")
_LIGHT_DSTATES = ("triton_backward", "DSTATE_PASS", "light")
DELTA_VARIANTS = {
    "v2": [("triton_backward", "BACKWARD_VERSION", "v2"), ("triton_backward", "DSTATE_PASS", "v2"), _RECOMPUTE],
    "v3": [_V3, ("triton_backward", "DSTATE_PASS", "v2"), _RECOMPUTE],
    "v3 term in scan": [_V3, ("triton_backward", "STATE_TERM_OUTSIDE", False),
                        ("triton_backward", "DSTATE_PASS", "v2"), _RECOMPUTE],
    "v3 dwy BV32": [_V3, ("triton_backward", "DWY_DIRECT_TILES", (32, 8, 2)), _RECOMPUTE],
    "v3 dwy 1 stage": [_V3, ("triton_backward", "DWY_DIRECT_TILES", (16, 8, 1)), _RECOMPUTE],
    "v3 dwy w4": [_V3, ("triton_backward", "DWY_DIRECT_TILES", (16, 4, 2)), _RECOMPUTE],
    # v4: the sequential passes as per-chunk transitions (formed in parallel) plus a one-product scan
    "v3 + light steps": [_V3, ("triton_forward", "STATE_PASS", "light"), _LIGHT_DSTATES, _RECOMPUTE],
    "v3 + light fwd states": [_V3, ("triton_forward", "STATE_PASS", "light"), _RECOMPUTE],
    "v3 + light dstates": [_V3, _LIGHT_DSTATES, _RECOMPUTE],  # the default
    "v3 + light steps w4": [_V3, ("triton_forward", "STATE_PASS", "light"), _LIGHT_DSTATES,
                            ("triton_forward", "LIGHT_SCAN", (4, 2)), _RECOMPUTE],
    "v3 + light steps 3 stages": [_V3, ("triton_forward", "STATE_PASS", "light"), _LIGHT_DSTATES,
                                  ("triton_forward", "LIGHT_SCAN", (8, 3)), _RECOMPUTE],
    # v5: the forward keeps W, U, b, h, T for the backward (no recompute there); fwd (no grad) keeps nothing
    "saved fwd": [_V3, _LIGHT_DSTATES, _SAVED],  # the default with kept buffers
    "saved fwd + v3 dstates": [_V3, ("triton_backward", "DSTATE_PASS", "v2"), _SAVED],
    "saved fwd + light steps": [_V3, ("triton_forward", "STATE_PASS", "light"), _LIGHT_DSTATES, _SAVED],
}


def _delta_inputs(t: int):
    q, k, v = (x.requires_grad_() for x in _qkv(t))
    beta = torch.rand(1, t, H, device="cuda", dtype=torch.bfloat16).requires_grad_()
    g = F.logsigmoid(torch.randn(1, t, H, device="cuda") + 4).requires_grad_()
    return q, k, v, beta, g


def _delta(*a):
    return delta_rule(*a)[0]


def _delta_memory(args) -> tuple[float, float]:
    """(MB held from the forward to the backward beyond o, MB peak over one fwd+bwd above the start), one layer."""
    for a in args:
        a.grad = None
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = _delta(*args)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - start - out.numel() * out.element_size()
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - start
    del out
    for a in args:
        a.grad = None
    return held / 2**20, peak / 2**20


def delta_breakdown(t: int) -> list[str]:
    """GPU time per kernel of one delta-rule fwd+bwd (profiler), and the profiled call's wall time."""
    return kernel_breakdown(f"L={t} fwd+bwd", _fwd_bwd(_delta, _delta_inputs(t)))


def delta_variants(lengths: list[int], names: list[str] | None, breakdown: bool) -> list[Measurement]:
    """Each DELTA_VARIANTS entry (or each of `names`): check against float64, then fwd and fwd+bwd times."""
    unknown = sorted(set(names or ()) - set(DELTA_VARIANTS))
    if unknown:
        raise SystemExit(f"unknown delta variants {unknown}; choose from {list(DELTA_VARIANTS)}")
    rows = []
    sdpa = functools.partial(F.scaled_dot_product_attention, is_causal=True)
    for t in lengths:  # the anchor, in the same run
        qh, kh, vh = (x.transpose(1, 2).contiguous().requires_grad_() for x in _qkv(t))
        both = measure("sdpa flash causal", _fwd_bwd(sdpa, (qh, kh, vh)), {"L": t, "pass": "fwd+bwd"}, warmup=2,
                       runs=20 if t <= 32768 else 5)
        rows.append(both)
        print(f"delta variant {'(sdpa)':14s} L={t:6d} fwd+bwd {both.median_ms:8.3f}", flush=True)
        del qh, kh, vh
        torch.cuda.empty_cache()
    for name, changes in DELTA_VARIANTS.items():
        if names and name not in names:
            continue
        undo = []
        try:
            undo = apply_changes("rewrite.kernels.delta_rule", changes)
            print(delta_check(f"delta variant {name!r}"), flush=True)
            for t in lengths:
                args = _delta_inputs(t)
                runs = 20 if t <= 32768 else 5
                with torch.no_grad():
                    fwd = measure(f"delta {name}", functools.partial(_delta, *args), {"L": t, "pass": "fwd"},
                                  warmup=3, runs=runs)
                both = measure(f"delta {name}", _fwd_bwd(_delta, args), {"L": t, "pass": "fwd+bwd"}, warmup=2,
                               runs=runs)
                held, peak = _delta_memory(args)
                both.extra.update(held_after_fwd_mb=held, peak_fwd_bwd_mb=peak)
                rows += [fwd, both]
                print(f"delta variant {name:14s} L={t:6d} fwd {fwd.median_ms:8.3f}  fwd+bwd {both.median_ms:8.3f}"
                      f"  held after fwd {held:8.1f} MB  peak fwd+bwd {peak:8.1f} MB", flush=True)
                del args
                torch.cuda.empty_cache()
            if breakdown:
                for line in delta_breakdown(lengths[0]):
                    print(f"delta variant {name:14s} {line}", flush=True)
        except Exception as exc:
            print(f"delta variant {name}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        finally:
            restore(undo)
        torch.cuda.empty_cache()
    return rows


def _conv(x, w, bias):
    return short_conv(x, w, bias, activation="silu")[0]


def _first_call(make_step, *args) -> tuple[float, object]:
    """(seconds of making the step make_step(*args) and running it once, the step): with torch.compile, the
    compilation."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    step = make_step(*args)
    step()
    torch.cuda.synchronize()
    return time.perf_counter() - start, step


def _failed(name: str, params: dict, exc: BaseException) -> Measurement:
    """A row for a variant that could not run, saying why (the run goes on)."""
    return Measurement(name, params, float("nan"), float("nan"), float("nan"), 0,
                       {"note": f"failed: {type(exc).__name__}: {str(exc)[:160]}"})


def _fwd_bwd(fn, args):
    out = fn(*args)
    grad = torch.randn_like(out)

    def step():
        for a in args:
            if isinstance(a, torch.Tensor):
                a.grad = None
        fn(*args).backward(grad)

    return step


FWD_CONFIGS = [(64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 2)]
BWD_CONFIGS = [  # (dq blocks, dk/dv blocks), each (BLOCK_M, BLOCK_N, warps, stages)
    ((64, 64, 4, 3), (64, 64, 4, 3)),
    ((128, 64, 8, 3), (64, 128, 8, 3)),
    ((128, 32, 8, 3), (32, 128, 8, 3)),
    ((64, 64, 4, 2), (64, 128, 8, 2)),
    ((128, 64, 8, 2), (64, 128, 4, 3)),
]


def sweep(t: int = 32768) -> list[Measurement]:
    """Sliding-window kernels under several block configurations (launchers called directly)."""
    from rewrite.kernels.sliding_window.triton_backward import sliding_window_backward
    from rewrite.kernels.sliding_window.triton_forward import sliding_window_forward

    rows = []
    q, k, v = _qkv(t)
    scale = D**-0.5
    for window in (512, 4096):
        o, lse = sliding_window_forward(q, k, v, window, 0, scale, None)
        do = torch.randn_like(o)
        for cfg in FWD_CONFIGS:
            try:
                m = measure("swa fwd kernel", functools.partial(sliding_window_forward, q, k, v, window, 0, scale, None,
                                                                *cfg), {"L": t, "w": window, "cfg": str(cfg)},
                            warmup=3, runs=20)
                rows.append(m)
                print(f"sweep fwd w={window} {cfg}: {m.median_ms:.3f} ms", flush=True)
            except Exception as exc:
                print(f"sweep fwd w={window} {cfg}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        for dq_cfg, dkdv_cfg in BWD_CONFIGS:
            try:
                fn = functools.partial(sliding_window_backward, do, q, k, v, o, lse, window, 0, scale, None,
                                       dq_cfg, dkdv_cfg)
                m = measure("swa bwd kernels", fn, {"L": t, "w": window, "cfg": f"{dq_cfg}/{dkdv_cfg}"},
                            warmup=3, runs=20)
                rows.append(m)
                print(f"sweep bwd w={window} dq {dq_cfg} dkdv {dkdv_cfg}: {m.median_ms:.3f} ms", flush=True)
            except Exception as exc:
                print(f"sweep bwd w={window} {dq_cfg}/{dkdv_cfg}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    return rows


def _conv_inputs(t: int):
    x = torch.randn(1, t, 4096, device="cuda", dtype=torch.bfloat16).requires_grad_()
    w = torch.randn(4096, 4, device="cuda", dtype=torch.bfloat16).requires_grad_()
    bias = torch.randn(4096, device="cuda", dtype=torch.bfloat16).requires_grad_()
    return x, w, bias


def _gpu_ms(fn) -> float:
    """Median GPU time of fn() when calls run back to back (do_bench: host launch cost overlapped)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def conv_rows(t: int, bw: float) -> list[Measurement]:
    """Short conv (hidden 4096, width 4, SiLU) at length t: eager calls (each synchronised, so host
    time counts) and back-to-back GPU time, each against the memory floor (x read once, y written once)."""
    x, w, bias = _conv_inputs(t)
    with torch.no_grad():
        fwd = measure("ours short_conv W=4 silu", functools.partial(_conv, x, w, bias), {"L": t, "pass": "fwd"},
                      warmup=3, runs=50)
        gpu = _gpu_ms(functools.partial(_conv, x, w, bias))
    floor_ms = 2 * x.numel() * 2 / bw * 1e3
    fwd.extra["x memory floor"] = f"{fwd.median_ms / floor_ms:.2f}"
    fwd.extra["back-to-back ms"] = f"{gpu:.3f}"
    fwd.extra["back-to-back x floor"] = f"{gpu / floor_ms:.2f}"
    step = _fwd_bwd(_conv, (x, w, bias))
    both = measure("ours short_conv W=4 silu", step, {"L": t, "pass": "fwd+bwd"}, warmup=3, runs=50)
    both_gpu = _gpu_ms(step)
    both.extra["x memory floor"] = f"{both.median_ms / (2.5 * floor_ms):.2f}"  # fwd 2 passes, bwd 3
    both.extra["back-to-back ms"] = f"{both_gpu:.3f}"
    both.extra["back-to-back x floor"] = f"{both_gpu / (2.5 * floor_ms):.2f}"
    print(f"short_conv L={t} fwd {fwd.median_ms:.3f} ({fwd.extra['x memory floor']}x floor; back-to-back {gpu:.3f} "
          f"= {fwd.extra['back-to-back x floor']}x) fwd+bwd {both.median_ms:.3f} (back-to-back {both_gpu:.3f}) "
          f"floor fwd {floor_ms:.3f}", flush=True)
    return [fwd, both]


CONV_TILES = [(64, 128, 8), (32, 256, 4), (16, 512, 4), (32, 256, 8), (64, 256, 8), (128, 128, 8), (32, 128, 4)]


def conv_sweep(bw: float, t: int = 32768) -> list[Measurement]:
    """Short-conv forward (public function, no grad) under several (rows, channels, warps) tiles:
    eager calls synchronised one by one, and back to back."""
    from rewrite.kernels.short_conv import triton_kernels as tk

    x, w, bias = (a.detach() for a in _conv_inputs(t))
    floor_ms = 2 * x.numel() * 2 / bw * 1e3
    base, rows = tk.FWD_TILES, []
    ref = _conv(x, w, bias)
    for tiles in CONV_TILES:
        tk.FWD_TILES = tiles
        try:
            fn = functools.partial(_conv, x, w, bias)
            same = bool(torch.equal(fn(), ref))
            m = measure("short_conv fwd", fn, {"L": t, "cfg": str(tiles)}, warmup=3, runs=50)
            ms = _gpu_ms(fn)
            m.extra = {"x memory floor": f"{m.median_ms / floor_ms:.2f}", "back-to-back ms": f"{ms:.3f}",
                       "back-to-back x floor": f"{ms / floor_ms:.2f}"}
            rows.append(m)
            print(f"conv sweep {tiles}: eager {m.median_ms:.3f} ms ({m.median_ms / floor_ms:.2f}x floor), "
                  f"back-to-back {ms:.3f} ({ms / floor_ms:.2f}x); same output {same}", flush=True)
        except Exception as exc:
            print(f"conv sweep {tiles}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        finally:
            tk.FWD_TILES = base
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,8192,32768,131072")
    parser.add_argument("--only", default="delta,swa,conv", help="comma list of delta, swa, conv, flex, triton")
    parser.add_argument("--sweep", action="store_true", help="also time sliding-window block configurations")
    parser.add_argument("--conv-sweep", action="store_true", help="also time short-conv forward tiles at L = 32K")
    parser.add_argument("--delta-variants", nargs="?", const="", default=None, metavar="NAMES",
                        help=f"time the delta-rule variants (comma list, default all of {list(DELTA_VARIANTS)}) and stop")
    parser.add_argument("--delta-lengths", default="8192,32768,131072", help="lengths for --delta-variants")
    parser.add_argument("--delta-breakdown", action="store_true", help="per-kernel times of each delta variant")
    parser.add_argument("--out", default="runs/delta_conv_swa.json")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    if args.delta_variants is not None:
        names = [n for n in args.delta_variants.split(",") if n] or None
        rows = delta_variants([int(x) for x in args.delta_lengths.split(",")], names, args.delta_breakdown)
        print(write_results(args.out, "Gated delta rule variants (bf16, B=1, H=16, D=128)", rows, environment()))
        return
    env = environment()
    lines = checks()
    if "flex" in only:
        # every length, window and grad mode compiles FlexAttention again: past Dynamo's recompile limit (8) it
        # would fall back to eager FlexAttention, which forms the whole score matrix
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        lines.append(flex_check())
        env["check flex vs ours"] = lines[-1].split(maxsplit=4)[-1]
    for line in lines:
        print(line, flush=True)
    bw = copy_bandwidth()
    rows: list[Measurement] = []
    if args.sweep:
        rows += sweep()
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception as exc:
        chunk_gated_delta_rule = None
        print(f"fla chunk_gated_delta_rule unavailable: {type(exc).__name__}: {exc}")
    defaults = (sliding_window_ops.FLASH_FORWARD, sliding_window_ops.FLASH_BACKWARD,
                sliding_window_ops.FLASH_BACKWARD_PACKED)
    for t in (int(x) for x in args.lengths.split(",")):
        runs = 20 if t <= 32768 else 5
        q, k, v = (x.requires_grad_() for x in _qkv(t))
        beta = torch.rand(1, t, H, device="cuda", dtype=torch.bfloat16).requires_grad_()
        g = F.logsigmoid(torch.randn(1, t, H, device="cuda") + 4).requires_grad_()
        qh, kh, vh = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        sdpa = functools.partial(F.scaled_dot_product_attention, is_causal=True)
        variants = {"sdpa flash causal": (sdpa, (qh, kh, vh))}
        paths: dict[str, tuple[bool, ...]] = {}  # the sliding-window op's kernels per variant (else its defaults)
        if "delta" in only:
            variants["ours gated delta rule"] = (lambda *a: delta_rule(*a)[0], (q, k, v, beta, g))
        if "swa" in only:
            variants["ours sliding window w=512"] = (functools.partial(sliding_window_attention, window=512), (q, k, v))
            variants["ours sliding window w=4096"] = (functools.partial(sliding_window_attention, window=4096),
                                                      (q, k, v))
        if "swa" in only and "triton" in only:
            for kernels, flash in KERNEL_PATHS.items():
                for window in (512, 4096):
                    name = f"ours sliding window ({kernels}) w={window}"
                    variants[name] = (functools.partial(sliding_window_attention, window=window), (q, k, v))
                    paths[name] = flash
        if "flex" in only:
            for window in (512, 4096):
                variants[f"flex sliding window w={window}"] = (
                    functools.partial(flex_sliding_window_attention, window=window), (q, k, v))
        if chunk_gated_delta_rule is not None and "delta" in only:
            variants["fla chunk_gated_delta_rule"] = (lambda *a: chunk_gated_delta_rule(*a)[0], (q, k, v, g, beta))
        for name, (fn, fargs) in variants.items():
            compiled = name.startswith("flex")  # first calls compile: timed apart, reported as "first call s"
            params = {"L": t, "pass": "fwd"}
            sliding_window_kernels(*paths.get(name, defaults))
            try:
                with torch.no_grad():
                    fwd_step = functools.partial(fn, *fargs)
                    if compiled:
                        first, fwd_step = _first_call(functools.partial, fn, *fargs)
                    fwd = measure(name, fwd_step, params, warmup=3, runs=runs)
                    if compiled:
                        fwd.extra["first call s"] = f"{first:.1f}"
                rows.append(fwd)
                params = {"L": t, "pass": "fwd+bwd"}
                if compiled:
                    first, both_step = _first_call(_fwd_bwd, fn, fargs)
                else:
                    both_step = _fwd_bwd(fn, fargs)
                both = measure(name, both_step, params, warmup=2, runs=runs)
                if compiled:
                    both.extra["first call s"] = f"{first:.1f}"
                rows.append(both)
                print(f"{name:30s} L={t:6d} fwd {fwd.median_ms:8.3f}  fwd+bwd {both.median_ms:8.3f}", flush=True)
            except Exception as exc:  # noqa: BLE001 - a failed variant is a row, not the end of the run
                rows.append(_failed(name, params, exc))
                print(f"{name} L={t} {params['pass']}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                torch.cuda.empty_cache()
            finally:
                sliding_window_kernels(*defaults)
        del q, k, v, qh, kh, vh, beta, g
        torch.cuda.empty_cache()
    # short conv at hidden 4096
    for t in (8192, 32768) if "conv" in only else ():
        rows += conv_rows(t, bw)
    if args.conv_sweep:
        rows += conv_sweep(bw)
    env["copy TB/s"] = f"{bw / 1e12:.2f}"
    print(write_results(args.out, "Gated delta rule, sliding window, short conv (bf16, H=16, D=128)", rows, env))


if __name__ == "__main__":
    main()
