"""Layer skipping end to end: train a small byte-level Llama on real text, add routers, train them,
and compare held-out perplexity with the full model and with a static baseline at the same skip rate.

    python -m examples.layer_skip                 # the evidence run (about 15 minutes on one CPU thread)
    python -m examples.layer_skip --tiny          # seconds: a smoke run of every step
    python -m examples.layer_skip --out result.json

The text is the Python standard library's own sources (rewrite.text_corpus.ByteCorpus): no download;
`--corpus mixed` adds the Python reference documentation (English prose, `pydoc_data.topics`), each
window one kind, half of each, and reports every table also per kind.
The language model is trained with per-sequence layer drop, so that skipping a layer is something it
has seen. Routers are trained once per loss in `router_loss` (distill, set_cost). Evaluation decides
from a prompt and scores only the continuation (see rewrite.routing.evaluation); the static baseline
is the best fixed set of the same number of layers; per-sequence oracles built from every set's
losses (`skip_set_losses`) show how much any per-sequence choice could gain.
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
    SkipSetLosses,
    calibrate_threshold,
    continuation_perplexity,
    skip_set_losses,
)
from rewrite.routing.language_model import logits_of, next_token_loss
from rewrite.routing.prompt_choice import PRIOR_WEIGHTS
from rewrite.routing.training import RouterTrainingConfig, train_routers
from rewrite.text_corpus import MIXED_RATIO, VOCAB_SIZE, ByteCorpus


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
    corpus: str = "code"
    """code: the standard library's sources; mixed: those and the reference documentation (prose)"""


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


@dataclass
class Variant:
    """One way of choosing skips, evaluated per held-out window."""

    name: str
    losses: torch.Tensor
    """[N] summed next-token loss of each window's continuation"""
    decisions: torch.Tensor
    """[N, n_routed] bool"""


def _distinct(decisions: torch.Tensor) -> int:
    return len({tuple(r) for r in decisions.int().tolist()})


def _paired(diff: torch.Tensor, draws: int = 2000) -> list[float]:
    """Mean of per-window differences and its 95% bootstrap interval (fixed seed)."""
    generator = torch.Generator().manual_seed(0)
    picks = torch.randint(0, diff.numel(), (draws, diff.numel()), generator=generator)
    means = diff[picks].mean(1)
    return [diff.mean().item(), means.quantile(0.025).item(), means.quantile(0.975).item()]


def table_rows(variants: list[Variant], index: torch.Tensor, tokens: int, static: Variant) -> list[dict[str, Any]]:
    """Rows over the windows `index`: perplexity, skip rate and increase over the full model (variants[0]),
    distinct skip sets, and the per-window difference from `static` (nats per continuation token: mean
    and 95% bootstrap interval; negative is better than static)."""
    full = math.exp(variants[0].losses[index].sum().item() / (index.numel() * tokens))
    rows = []
    for v in variants:
        ppl = math.exp(v.losses[index].sum().item() / (index.numel() * tokens))
        row: dict[str, Any] = {"variant": v.name, "perplexity": ppl, "skip_rate": v.decisions[index].float().mean().item(),
                               "increase": ppl / full - 1}
        if v is not variants[0]:
            row["distinct_sets"] = _distinct(v.decisions[index])
            if v is not static:
                row["vs_static"] = _paired((v.losses[index] - static.losses[index]) / tokens)
        rows.append(row)
    return rows


def _counts(total: int, mix: tuple[float, ...]) -> list[int]:
    counts = [round(m * total) for m in mix[:-1]]
    return [*counts, total - sum(counts)]


def evaluation_windows(corpus: ByteCorpus, s: Settings, split: str, layout: str) -> tuple[torch.Tensor, list[str]]:
    """Windows of a split and the kind of each: the first `s.eval_windows` ("first": a few documents),
    or `s.spread_windows` spread evenly over the whole split ("spread": every part of it). With several
    kinds each kind gets its share of the windows by the corpus's mixing ratio, taken from its own
    stream the same way (a fixed proportion, code windows first)."""
    total = s.eval_windows if layout == "first" else s.spread_windows
    kinds = corpus.kinds
    counts = _counts(total, corpus.mix) if corpus.mix is not None else [total]
    parts = []
    for kind, count in zip(kinds, counts, strict=True):
        if layout == "first":
            parts.append(corpus.sequential(s.length, split=split, limit=count, kind=kind))
            continue
        windows = corpus.sequential(s.length, split=split, kind=kind)
        parts.append(windows[torch.linspace(0, windows.shape[0] - 1, min(count, windows.shape[0])).round().long()])
    return torch.cat(parts), [k for k, p in zip(kinds, parts, strict=True) for _ in range(p.shape[0])]


def oracle_choices(
    selection: SkipSetLosses, held: SkipSetLosses, s: Settings, selection_kinds: list[str], held_kinds: list[str]
) -> tuple[list[tuple[str, torch.Tensor]], dict]:
    """Static and per-sequence choices of a fixed set of blocks (an index into `held.combos` per window).

    static: the set best on training text, and the set best on the held-out text (an upper bound for
    static choices); with several kinds of text, the set best on each kind's training text applied to
    windows of that kind (the kind known: what a router that only tells the kinds apart could do);
    per-sequence oracles: the set whose skipping hurts the sequence's own prompt least (a decision made
    on the prompt, as a router's), the same with the training text's mean cost added as a prior
    (weight chosen on training text), and the set best on the continuation itself (an upper bound for
    any per-sequence choice of sets).
    """
    n = held.continuation.shape[0]
    static = int(selection.continuation.sum(0).argmin())
    static_held = int(held.continuation.sum(0).argmin())
    tokens = selection.prompt.shape[0] * (s.prompt_length - 1 + selection.continuation_tokens)
    prior = (selection.prompt.sum(0) + selection.continuation.sum(0)) / tokens

    def by_prompt(losses: SkipSetLosses, weight: float) -> torch.Tensor:
        return (losses.prompt / (s.prompt_length - 1) + weight * prior).argmin(1)

    weight = min(PRIOR_WEIGHTS, key=lambda w: selection.perplexity(by_prompt(selection, w)))
    choices = [
        (f"static {list(held.combos[static])} (best on training text)", torch.full((n,), static)),
        (f"static {list(held.combos[static_held])} (best on the held-out text)", torch.full((n,), static_held)),
    ]
    chosen: dict[str, Any] = {"static": list(held.combos[static]), "prior_weight": weight}
    kinds = sorted(set(held_kinds))
    if len(kinds) > 1:
        per_kind = {}
        for kind in kinds:
            rows = torch.tensor([k == kind for k in selection_kinds])
            per_kind[kind] = int(selection.continuation[rows].sum(0).argmin())
        name = ", ".join(f"{k} {list(held.combos[c])}" for k, c in per_kind.items())
        choices.append((f"static per kind: {name} (each best on its kind's training text)",
                        torch.tensor([per_kind[k] for k in held_kinds])))
        chosen["static_per_kind"] = {k: list(held.combos[c]) for k, c in per_kind.items()}
    choices += [
        ("oracle: per sequence, the set cheapest on its prompt", by_prompt(held, 0.0)),
        (f"oracle: per sequence, prompt cost + {weight:g} x training prior", by_prompt(held, weight)),
        ("oracle: per sequence, the set cheapest on its continuation (upper bound)", held.continuation.argmin(1)),
    ]
    return choices, chosen


CORPORA = {"code": ("code",), "mixed": ("code", "prose")}


def load_corpus(name: str) -> ByteCorpus:
    """`code`: the standard library's sources; `mixed`: those and the reference documentation (prose),
    each window one kind, half of them of each (rewrite.text_corpus.MIXED_RATIO)."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose from {', '.join(CORPORA)}")
    return ByteCorpus.load() if name == "code" else ByteCorpus.load(kinds=CORPORA[name], mix=MIXED_RATIO)


def run(s: Settings, *, log: bool = True, lm_cache: Path | None = None) -> dict[str, Any]:
    """Every step of the experiment; returns the results table and settings.

    With `lm_cache`, the trained language model is loaded from that file if it exists, else saved there.
    """
    torch.manual_seed(s.seed)
    began = time.perf_counter()
    corpus = load_corpus(s.corpus)
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
        windows, held_kinds = evaluation_windows(corpus, s, "heldout", layout)
        selection, selection_kinds = evaluation_windows(corpus, s, "train", layout)
        any_module = next(iter(routed.values())).module
        held_losses = skip_set_losses(any_module, windows, s.prompt_length, n_skip)
        selection_losses = skip_set_losses(any_module, selection, s.prompt_length, n_skip)
        tokens = held_losses.continuation_tokens
        nothing = torch.zeros(windows.shape[0], s.layers, dtype=torch.bool)
        variants = [Variant("full model", held_losses.full_continuation, nothing)]
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
                assert e.window_losses is not None
                variants.append(Variant(name, e.window_losses, e.decisions))
        choices, chosen = oracle_choices(selection_losses, held_losses, s, selection_kinds, held_kinds)
        static_at = len(variants)
        for name, choice in choices:
            picked = held_losses.continuation.gather(1, choice.long()[:, None]).squeeze(1)
            variants.append(Variant(name, picked, held_losses.decisions(choice, s.layers)))
        static = variants[static_at]
        everything = torch.arange(windows.shape[0])
        table: dict[str, Any] = {"rows": table_rows(variants, everything, tokens, static), **chosen}
        kinds = sorted(set(held_kinds), key=corpus.kinds.index)
        if len(kinds) > 1:
            table["windows"] = {k: held_kinds.count(k) for k in kinds}
            table["by_kind"] = {
                k: table_rows(variants, torch.tensor([i for i, w in enumerate(held_kinds) if w == k]), tokens, static)
                for k in kinds
            }
        tables[layout] = table
    return {
        "settings": asdict(s),
        "torch": torch.__version__,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "corpus": {"kinds": list(corpus.kinds), "mix": list(corpus.mix or (1.0,)),
                   "train_bytes": list(corpus.train_sizes or (corpus.train.numel(),)),
                   "heldout_bytes": list(corpus.heldout_sizes or (corpus.heldout.numel(),))},
        "pretrain_losses": losses,
        "router_history_last": {loss: t.history[-1] for loss, t in routed.items()},
        "tables": tables,
        "rows": tables[layouts[0]]["rows"],
        "seconds": time.perf_counter() - began,
    }


def print_table(result: dict[str, Any]) -> None:
    """The results, one table per layout of evaluation windows (and per kind of text when mixed)."""
    for layout, table in result["tables"].items():
        parts = [("", table["rows"])] + [(f", {k} windows only", rows) for k, rows in table.get("by_kind", {}).items()]
        for suffix, rows in parts:
            counts = ", ".join(f"{k} {n}" for k, n in table["windows"].items()) if "windows" in table else ""
            print(f"\n{layout} windows{suffix}" + (f" (of {counts})" if counts and not suffix else "") + ":")
            print(f"{'variant':<80} {'ppl':>8} {'skipped':>8} {'increase':>9} {'sets':>5} {'vs static [95%]':>26}")
            for r in rows:
                sets = r.get("distinct_sets", "")
                vs = "{:+.4f} [{:+.4f}, {:+.4f}]".format(*r["vs_static"]) if "vs_static" in r else ""
                print(f"{r['variant']:<80} {r['perplexity']:>8.4f} {r['skip_rate']:>8.1%} {r['increase']:>9.2%} {sets:>5} {vs:>26}")
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
