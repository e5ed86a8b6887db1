"""Layer skipping end to end: train a small byte-level Llama on real text, add routers, train them,
and compare held-out perplexity with the full model and with a static baseline at the same skip rate.

    python -m examples.layer_skip                 # the evidence run (a few minutes on a CPU)
    python -m examples.layer_skip --tiny          # seconds: a smoke run of every step
    python -m examples.layer_skip --out result.json

The text is the Python standard library's own sources (rewrite.text_corpus.ByteCorpus): no download.
The language model is trained with per-sequence layer drop, so that skipping a layer is something it
has seen. Evaluation decides from a prompt and scores only the continuation (see
rewrite.routing.evaluation); the static baseline is the best fixed set of the same number of layers.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from rewrite.routing.evaluation import (
    Evaluation,
    best_static_skip,
    calibrate_threshold,
    continuation_perplexity,
)
from rewrite.routing.language_model import logits_of, next_token_loss
from rewrite.routing.training import RouterTrainingConfig, train_routers
from rewrite.text_corpus import VOCAB_SIZE, ByteCorpus


@dataclass
class Settings:
    """Sizes and step counts of one run."""

    layers: int = 8
    dim: int = 128
    heads: int = 4
    length: int = 128
    batch: int = 16
    pretrain_steps: int = 700
    pretrain_lr: float = 3e-3
    layer_drop: float = 0.15
    router_steps: int = 400
    router_lr: float = 2e-2
    target_skip: float = 0.25
    router_target: float = 0.3
    router_loss: str = "distill"
    router_mode: str = "straight_through"
    eval_windows: int = 96
    prompt_length: int = 64
    seed: int = 0


TINY = Settings(layers=4, dim=32, heads=2, length=32, batch=4, pretrain_steps=6, router_steps=4, eval_windows=8, prompt_length=16)


def byte_llama(layers: int, dim: int, heads: int) -> torch.nn.Module:
    """A Hugging Face Llama with a byte vocabulary, randomly initialised."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=dim, intermediate_size=3 * dim, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024, tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    return transformers.LlamaForCausalLM(config)


def target(layers: int = 4, dim: int = 32, heads: int = 2, length: int = 16) -> tuple[torch.nn.Module, dict]:
    """A byte-level Llama and example inputs, for `rewrite layer-skip train examples.layer_skip:target`."""
    torch.manual_seed(0)
    return byte_llama(layers, dim, heads).eval(), {"input_ids": torch.zeros(2, length, dtype=torch.long)}


def _layer_drop_hook(p: float):
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        if not module.training:
            return out
        hidden = args[0] if args else kwargs["hidden_states"]
        result = out if isinstance(out, torch.Tensor) else out[0]
        drop = torch.rand(hidden.shape[0], 1, 1, device=hidden.device) < p
        kept = torch.where(drop, hidden, result)
        return kept if isinstance(out, torch.Tensor) else (kept, *out[1:])

    return hook


def pretrain(model: torch.nn.Module, corpus: ByteCorpus, s: Settings, log: bool) -> list[float]:
    """Next-byte training with per-sequence layer drop; returns the loss every 50 steps."""
    generator = torch.Generator().manual_seed(s.seed)
    handles = [layer.register_forward_hook(_layer_drop_hook(s.layer_drop), with_kwargs=True) for layer in model.model.layers]
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.pretrain_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, s.pretrain_lr, total_steps=s.pretrain_steps, pct_start=0.1)
    losses = []
    model.train()
    try:
        for step in range(s.pretrain_steps):
            batch = corpus.batches(s.batch, s.length, generator=generator)
            loss = next_token_loss(logits_of(model, batch[:, :-1], keyword=True), batch[:, 1:])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            if step % 50 == 0 or step == s.pretrain_steps - 1:
                losses.append(loss.item())
                if log:
                    print(f"pretrain {step + 1}/{s.pretrain_steps}: loss {loss.item():.3f}", flush=True)
    finally:
        for h in handles:
            h.remove()
    return losses


def _row(name: str, e: Evaluation, full: float) -> dict[str, Any]:
    return {"variant": name, "perplexity": e.perplexity, "skip_rate": e.skip_rate, "increase": e.perplexity / full - 1}


def run(s: Settings, *, log: bool = True, lm_cache: Path | None = None) -> dict[str, Any]:
    """Every step of the experiment; returns the results table and settings.

    With `lm_cache`, the trained language model is loaded from that file if it exists, else saved there.
    """
    torch.manual_seed(s.seed)
    began = time.perf_counter()
    corpus = ByteCorpus.load()
    model = byte_llama(s.layers, s.dim, s.heads)
    if lm_cache is not None and lm_cache.exists():
        model.load_state_dict(torch.load(lm_cache, map_location="cpu"))
        losses: list[float] = []
    else:
        losses = pretrain(model, corpus, s, log)
        if lm_cache is not None:
            lm_cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), lm_cache)
    model.eval()
    generator = torch.Generator().manual_seed(s.seed + 1)
    trained = train_routers(
        model,
        lambda step: corpus.batches(s.batch, s.length, generator=generator),
        RouterTrainingConfig(
            steps=s.router_steps, lr=s.router_lr, target_skip=s.router_target, loss=s.router_loss,
            mode=s.router_mode, progress=log, log_every=25,
        ),
    )
    om = trained.module
    windows = corpus.sequential(s.length, split="heldout", limit=s.eval_windows)
    full = continuation_perplexity(om, windows, s.prompt_length, threshold=math.inf)
    n_skip = round(s.target_skip * s.layers)
    # the threshold is calibrated on training text to the target rate, as the static layers are chosen there
    selection = corpus.sequential(s.length, split="train", limit=s.eval_windows)
    calibrated = calibrate_threshold(om, selection, s.prompt_length, n_skip / s.layers)
    budget = continuation_perplexity(om, windows, s.prompt_length, budget=n_skip / s.layers)
    threshold = continuation_perplexity(om, windows, s.prompt_length, threshold=calibrated)
    default = continuation_perplexity(om, windows, s.prompt_length, threshold=0.5)
    # the static layers are chosen on training text, as the routers are trained on it ...
    static_layers, _ = best_static_skip(om, selection, s.prompt_length, n_skip)
    static = continuation_perplexity(om, windows, s.prompt_length, static_skip=static_layers)
    # ... and, as an upper bound for any static choice, on the held-out text itself
    oracle_layers, oracle = best_static_skip(om, windows, s.prompt_length, n_skip)
    rows = [
        _row("full model", full, full.perplexity),
        _row(f"routed, budget {n_skip}/{s.layers} per sequence", budget, full.perplexity),
        _row(f"routed, threshold {calibrated:.3f} (calibrated)", threshold, full.perplexity),
        _row("routed, threshold 0.5", default, full.perplexity),
        _row(f"static {static_layers} (best on training text)", static, full.perplexity),
        _row(f"static {oracle_layers} (best on the held-out text)", oracle, full.perplexity),
    ]
    distinct = {tuple(r) for r in budget.decisions.int().tolist()}
    return {
        "settings": asdict(s),
        "pretrain_losses": losses,
        "router_history_last": trained.history[-1],
        "rows": rows,
        "routed_distinct_layer_sets": len(distinct),
        "calibrated_threshold": calibrated,
        "seconds": time.perf_counter() - began,
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"{'variant':<52} {'ppl':>8} {'skipped':>8} {'ppl increase':>13}")
    for r in result["rows"]:
        print(f"{r['variant']:<52} {r['perplexity']:>8.4f} {r['skip_rate']:>8.1%} {r['increase']:>13.2%}")
    print(f"routed sequences used {result['routed_distinct_layer_sets']} different layer sets; {result['seconds']:.0f} s")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the experiment, print the table, write JSON to --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke run in seconds")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--lm-cache", type=Path, help="load the trained LM from this file, or save it there")
    for name, value in asdict(Settings()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=None)
    args = parser.parse_args(argv)
    base = TINY if args.tiny else Settings()
    overrides = {k: v for k, v in vars(args).items() if k in asdict(base) and v is not None}
    settings = Settings(**{**asdict(base), **overrides})
    result = run(settings, log=not args.tiny, lm_cache=args.lm_cache)
    print_table(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
