"""Optimize two checkpoints of one architecture: the second reuses the first's capture (`rewrite.CAPTURE_CACHE`).

A sweep over fine-tuned checkpoints, or plans tried one after another on one model, captures the same structure
again and again; only the first pays for torch.export's trace. Each optimized module is verified against its own
model.

Run: python -m examples.capture_reuse [--target minilm] [--plan "{passes: [attention_normalize, varlen]}"]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import rewrite
from examples.models import TARGETS


def main(argv: list[str] | None = None) -> list[rewrite.OptimizedModule]:
    """Optimize the target and a copy with other weights; returns both optimized modules."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="minilm", choices=sorted(TARGETS))
    parser.add_argument("--plan", default="{passes: [attention_normalize, varlen]}")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=32)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    first, example = TARGETS[args.target](batch=args.batch, length=args.length)
    second, _ = TARGETS[args.target](batch=args.batch, length=args.length)
    with torch.no_grad():  # a second checkpoint: the same architecture, other weights
        for p in second.parameters():
            p.add_(0.01 * torch.randn_like(p))
    call_args, call_kwargs = (example, {}) if isinstance(example, tuple) else ((), example)
    cache = rewrite.CAPTURE_CACHE
    optimized = []
    for name, model in (("first checkpoint", first), ("second checkpoint", second)):
        hits = cache.hits
        start = time.perf_counter()
        om = rewrite.optimize(model, args.plan, call_args, example_kwargs=call_kwargs, verify=True)
        reused = "reused the capture" if cache.hits > hits else "traced"
        print(f"{name}: optimized in {time.perf_counter() - start:.2f} s, capture {om.report.capture_seconds:.2f} s "
              f"({reused}); verified against its model: {'ok' if om.verification.passed else 'DIFFERS'}")
        optimized.append(om)
    return optimized


if __name__ == "__main__":
    main()
