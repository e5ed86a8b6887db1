"""`rewrite distill`: linearize a target by a plan and run the recovery recipe from the command line.

    rewrite distill llama --plan '{passes: [{mixer: {kind: gated_deltanet}}]}' --transfer-steps 200
    rewrite distill my_lm.py:build --plan plan.yaml --data stdlib-bytes --length 256 \\
        --finetune-steps 100 --finetune lora --loss ce,kl --checkpoint runs/d1 --save runs/d1/model

Data: `example` repeats the target's example inputs every step; `stdlib-bytes` draws byte-level
windows of the standard library's sources (for byte-level language models, vocabulary >= 256).
With --checkpoint, a run that is stopped and started again continues where it stopped. A LoRA
fine-tune ends with the adapters merged into the base weights (--no-merge keeps them as layers).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import torch

from rewrite.distill.config import (
    FINETUNE_LOSSES,
    FINETUNE_METHODS,
    TRANSFER_MODES,
    DistillConfig,
    FinetuneConfig,
    TransferConfig,
)
from rewrite.distill.recipe import distill
from rewrite.errors import RewriteError

DATA_SOURCES = ("example", "stdlib-bytes")


def _losses(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_distill_command(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register `distill` on the `rewrite` command's subparsers."""
    p = sub.add_parser("distill", parents=[common], help="linearize a target and recover its quality (recipe)")
    p.add_argument("target", help="built-in name, path/file.py:factory, module:factory or a Hugging Face model "
                                  "folder / config.json (?key=value,...)")
    p.add_argument("--plan", required=True, help="plan file, inline YAML, or pass names (with a mixer pass)")
    p.add_argument("--data", choices=DATA_SOURCES, default="example")
    p.add_argument("--batch", type=int, default=8, help="stdlib-bytes: sequences per step")
    p.add_argument("--length", type=int, default=256, help="stdlib-bytes: tokens per sequence")
    p.add_argument("--transfer-steps", type=int, default=100)
    p.add_argument("--transfer-lr", type=float, default=1e-2)
    p.add_argument("--mode", choices=TRANSFER_MODES, default="layer", help="attention transfer: layer-local or joint")
    p.add_argument("--finetune-steps", type=int, default=0)
    p.add_argument("--finetune", choices=FINETUNE_METHODS, default="lora")
    p.add_argument("--finetune-lr", type=float, default=1e-4)
    p.add_argument("--loss", type=_losses, default=("ce",), help=f"fine-tune losses, comma-separated: {FINETUNE_LOSSES}")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--no-merge", action="store_true",
                   help="lora: keep the adapters as separate layers (default: merge them into the base weights "
                        "after the last fine-tune step, so the module runs and saves under the model's own names)")
    p.add_argument("--checkpoint", default=None, help="folder for checkpoints (resumes from it)")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--no-resume", action="store_true", help="start afresh even if --checkpoint holds one")
    p.add_argument("--save", default=None, help="save the trained optimized module here (rewrite.load)")
    p.add_argument("--json", action="store_true", help="print the loss history as JSON")
    p.set_defaults(run=cmd_distill)


def _data(args: argparse.Namespace, model: torch.nn.Module, ex_args: tuple, ex_kwargs: dict) -> Callable[[int], Any]:
    if args.data == "example":
        return lambda step: dict(ex_kwargs) if ex_kwargs else tuple(ex_args)
    from rewrite.text_corpus import VOCAB_SIZE, ByteCorpus

    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    if not embeddings or embeddings[0].num_embeddings < VOCAB_SIZE:
        rows = embeddings[0].num_embeddings if embeddings else "no"
        raise RewriteError(
            f"--data stdlib-bytes needs a byte-level model (an input embedding of >= {VOCAB_SIZE} rows), "
            f"the target has {rows}; use --data example"
        )
    corpus = ByteCorpus.load()
    name = "input_ids" if ex_kwargs.get("input_ids") is not None or not ex_args else None

    def data(step: int) -> Any:
        ids = corpus.batches(args.batch, args.length, generator=torch.Generator().manual_seed(step))[:, :-1]
        return {"input_ids": ids} if name else (ids,)

    return data


def cmd_distill(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    """Run the recipe on the target; print the losses; optionally save the module."""
    from rewrite.cli import load_announced, parse_plan

    plan = parse_plan(args.plan)
    loaded = load_announced(args.target, log, uses_example_inputs=args.data == "example")
    model, ex_args, ex_kwargs = loaded.model, loaded.args, loaded.kwargs
    config = DistillConfig(
        TransferConfig(steps=args.transfer_steps, lr=args.transfer_lr, mode=args.mode),
        FinetuneConfig(steps=args.finetune_steps, lr=args.finetune_lr, method=args.finetune, losses=args.loss,
                       lora_rank=args.lora_rank, merge=not args.no_merge),
        checkpoint_dir=args.checkpoint, checkpoint_every=args.checkpoint_every, resume=not args.no_resume,
        progress=not args.quiet,
    )
    log(f"distilling {args.target}: transfer {args.transfer_steps} steps ({args.mode}), "
        f"fine-tune {args.finetune_steps} steps ({args.finetune})")
    result = distill(model, plan, _data(args, model, ex_args, ex_kwargs), config, log=None if args.quiet else log)
    if args.json:
        print(json.dumps(result.history))
    else:
        for stage, losses in result.history.items():
            if losses:
                print(f"{stage}: {len(losses)} steps, loss {losses[0]:.5g} -> {losses[-1]:.5g}")
    if args.save:
        path = result.module.save(args.save)
        print(f"saved to {path}")
    return 0
