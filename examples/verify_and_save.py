"""Optimize a built-in target with verification, save it, and load it back both ways.

Run: python -m examples.verify_and_save [--target llama] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch
import torch.utils._pytree as pytree

import rewrite
from examples.models import FAMILIES, TARGETS


def _max_diff(a, b) -> float:
    pairs = zip(pytree.tree_leaves(a), pytree.tree_leaves(b))
    return max((float((x - y).abs().max()) for x, y in pairs if isinstance(x, torch.Tensor)), default=0.0)


def main(argv: list[str] | None = None) -> rewrite.OptimizedModule:
    """Optimize, verify, save, load (with and without the model); returns the module loaded from disk alone."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="llama", choices=FAMILIES)
    parser.add_argument("--plan", default="{passes: [attention_normalize]}")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--out", default=None, help="folder to save into (default: a temporary one)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    model, example = TARGETS[args.target](batch=args.batch, length=args.length)
    call_args, call_kwargs = (example, {}) if isinstance(example, tuple) else ((), example)
    om = rewrite.optimize(model, args.plan, call_args, example_kwargs=call_kwargs, verify=True)
    print(f"{args.target}: {om.report.summary()}")
    print("\nverification against the original:")
    print(om.verification)

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="rewrite-"))
    folder = om.save(out)
    print(f"\nsaved to {folder}: {', '.join(sorted(p.name for p in folder.iterdir()))}")
    want = om(*call_args, **call_kwargs)

    alone = rewrite.load(folder)
    print(f"loaded without the model (exported program): max diff {_max_diff(alone(*call_args, **call_kwargs), want):.3g}")
    again = rewrite.load(folder, model=model)
    print(f"loaded with the model (optimized again):    max diff {_max_diff(again(*call_args, **call_kwargs), want):.3g}")
    return alone


if __name__ == "__main__":
    main()
