"""Train step of a hybrid model on one long sequence split over several ranks.

    torchrun --nproc-per-node 2 -m examples.sequence_parallel          # one process per rank
    python -m examples.sequence_parallel --procs 4                     # spawns 4 CPU (gloo) processes
    python -m examples.sequence_parallel --tiny --threads 2            # ranks as threads of one process

A tiny Llama keeps softmax attention in its last layer and gets `gla` elsewhere (`mixer`), then
`sequence_parallel` splits the sequence: softmax layers by Ulysses or ring, linear layers by LASP-2 or
all-scan (`--strategy auto` lets the cost model choose per layer). Every rank shards the batch
(`shard_inputs`, labels pre-shifted), computes the loss over the global count of real tokens
(`sequence_parallel_loss`), backpropagates and sums gradients over the group. Rank 0 prints what the
pass did and compares loss and gradients with the same model run on the whole sequence in one process.
"""

from __future__ import annotations

import argparse
import copy
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import rewrite
from examples.models import TARGETS
from rewrite.distributed import (
    all_reduce_gradients,
    bind_group,
    run_on_threads,
    sequence_parallel_loss,
    shard_inputs,
    shift_labels,
    threaded_groups,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="auto", help="auto, ulysses, ring, lasp2, allscan")
    parser.add_argument("--layout", default="contiguous", choices=["contiguous", "zigzag"])
    parser.add_argument("--length", type=int, default=64, help="total sequence length")
    parser.add_argument("--procs", type=int, default=2, help="CPU processes to spawn when not under torchrun")
    parser.add_argument("--threads", type=int, default=0, help="run this many ranks as threads instead")
    parser.add_argument("--tiny", action="store_true", help="a shorter sequence")
    args = parser.parse_args(argv)
    if args.tiny:
        args.length = 16
    return args


def _setup(args: argparse.Namespace, size: int) -> tuple[torch.nn.Module, Any, dict[str, torch.Tensor], dict]:
    """The model, its split module, the batch (labels included) and the single-process reference."""
    model, inputs = TARGETS["llama"](batch=2, length=args.length)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(inputs["attention_mask"][:, :-1] == 0, -100)
    plan = {"passes": [
        {"mixer": {"kind": "gla", "layers": ":-1"}},
        {"sequence_parallel": {"strategy": args.strategy, "layout": args.layout, "group_size": size}},
    ]}
    split = rewrite.optimize(copy.deepcopy(model), plan, example_kwargs=inputs)
    reference = rewrite.optimize(copy.deepcopy(model), {"passes": plan["passes"][:1]}, example_kwargs=inputs)
    logits = reference(**inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), shift_labels(labels).flatten(), ignore_index=-100)
    loss.backward()
    expected = {"loss": loss.item(), "grads": {n: p.grad for n, p in reference.named_parameters()}}
    return split, {**inputs, "labels": labels}, expected, plan


def train_step(split: torch.nn.Module, batch: dict[str, torch.Tensor], layout: str) -> torch.Tensor:
    """One rank's step: its shard, the globally normalised loss, backward."""
    local = shard_inputs(batch, layout=layout)
    logits = split(input_ids=local["input_ids"], attention_mask=local["attention_mask"]).logits
    loss = sequence_parallel_loss(logits, local["labels"])
    loss.backward()
    return loss.detach()


def _summary(split: Any, loss: float, expected: dict) -> float:
    result = split.report.results[-1]
    print(result.summary())
    for line in result.messages:
        print(f"  {line}")
    worst = max(float((p.grad - expected["grads"][n]).abs().max()) for n, p in split.named_parameters()
                if p.grad is not None)
    print(f"loss {loss:.6f} (one process: {expected['loss']:.6f}); largest gradient difference {worst:.2e}")
    return worst


def _process(rank: int, size: int, args: argparse.Namespace, port: int | None) -> None:
    if port is not None:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size))
    dist.init_process_group("gloo")
    try:
        split, batch, expected, _ = _setup(args, dist.get_world_size())
        loss = train_step(split, batch, args.layout)
        all_reduce_gradients(split)
        if dist.get_rank() == 0:
            _summary(split, loss.item(), expected)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> float | None:
    """Run the example; with --threads, returns the largest gradient difference from one process."""
    args = parse_args(argv)
    if args.threads:
        split, batch, expected, _ = _setup(args, args.threads)
        groups = threaded_groups(args.threads)

        def rank_thread(rank: int) -> Any:
            with bind_group("world", groups[rank]):
                return train_step(split, batch, args.layout)  # gradients sum in the shared module

        losses = run_on_threads(groups, rank_thread)
        return _summary(split, float(losses[0]), expected)
    if "RANK" in os.environ:  # under torchrun
        _process(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, None)
        return None
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_process, args=(args.procs, args, port), nprocs=args.procs, join=True)
    return None


if __name__ == "__main__":
    main()
