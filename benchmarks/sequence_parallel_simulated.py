"""Sequence parallelism on one GPU with simulated ranks: each rank's share of the work, timed alone.

For each model (Llama-shaped linearized, and a hybrid keeping a quarter of its softmax layers) and
each group size P:

1. record: the P ranks run as threads of this process, meeting at each collective, and every tensor
   a collective delivers to each rank is kept (and its bytes counted);
2. check: the ranks' outputs put together equal the single-GPU model's at the same total length;
3. replay: each rank's forward runs alone, its collectives replaced by the exact tensors they
   delivered, timed (median) with its peak memory;

and the single-GPU model at the same total length is timed too, so the table shows the compute SP
adds per rank (max rank time x P against the single model), next to the bytes each rank receives,
the cost model's predicted bytes (which must equal the counted ones) and the time those bytes take
at a stated link bandwidth. Forward (prefill) only.

Run: python -m benchmarks.sequence_parallel_simulated --out runs/sp_simulated.json
     [--length 32768] [--sizes 2,4,8] [--models linearized,hybrid] [--link-gb-s 100] [--tiny]
"""

from __future__ import annotations

import argparse
import functools
import json
import warnings
from pathlib import Path
from typing import Any

import torch

import rewrite
from benchmarks.runner import Measurement, environment, measure, write_results
from benchmarks.sequence_parallel_common import (
    BASE,
    TINY,
    add_strategy_arguments,
    build_model,
    has_masked_softmax,
    plans,
    predicted_bytes,
    sp_options,
)
from rewrite.distributed import CountingGroup, bind_group, run_on_threads, shard, threaded_groups, unshard
from rewrite.distributed.groups import RecordingGroup, ReplayGroup

GROUP = "simulated"


def _peak_memory(fn) -> int:
    """Peak bytes allocated above the level before `fn` (CUDA only; 0 on the CPU)."""
    if not torch.cuda.is_available():
        fn()
        return 0
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def record(module, ids: torch.Tensor, size: int, layout: str):
    """Run the P ranks as threads; returns (outputs, delivered tensors per rank, counting groups)."""
    groups = threaded_groups(size)
    counters = [CountingGroup(g) for g in groups]
    recorders = [RecordingGroup(c) for c in counters]

    def run(rank: int) -> torch.Tensor:
        with torch.inference_mode(), bind_group(GROUP, recorders[rank]):
            return module(input_ids=shard(ids, rank, size, layout)).last_hidden_state

    outputs = run_on_threads(groups, run)
    return outputs, [r.delivered for r in recorders], counters


def replay_rank(module, ids: torch.Tensor, rank: int, size: int, layout: str, delivered, runs: int):
    """Time rank `rank` alone with its recorded collectives; returns (Measurement, peak bytes)."""
    replay = ReplayGroup(rank, size, delivered)
    local = shard(ids, rank, size, layout)

    def forward():
        replay.position = 0
        with torch.inference_mode(), bind_group(GROUP, replay):
            return module(input_ids=local)

    peak = _peak_memory(forward)
    return measure(f"rank {rank}", forward, warmup=1, runs=runs), peak


def run(args: argparse.Namespace) -> tuple[list[Measurement], list[dict[str, Any]]]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shape = TINY if args.tiny else BASE
    link = args.link_gb_s * 1e9
    rows: list[Measurement] = []
    checks: list[dict[str, Any]] = []
    for model_name in args.models:
        model = build_model(shape, device, dtype)
        gen = torch.Generator(device="cpu").manual_seed(0)
        ids = torch.randint(0, shape["vocab"], (1, args.length), generator=gen).to(device)
        example = {"input_ids": ids[:, :64]}
        single = rewrite.optimize(model, plans(model_name, shape["layers"], None), example_kwargs=example)
        forward_single = functools.partial(single, input_ids=ids)
        with torch.inference_mode():
            reference = forward_single().last_hidden_state
            peak_single = _peak_memory(forward_single)
            base = measure(f"{model_name} single GPU", forward_single, {"P": 1, "L": args.length},
                           warmup=1, runs=args.runs)
        base.extra.update(peak_mib=round(peak_single / 2**20, 1))
        rows.append(base)
        for size in args.sizes:
            sp = {"group": GROUP, "group_size": size, **sp_options(args)}
            split = rewrite.optimize(model, plans(model_name, shape["layers"], sp), example_kwargs=example)
            masked = has_masked_softmax(split)
            outputs, delivered, counters = record(split, ids, size, args.layout)
            got = unshard(outputs, args.layout)
            err = ((got.float() - reference.float()).norm() / reference.float().norm()).item()
            per_rank = []
            for rank in range(size):
                row, peak = replay_rank(split, ids, rank, size, args.layout, delivered[rank], args.runs)
                counted = counters[rank].total_bytes()
                predicted = predicted_bytes(model_name, shape, size, args.length, 1, torch.finfo(dtype).bits // 8,
                                            args.softmax, args.linear, rank, masked, args.ulysses_size)
                row.name = f"{model_name} P={size} rank {rank}"
                row.params = {"P": size, "L": args.length}
                row.extra.update(
                    peak_mib=round(peak / 2**20, 1),
                    counted_mib=round(counted / 2**20, 3),
                    predicted_mib=round(predicted / 2**20, 3),
                    comm_ms_at_link=round(counted / link * 1e3, 3),
                    by_collective={k: v.bytes_received for k, v in counters[rank].records.items()},
                )
                per_rank.append((row, counted, predicted))
                rows.append(row)
            slowest = max(r.median_ms for r, _, _ in per_rank)
            checks.append({
                "model": model_name, "P": size, "rel_err_vs_single": err,
                "bytes_match": all(c == p for _, c, p in per_rank),
                "compute_overhead": slowest * size / base.median_ms,
                "slowest_rank_ms": slowest, "single_ms": base.median_ms,
            })
            del split, outputs, delivered
    return rows, checks


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=32768, help="total sequence length")
    parser.add_argument("--sizes", default="2,4,8", help="group sizes P to simulate")
    add_strategy_arguments(parser)
    parser.add_argument("--link-gb-s", type=float, default=100.0, help="link bandwidth per rank for the comm time")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="tiny model and few runs (CPU check)")
    parser.add_argument("--out", default="runs/sequence_parallel_simulated.json")
    args = parser.parse_args(argv)
    args.sizes = [int(x) for x in args.sizes.split(",")]
    args.models = [m for m in args.models.split(",") if m]
    if args.tiny:
        args.length, args.runs = min(args.length, 64), min(args.runs, 2)
    warnings.filterwarnings("ignore")
    rows, checks = run(args)
    env = environment()
    env["link_gb_s"] = str(args.link_gb_s)
    print(write_results(args.out, "Sequence parallelism, simulated ranks (forward)", rows, env))
    print("| model | P | rel err vs single | counted = predicted bytes | slowest rank ms | single ms | "
          "P x slowest / single |")
    print("|---|---|---|---|---|---|---|")
    for c in checks:
        print(f"| {c['model']} | {c['P']} | {c['rel_err_vs_single']:.2e} | {c['bytes_match']} | "
              f"{c['slowest_rank_ms']:.2f} | {c['single_ms']:.2f} | {c['compute_overhead']:.2f} |")
    path = Path(args.out)
    data = json.loads(path.read_text())
    data["checks"] = checks
    path.write_text(json.dumps(data, indent=2))
    return checks


if __name__ == "__main__":
    main()
