"""Dump a model's graph before and after a plan, and explain what it costs, from Python.

Run: python -m examples.dump_and_explain [--target llama | path/to/hf_folder] [--plan attention_normalize]
                                         [--seq 2048,32768] [--batch 1] [--out DIR]

The same as `rewrite dump TARGET --stage all` and `rewrite explain TARGET`, written out with the
library calls the CLI uses, so each step can be changed.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

from rewrite.analysis import analyze
from rewrite.capture import capture
from rewrite.cli import human, parse_lengths, parse_plan
from rewrite.cost_model import estimate
from rewrite.pipeline import run_pipeline
from rewrite.render import render, render_text, stage_views
from rewrite.targets import load_target


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Capture, rewrite, show the changes and the cost; returns the stage views and cost report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="llama", help="built-in name, file.py:factory or a Hugging Face model folder (?key=value,...)")
    parser.add_argument("--plan", default="attention_normalize")
    parser.add_argument("--seq", type=parse_lengths, default=[2048, 32768])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write every stage as SVG, DOT and JSON here")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    # 1. capture and rewrite, keeping every stage's graph
    model, call_args, call_kwargs = load_target(args.target)
    gm = capture(model, call_args, call_kwargs).graph_module
    report = run_pipeline(gm, parse_plan(args.plan), keep_stages=True)
    views = stage_views(report.stages, report.results)
    print(f"{args.target}: {type(model).__name__}, stages: {', '.join(v.name for v in views)}")

    # 2. what each pass changed: only the marked lines of each stage's code
    for view in views[1:]:
        changed = [line for line in render_text(view).splitlines() if line[:2] in ("+ ", "- ")]
        print(f"\n{view.name}: {len(view.added)} nodes added, {len(view.removed)} removed")
        print("\n".join(changed[:12] + (["  ..."] if len(changed) > 12 else [])))

    # 3. every stage in the other formats
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for fmt, suffix in (("svg", "svg"), ("dot", "dot"), ("json", "json")):
            path = out / f"{args.target.split('?')[0].replace('/', '_')}.{suffix}"
            path.write_text(render(views, fmt, results=report.results))
            print(f"wrote {path}")

    # 4. the cost of the rewritten graph, as formulas and at each length
    analysis = analyze(gm)
    cost = estimate(gm, analysis)
    print(f"\nattention sites: {len(analysis.sites)}; causal: {[s.causal for s in analysis.sites]}")
    for key, unit in (("flops", "FLOP"), ("bytes", "B"), ("activations", "B")):
        values = ", ".join(
            f"seq={n}: {human(cost.total.evaluate(n, args.batch)[key], unit)}" for n in args.seq
        )
        print(f"total {key:<12} {getattr(cost.total, key)}\n      {'':<12} {values}")
    return {"views": views, "cost": cost, "analysis": analysis}


if __name__ == "__main__":
    main()
