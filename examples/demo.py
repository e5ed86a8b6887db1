"""The main demo: optimize the pretrained all-MiniLM-L6-v2 and show what changed and how fast.

The default plan canonicalizes attention and makes the model padding-free: a batch of real
sentences padded to a fixed length runs on its real tokens only, with the same outputs there.

Run: python -m examples.demo [--target minilm] [--plan '{passes: [attention_normalize, varlen]}'] [--runs 20]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import rewrite
from examples.models import TARGETS


def _median_ms(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> rewrite.OptimizedModule:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="minilm", choices=sorted(TARGETS))
    parser.add_argument("--plan", default="{passes: [attention_normalize, varlen]}")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    model, example = TARGETS[args.target](batch=args.batch, length=args.length)
    call_args, call_kwargs = (example, {}) if isinstance(example, tuple) else ((), example)
    print(f"model: {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters)")
    print(f"plan:  {args.plan}")

    t0 = time.perf_counter()
    om = rewrite.optimize(model, args.plan, call_args, example_kwargs=call_kwargs, verify=True)
    print(f"\noptimized in {time.perf_counter() - t0:.2f} s (capture {om.report.capture_seconds:.2f} s)")
    print("\nwhat each pass did:")
    print(om.report.summary())
    for result in om.report.results:
        for op, delta in result.op_count_diff().items():
            print(f"  {result.name}: {op} {delta:+d}")
        for where in result.changed[:3]:
            print(f"  rewrote {where}")
    print("\nverification against the original:")
    print(om.verification)

    with torch.inference_mode():
        t_orig = _median_ms(lambda: model(*call_args, **call_kwargs), args.runs)
        t_opt = _median_ms(lambda: om(*call_args, **call_kwargs), args.runs)
    print(f"\nforward, batch {args.batch} x {args.length} tokens, median of {args.runs} runs on {_device()}:")
    print(f"  original  {t_orig:8.2f} ms")
    print(f"  optimized {t_opt:8.2f} ms  ({t_orig / t_opt:.2f}x)")
    print("\nthe program it runs (first lines of om.code):")
    print("\n".join(om.code.strip().splitlines()[:12]))
    return om


def _device() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    main()
