"""The rewriter's own cost: capture + passes for a 32-layer Llama-shaped model on the CPU.

The model is built on the meta device (no weights in memory): capture and passes only need shapes.
Run: python -m benchmarks.rewriter_cost [--layers 32] [--out runs/rewriter_cost.json]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from benchmarks.runner import Measurement, environment, write_results
from rewrite.capture import capture
from rewrite.pipeline import run_pipeline
from rewrite.plan import Plan


def build(layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int):
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=32000,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.zeros(2, 128, dtype=torch.long, device="meta")
    return model, {"input_ids": ids}


def main(argv: list[str] | None = None) -> list[Measurement]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="runs/rewriter_cost.json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    model, kwargs = build(args.layers, args.hidden, 32, 8, int(args.hidden * 2.6875))
    plan = Plan.from_data({"passes": ["attention_normalize"]})
    captures, passes, totals = [], [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        captured = capture(model, (), kwargs)
        t1 = time.perf_counter()
        report = run_pipeline(captured.graph_module, plan)
        t2 = time.perf_counter()
        captures.append(t1 - t0)
        passes.append(t2 - t1)
        totals.append(t2 - t0)
    med = sorted(totals)[len(totals) // 2]
    row = Measurement(
        "capture + attention_normalize + lower",
        {"layers": args.layers, "hidden": args.hidden},
        med * 1e3, min(totals) * 1e3, max(totals) * 1e3, len(totals),
        extra={
            "capture s": f"{sorted(captures)[len(captures) // 2]:.2f}",
            "passes s": f"{sorted(passes)[len(passes) // 2]:.2f}",
            "sites": report.results[0].matched,
        },
    )
    print(write_results(args.out, "Rewriter cost (CPU)", [row], environment()))
    return [row]


if __name__ == "__main__":
    main()
