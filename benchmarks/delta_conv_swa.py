"""Gated delta rule, sliding-window attention and short conv next to SDPA (flash) in one run.

bf16, B=1, H=16, D=128 at L in {2K, 8K, 32K, 128K}: gated delta rule fwd+bwd; sliding-window
attention (w = 512, 4096) fwd and fwd+bwd; short causal conv (hidden 4096, width 4) against its
memory floor. Checks each kernel on the GPU against a float64 run first.
Run: python -m benchmarks.delta_conv_swa [--lengths ...] [--out runs/delta_conv_swa.json]
"""

from __future__ import annotations

import argparse
import functools

import torch
import torch.nn.functional as F
from rewrite.kernels import delta_rule, short_conv, sliding_window_attention

from benchmarks.linear_attention import copy_bandwidth
from benchmarks.runner import Measurement, environment, measure, write_results

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


def checks() -> list[str]:
    lines = []
    # gated delta rule
    q, k, v = (x.requires_grad_() for x in _qkv(1000))
    beta = torch.rand(1, 1000, H, device="cuda").requires_grad_()
    g = F.logsigmoid(torch.randn(1, 1000, H, device="cuda") + 4).requires_grad_()
    o = delta_rule(q, k, v, beta, g)[0]
    do = torch.randn_like(o)
    o.backward(do)
    refs = [x.detach().double().cpu().requires_grad_() for x in (q, k, v, beta, g)]
    ro = delta_rule(*refs)[0]
    ro.backward(do.double().cpu())
    errs = {"o": _rel(o, ro), **{f"d{n}": _rel(a.grad, r.grad) for n, a, r in zip(("q", "k", "v", "beta", "g"), (q, k, v, beta, g), refs)}}
    lines.append("check gated_delta_rule " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()) + ("  OK" if max(errs.values()) < 1e-2 else "  FAIL"))
    # sliding window
    q, k, v = (x.requires_grad_() for x in _qkv(3000))
    o = sliding_window_attention(q, k, v, 512, sinks=4)
    do = torch.randn_like(o)
    o.backward(do)
    refs = [x.detach().double().cpu().requires_grad_() for x in (q, k, v)]
    ro = sliding_window_attention(*refs, 512, sinks=4)
    ro.backward(do.double().cpu())
    errs = {"o": _rel(o, ro), **{f"d{n}": _rel(a.grad, r.grad) for n, a, r in zip("qkv", (q, k, v), refs)}}
    lines.append("check sliding_window   " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()) + ("  OK" if max(errs.values()) < 1e-2 else "  FAIL"))
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


def _conv(x, w, bias):
    return short_conv(x, w, bias, activation="silu")[0]


def _fwd_bwd(fn, args):
    out = fn(*args)
    grad = torch.randn_like(out)

    def step():
        for a in args:
            if isinstance(a, torch.Tensor):
                a.grad = None
        fn(*args).backward(grad)

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,8192,32768,131072")
    parser.add_argument("--out", default="runs/delta_conv_swa.json")
    args = parser.parse_args(argv)
    for line in checks():
        print(line, flush=True)
    bw = copy_bandwidth()
    rows: list[Measurement] = []
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception as exc:
        chunk_gated_delta_rule = None
        print(f"fla chunk_gated_delta_rule unavailable: {type(exc).__name__}: {exc}")
    for t in (int(x) for x in args.lengths.split(",")):
        runs = 20 if t <= 32768 else 5
        q, k, v = (x.requires_grad_() for x in _qkv(t))
        beta = torch.rand(1, t, H, device="cuda", dtype=torch.bfloat16).requires_grad_()
        g = F.logsigmoid(torch.randn(1, t, H, device="cuda") + 4).requires_grad_()
        qh, kh, vh = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        sdpa = functools.partial(F.scaled_dot_product_attention, is_causal=True)
        variants = {
            "sdpa flash causal": (sdpa, (qh, kh, vh)),
            "ours gated delta rule": (lambda *a: delta_rule(*a)[0], (q, k, v, beta, g)),
            "ours sliding window w=512": (functools.partial(sliding_window_attention, window=512), (q, k, v)),
            "ours sliding window w=4096": (functools.partial(sliding_window_attention, window=4096), (q, k, v)),
        }
        if chunk_gated_delta_rule is not None:
            variants["fla chunk_gated_delta_rule"] = (lambda *a: chunk_gated_delta_rule(*a)[0], (q, k, v, g, beta))
        for name, (fn, fargs) in variants.items():
            try:
                with torch.no_grad():
                    fwd = measure(name, functools.partial(fn, *fargs), {"L": t, "pass": "fwd"}, warmup=3, runs=runs)
                both = measure(name, _fwd_bwd(fn, fargs), {"L": t, "pass": "fwd+bwd"}, warmup=2, runs=runs)
                rows += [fwd, both]
                print(f"{name:30s} L={t:6d} fwd {fwd.median_ms:8.3f}  fwd+bwd {both.median_ms:8.3f}", flush=True)
            except Exception as exc:
                print(f"{name} L={t}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        del q, k, v, qh, kh, vh, beta, g
        torch.cuda.empty_cache()
    # short conv at hidden 4096
    for t in (8192, 32768):
        x = torch.randn(1, t, 4096, device="cuda", dtype=torch.bfloat16).requires_grad_()
        w = torch.randn(4096, 4, device="cuda", dtype=torch.bfloat16).requires_grad_()
        bias = torch.randn(4096, device="cuda", dtype=torch.bfloat16).requires_grad_()
        with torch.no_grad():
            fwd = measure("ours short_conv W=4 silu", functools.partial(_conv, x, w, bias), {"L": t, "pass": "fwd"},
                          warmup=3, runs=50)
        floor_ms = 2 * x.numel() * 2 / bw * 1e3
        fwd.extra["x memory floor"] = f"{fwd.median_ms / floor_ms:.2f}"
        both = measure("ours short_conv W=4 silu", _fwd_bwd(_conv, (x, w, bias)), {"L": t, "pass": "fwd+bwd"}, warmup=3, runs=50)
        both.extra["x memory floor"] = f"{both.median_ms / (2 * floor_ms):.2f}"
        rows += [fwd, both]
        print(f"short_conv L={t} fwd {fwd.median_ms:.3f} ({fwd.extra['x memory floor']}x floor) fwd+bwd {both.median_ms:.3f}", flush=True)
    env = environment()
    env["copy TB/s"] = f"{bw / 1e12:.2f}"
    print(write_results(args.out, "Gated delta rule, sliding window, short conv (bf16, H=16, D=128)", rows, env))


if __name__ == "__main__":
    main()
