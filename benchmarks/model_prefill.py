"""Prefill latency of a Llama-shaped model: the original next to its optimized module, one run.

Llama-shaped body (hidden 2048, intermediate 5632, 16 layers, 32 q / 8 kv heads), bf16, batch 1,
random init. Checks the rewritten module agrees with the original before timing.
Run: python -m benchmarks.model_prefill [--lengths 2048,8192,32768] [--plan '{passes: [attention_normalize]}']
"""

from __future__ import annotations

import argparse
import functools
import time
import warnings

import torch

import rewrite
from benchmarks.runner import environment, measure, write_results


def build_model(layers: int, device: str, dtype: torch.dtype):
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=131072,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return transformers.LlamaModel(cfg).to(device=device, dtype=dtype).eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,8192,32768")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--plan", default="{passes: [attention_normalize]}")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", default="runs/model_prefill.json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build_model(args.layers, device, dtype)
    lengths = [int(x) for x in args.lengths.split(",")]
    example = {"input_ids": torch.randint(0, 32000, (1, 256), device=device)}
    t0 = time.perf_counter()
    om = rewrite.optimize(model, args.plan, example_kwargs=example)
    optimize_s = time.perf_counter() - t0
    rows = []
    for length in lengths:
        ids = torch.randint(0, 32000, (1, length), device=device)
        with torch.inference_mode():
            ref = model(input_ids=ids).last_hidden_state
            out = om(input_ids=ids).last_hidden_state
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            runs = max(3, args.runs if length <= 32768 else 3)
            for name, fn in (("original (HF, SDPA)", functools.partial(model, input_ids=ids)),
                             ("rewrite.optimize", functools.partial(om, input_ids=ids))):
                row = measure(name, fn, {"L": length}, warmup=2, runs=runs)
                row.extra["rel err vs original"] = f"{err:.1e}" if name != "original (HF, SDPA)" else "-"
                rows.append(row)
        if device == "cuda":
            torch.cuda.empty_cache()
    env = environment()
    env["optimize() s"] = f"{optimize_s:.1f}"
    print(write_results(args.out, f"Llama-shaped prefill, {args.layers} layers, plan {args.plan}", rows, env))


if __name__ == "__main__":
    main()
