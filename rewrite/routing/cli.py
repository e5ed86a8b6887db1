"""`rewrite layer-skip`: train routers on real text and report which layers each sequence skips.

    rewrite layer-skip train TARGET --steps 200 --target-skip 0.25 --out routed/
    rewrite layer-skip train TARGET --loss distill --lora-rank 8 --checkpoint-every 50 --out routed/
    rewrite layer-skip report TARGET --routers routed/checkpoints/final.pt --budget 0.25
    rewrite layer-skip report TARGET --routers routed/checkpoints/final.pt --top-k 2

TARGET is a causal LM with a vocabulary of at least 256 tokens (the text is byte-level: the Python
standard library's own sources), named as for the other commands (`file.py:factory`, `module:factory`,
a Hugging Face model folder).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rewrite.errors import RewriteError
from rewrite.routing.controls import record_skips, skip_controls
from rewrite.routing.evaluation import continuation_perplexity, top_k_decisions
from rewrite.routing.language_model import logits_of, takes_input_ids
from rewrite.routing.training import (
    LOSSES,
    TRAINING_MODES,
    LoraSettings,
    RouterTrainingConfig,
    load_checkpoint,
    train_routers,
)
from rewrite.text_corpus import VOCAB_SIZE, ByteCorpus

Log = Callable[[str], None]


def _vocab_size(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None)
    if isinstance(size, int):
        return size
    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    return embeddings[0].num_embeddings if embeddings else None


def _load_lm(spec: str, plan: str | None, log: Log) -> tuple[torch.nn.Module, Any]:
    from rewrite.cli import load_announced, parse_plan

    model = load_announced(spec, log, uses_example_inputs=False).model  # the text is the byte corpus
    size = _vocab_size(model)
    if size is not None and size < VOCAB_SIZE:
        raise RewriteError(
            f"target {spec!r} has a vocabulary of {size} tokens; the byte-level text needs at least {VOCAB_SIZE}"
        )
    return model.eval(), (parse_plan(plan) if plan else None)


def cmd_train(args: argparse.Namespace, log: Log) -> int:
    """Train routers (and LoRA adapters) on the byte corpus; save the module, checkpoints and history."""
    model, plan = _load_lm(args.target, args.plan, log)
    corpus = ByteCorpus.load()
    generator = torch.Generator().manual_seed(args.seed)
    out = Path(args.out)
    lora = None
    if args.lora_rank:
        lora = LoraSettings(rank=args.lora_rank, alpha=2.0 * args.lora_rank, target_modules=args.lora_targets.split(","),
                            merge=not args.no_merge)
    config = RouterTrainingConfig(
        steps=args.steps, lr=args.lr, target_skip=args.target_skip, loss=args.loss, mode=args.mode, lora=lora,
        checkpoint_dir=str(out / "checkpoints"), checkpoint_every=args.checkpoint_every, progress=not args.quiet,
        seed=args.seed,
    )
    try:
        config.check()
    except ValueError as exc:
        raise RewriteError(str(exc)) from exc
    log(f"training routers of {args.target} for {args.steps} steps")
    result = train_routers(
        model, lambda step: corpus.batches(args.batch, args.length, generator=generator), config, plan=plan,
        resume_from=args.resume,
    )
    windows = corpus.sequential(args.length, split="heldout", limit=args.eval_windows)
    prompt = args.length // 2
    full = continuation_perplexity(result.module, windows, prompt, threshold=math.inf)
    routed = continuation_perplexity(result.module, windows, prompt)
    summary = {
        "full_perplexity": full.perplexity,
        "routed_perplexity": routed.perplexity,
        "routed_skip_rate": routed.skip_rate,
        "checkpoints": [str(p) for p in result.checkpoints],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "history.json").write_text(json.dumps({"history": result.history, "summary": summary}, indent=2))
    print(
        f"held-out perplexity: full {full.perplexity:.4f}, routed {routed.perplexity:.4f} "
        f"({routed.skip_rate:.1%} of layer executions skipped); checkpoints in {out / 'checkpoints'}"
    )
    return 0


def cmd_report(args: argparse.Namespace, log: Log) -> int:
    """Show which routed layers each held-out sequence skips under the given threshold, budget or top k."""
    import rewrite
    from rewrite.routing.training import DEFAULT_PLAN

    model, plan = _load_lm(args.target, args.plan, log)
    corpus = ByteCorpus.load()
    windows = corpus.sequential(args.length, split="heldout", limit=args.sequences)[:, :-1]
    keyword = takes_input_ids(model)
    om = rewrite.optimize(model, plan or DEFAULT_PLAN, None if keyword else (windows,),
                          example_kwargs={"input_ids": windows} if keyword else None)
    if args.routers:
        load_checkpoint(args.routers, om)
    mask = None
    if args.top_k is not None:
        if args.threshold is not None or args.budget is not None:
            raise RewriteError("layer-skip report: --top-k ranks the routers; leave out --threshold and --budget")
        try:
            mask = top_k_decisions(om, windows, args.top_k)
        except ValueError as exc:
            raise RewriteError(str(exc)) from exc
    with torch.no_grad(), skip_controls(threshold=args.threshold, budget=args.budget, skip_mask=mask), record_skips() as report:
        logits_of(om, windows, keyword=keyword)
    print(report.table())
    print(f"skipped {report.skip_rate():.1%} of layer executions; columns: {', '.join(report.layers)}")
    return 0


def add_layer_skip_command(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register `layer-skip train` and `layer-skip report` under the `rewrite` command's subparsers."""
    parser = sub.add_parser("layer-skip", parents=[common], help="train layer-skip routers; report decisions")
    inner = parser.add_subparsers(dest="layer_skip_command", required=True, metavar="{train,report}")
    train = inner.add_parser("train", parents=[common], help="train routers on the byte corpus")
    train.add_argument("target", help="a causal LM: path/file.py:factory, module:factory or a Hugging Face model folder")
    train.add_argument("--plan", default=None, help="plan with a layer_skip pass (default: every layer)")
    train.add_argument("--steps", type=int, default=200)
    train.add_argument("--lr", type=float, default=1e-2)
    train.add_argument("--target-skip", type=float, default=0.25, help="fraction of layer executions to skip")
    train.add_argument("--loss", choices=LOSSES, default="ce")
    train.add_argument("--mode", choices=TRAINING_MODES, default="straight_through")
    train.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank too (0: none)")
    train.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj")
    train.add_argument("--no-merge", action="store_true",
                       help="keep the LoRA adapters separate (default: fold them into the base weights after training)")
    train.add_argument("--batch", type=int, default=8)
    train.add_argument("--length", type=int, default=128)
    train.add_argument("--eval-windows", type=int, default=32)
    train.add_argument("--checkpoint-every", type=int, default=0)
    train.add_argument("--resume", default=None, help="a checkpoint to continue from")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", required=True, help="folder for checkpoints and history.json")
    train.set_defaults(run=cmd_train)
    report = inner.add_parser("report", parents=[common], help="which layers each held-out sequence skips")
    report.add_argument("target")
    report.add_argument("--plan", default=None)
    report.add_argument("--routers", default=None, help="a checkpoint written by `layer-skip train`")
    report.add_argument("--threshold", type=float, default=None)
    report.add_argument("--budget", type=float, default=None)
    report.add_argument("--top-k", type=int, default=None, help="skip the k routed layers whose routers rank highest")
    report.add_argument("--sequences", type=int, default=8)
    report.add_argument("--length", type=int, default=128)
    report.set_defaults(run=cmd_report)
