"""Sequence parallelism on several GPUs: one process per GPU (torchrun, NCCL), real collectives.

For the Llama-shaped linearized model and the hybrid keeping a quarter of its softmax layers, at
each total length: check the split model against the single-GPU model at `--check-length` (every
rank computes the reference), then time one forward (and with `--backward` forward + backward) of
each rank's shard, and count the bytes each rank receives, next to the cost model's prediction.
Rank 0 prints the table and writes JSON to --out.

Run: torchrun --nproc-per-node 8 -m benchmarks.sequence_parallel_multi_gpu --out runs/sp_multi_gpu.json
     [--lengths 32768,131072] [--models linearized,hybrid] [--softmax ulysses] [--linear lasp2] [--backward]
On the CPU (gloo), for a check of the logic: add --tiny.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import rewrite
from benchmarks.runner import environment, measure
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
from rewrite.distributed import CountingGroup, gather_sequence, register_group, shard
from rewrite.distributed.groups import ProcessGroupSequenceGroup

GROUP = "sp"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="32768,131072", help="total sequence lengths")
    parser.add_argument("--check-length", type=int, default=4096, help="length of the check against one GPU")
    add_strategy_arguments(parser)
    parser.add_argument("--backward", action="store_true", help="also time forward + backward")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="tiny model, short lengths (CPU check with gloo)")
    parser.add_argument("--out", default="runs/sequence_parallel_multi_gpu.json")
    args = parser.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.models = [m for m in args.models.split(",") if m]
    if args.tiny:
        args.lengths, args.check_length, args.runs = [64], 64, 2
    return args


def run_rank(args: argparse.Namespace) -> list[dict[str, Any]] | None:
    """This rank's part of the benchmark (torch.distributed initialised); rank 0 returns the rows."""
    rank, size = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    shape = TINY if args.tiny else BASE
    counting = CountingGroup(ProcessGroupSequenceGroup(None))
    register_group(GROUP, counting)
    rows: list[dict[str, Any]] = []
    for model_name in args.models:
        model = build_model(shape, device, dtype)
        gen = torch.Generator().manual_seed(0)
        example = {"input_ids": torch.randint(0, shape["vocab"], (1, 64), generator=gen).to(device)}
        sp = {"group": GROUP, **sp_options(args)}
        split = rewrite.optimize(model, plans(model_name, shape["layers"], sp), example_kwargs=example)
        single = rewrite.optimize(model, plans(model_name, shape["layers"], None), example_kwargs=example)
        check_ids = torch.randint(0, shape["vocab"], (1, args.check_length), generator=gen).to(device)
        with torch.inference_mode():
            ref = single(input_ids=check_ids).last_hidden_state.float()
            got = gather_sequence(split(input_ids=shard(check_ids, rank, size, args.layout)).last_hidden_state,
                                  group=counting, layout=args.layout).float()
        rel_err = ((got - ref).norm() / ref.norm()).item()
        del single, ref, got
        masked = has_masked_softmax(split)
        for length in args.lengths:
            ids = torch.randint(0, shape["vocab"], (1, length), generator=gen).to(device)
            local = shard(ids, rank, size, args.layout)
            forward = functools.partial(split, input_ids=local)
            counting.records.clear()
            with torch.inference_mode():
                forward()
            counted = counting.total_bytes()
            predicted = predicted_bytes(model_name, shape, size, length, 1, torch.finfo(dtype).bits // 8,
                                        args.softmax, args.linear, rank, masked, args.ulysses_size)
            dist.barrier()
            with torch.inference_mode():
                fwd = measure("forward", forward, warmup=1, runs=args.runs)
            row: dict[str, Any] = {"model": model_name, "P": size, "L": length, "rank": rank,
                                   "forward_ms": fwd.median_ms, "bytes_received": counted,
                                   "bytes_predicted": predicted, "rel_err_check": rel_err}
            if args.backward:
                def step(local=local, split=split):
                    split(input_ids=local).last_hidden_state.float().sum().backward()

                dist.barrier()
                row["forward_backward_ms"] = measure("forward+backward", step, warmup=1, runs=args.runs).median_ms
            if torch.cuda.is_available():
                row["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            everyone: list[Any] = [None] * size
            dist.all_gather_object(everyone, row)
            rows.extend(everyone if rank == 0 else [])
    return rows if rank == 0 else None


def report(rows: list[dict[str, Any]], out: str) -> None:
    """Print the table and write JSON (rank 0)."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"title": "Sequence parallelism, one process per GPU", "env": environment(),
                                "rows": rows}, indent=2))
    keys = ["model", "P", "L", "rank", "forward_ms", "forward_backward_ms", "peak_mib", "bytes_received",
            "bytes_predicted", "rel_err_check"]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys)
              + " |")


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    warnings.filterwarnings("ignore")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        rows = run_rank(args)
        if rows is not None:
            report(rows, args.out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
