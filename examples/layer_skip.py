"""Layer skipping end to end: train a small byte-level Llama on real text, add routers, train them,
and compare held-out perplexity with the full model and with a static baseline at the same skip rate.

    python -m examples.layer_skip                 # the evidence run (about 15 minutes on one CPU thread)
    python -m examples.layer_skip --tiny          # seconds: a smoke run of every step
    python -m examples.layer_skip --out result.json

The text is the Python standard library's own sources (rewrite.text_corpus.ByteCorpus): no download.
The language model is trained with per-sequence layer drop, so that skipping a layer is something it
has seen. Routers are trained once per loss in `router_loss` (distill, set_cost). Evaluation decides
from a prompt and scores only the continuation (see rewrite.routing.evaluation); the static baseline
is the best fixed set of the same number of layers; per-sequence oracles built from every set's
losses (`skip_set_losses`) show how much any per-sequence choice could gain.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from rewrite.routing.evaluation import (
    Evaluation,
    SkipSetLosses,
    calibrate_threshold,
    continuation_perplexity,
    skip_set_losses,
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
    router_loss: str = "distill,set_cost"
    """one routed model per loss, comma-separated (rewrite.routing.training.LOSSES)"""
    set_cost_steps: int = 150
    label_temperature: float = 0.02
    router_mode: str = "straight_through"
    eval_windows: int = 96
    spread_windows: int = 256
    eval_layout: str = "both"
    """first: the first eval_windows windows of each split; spread: spread evenly over it; both"""
    prompt_length: int = 64
    seed: int = 0


TINY = Settings(
    layers=4, dim=32, heads=2, length=32, batch=4, pretrain_steps=6, router_steps=4, set_cost_steps=2, eval_windows=8,
    spread_windows=8, prompt_length=16,
)


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


def _row(name: str, e: Evaluation | tuple[float, float], full: float, **extra: Any) -> dict[str, Any]:
    ppl, rate = (e.perplexity, e.skip_rate) if isinstance(e, Evaluation) else e
    return {"variant": name, "perplexity": ppl, "skip_rate": rate, "increase": ppl / full - 1, **extra}


def _distinct(decisions: torch.Tensor) -> int:
    return len({tuple(r) for r in decisions.int().tolist()})


def evaluation_windows(corpus: ByteCorpus, s: Settings, split: str, layout: str) -> torch.Tensor:
    """Windows of a split: the first `s.eval_windows` ("first": a few files), or `s.spread_windows`
    spread evenly over the whole split ("spread": every part of it)."""
    if layout == "first":
        return corpus.sequential(s.length, split=split, limit=s.eval_windows)
    windows = corpus.sequential(s.length, split=split)
    return windows[torch.linspace(0, windows.shape[0] - 1, min(s.spread_windows, windows.shape[0])).round().long()]


def oracle_rows(selection: SkipSetLosses, held: SkipSetLosses, s: Settings, n_routed: int) -> tuple[list[dict], dict]:
    """Static and per-sequence choices of a fixed set of blocks, from every set's losses.

    static: the set best on training text, and the set best on the held-out text (an upper bound for
    static choices); per-sequence oracles: the set whose skipping hurts the sequence's own prompt
    least (a decision made on the prompt, as a router's), the same with the training text's mean
    cost added as a prior (weight chosen on training text), and the set best on the continuation
    itself (an upper bound for any per-sequence choice of sets).
    """
    n = held.continuation.shape[0]
    full = held.full_perplexity()
    static = int(selection.continuation.sum(0).argmin())
    static_held = int(held.continuation.sum(0).argmin())
    tokens = selection.prompt.shape[0] * (s.prompt_length - 1 + selection.continuation_tokens)
    prior = (selection.prompt.sum(0) + selection.continuation.sum(0)) / tokens

    def by_prompt(losses: SkipSetLosses, weight: float) -> torch.Tensor:
        return (losses.prompt / (s.prompt_length - 1) + weight * prior).argmin(1)

    weight = min(PRIOR_WEIGHTS, key=lambda w: selection.perplexity(by_prompt(selection, w)))
    rate = len(held.combos[0]) / n_routed
    rows = []
    for name, choice in [
        (f"static {list(held.combos[static])} (best on training text)", torch.full((n,), static)),
        (f"static {list(held.combos[static_held])} (best on the held-out text)", torch.full((n,), static_held)),
        ("oracle: per sequence, the set cheapest on its prompt", by_prompt(held, 0.0)),
        (f"oracle: per sequence, prompt cost + {weight:g} x training prior", by_prompt(held, weight)),
        ("oracle: per sequence, the set cheapest on its continuation (upper bound)", held.continuation.argmin(1)),
    ]:
        rows.append(_row(name, (held.perplexity(choice), rate), full, distinct_sets=len(set(choice.tolist()))))
    return rows, {"static": list(held.combos[static]), "prior_weight": weight}


PRIOR_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


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
    n_skip = round(s.target_skip * s.layers)
    routed: dict[str, Any] = {}
    for loss in s.router_loss.split(","):
        generator = torch.Generator().manual_seed(s.seed + 1)
        set_cost = loss == "set_cost"
        trained = train_routers(
            model,
            lambda step, generator=generator: corpus.batches(s.batch, s.length, generator=generator),
            RouterTrainingConfig(
                steps=s.set_cost_steps if set_cost else s.router_steps, lr=s.router_lr,
                target_skip=s.target_skip if set_cost else s.router_target, loss=loss, mode=s.router_mode,
                prompt_length=s.prompt_length, label_temperature=s.label_temperature, progress=log, log_every=25,
            ),
        )
        routed[loss] = trained
    layouts = ["first", "spread"] if s.eval_layout == "both" else [s.eval_layout]
    tables: dict[str, Any] = {}
    for layout in layouts:
        windows = evaluation_windows(corpus, s, "heldout", layout)
        selection = evaluation_windows(corpus, s, "train", layout)
        any_module = next(iter(routed.values())).module
        held_losses = skip_set_losses(any_module, windows, s.prompt_length, n_skip)
        selection_losses = skip_set_losses(any_module, selection, s.prompt_length, n_skip)
        full = held_losses.full_perplexity()
        rows = [_row("full model", (full, 0.0), full)]
        for loss, trained in routed.items():
            om = trained.module
            # the threshold is calibrated on training text to the target rate, as the static layers are chosen there
            calibrated = calibrate_threshold(om, selection, s.prompt_length, n_skip / s.layers)
            for name, e in [
                (f"routed ({loss}), top {n_skip}/{s.layers} of the routers on the full prompt",
                 continuation_perplexity(om, windows, s.prompt_length, top_k=n_skip)),
                (f"routed ({loss}), budget {n_skip}/{s.layers} in layer order",
                 continuation_perplexity(om, windows, s.prompt_length, budget=n_skip / s.layers)),
                (f"routed ({loss}), threshold {calibrated:.3f} (calibrated)",
                 continuation_perplexity(om, windows, s.prompt_length, threshold=calibrated)),
                (f"routed ({loss}), threshold 0.5", continuation_perplexity(om, windows, s.prompt_length, threshold=0.5)),
            ]:
                rows.append(_row(name, e, full, distinct_sets=_distinct(e.decisions)))
        static_rows, chosen = oracle_rows(selection_losses, held_losses, s, n_routed=s.layers)
        rows += static_rows
        tables[layout] = {"rows": rows, **chosen}
    return {
        "settings": asdict(s),
        "torch": torch.__version__,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "pretrain_losses": losses,
        "router_history_last": {loss: t.history[-1] for loss, t in routed.items()},
        "tables": tables,
        "rows": tables[layouts[0]]["rows"],
        "seconds": time.perf_counter() - began,
    }


def print_table(result: dict[str, Any]) -> None:
    """The results, one table per layout of evaluation windows."""
    for layout, table in result["tables"].items():
        print(f"\n{layout} windows:")
        print(f"{'variant':<72} {'ppl':>8} {'skipped':>8} {'ppl increase':>13} {'sets':>5}")
        for r in table["rows"]:
            sets = r.get("distinct_sets", "")
            print(f"{r['variant']:<72} {r['perplexity']:>8.4f} {r['skip_rate']:>8.1%} {r['increase']:>13.2%} {sets:>5}")
    print(f"{result['seconds']:.0f} s")


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
