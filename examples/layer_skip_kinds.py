"""Where could layer-skip routers gain on a mix of code and prose? Analyses on the language model of
`python -m examples.layer_skip --corpus mixed --lm-cache LM` (trained first if LM does not exist).

    python -m examples.layer_skip_kinds --lm-cache lm.pt --out kinds.json          # sets per kind, budget split
    python -m examples.layer_skip_kinds --lm-cache lm.pt --temperatures 0.2,1.0,0.02 --out kinds.json
    python -m examples.layer_skip_kinds --tiny                                      # seconds: a smoke run

`sets`: per kind of text, the fixed sets of k = 1, 2, 3 blocks that cost the continuation least (mean
increase in nats per token over the full model), on training and on held-out windows; and, at 25%
skipped overall, whether splitting the budget unequally between the kinds (1 + 3 or 3 + 1 blocks
instead of 2 + 2, each kind's set chosen on its training windows) beats the equal split.
`--probe`: whether the routers' inputs (each block's input mean-pooled over the prompt) tell prose
from code: a linear probe per block fitted on training prompts, its accuracy on held-out prompts.
`temperatures`: set_cost routers trained at each label temperature, their top-k decisions on
training windows (where a setting may be chosen) and held-out windows, paired against the static
set best on training text.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

import rewrite
from examples import layer_skip as ex
from rewrite.routing.evaluation import continuation_perplexity, skip_set_losses
from rewrite.routing.training import RouterTrainingConfig, train_routers


def _model(s: ex.Settings, corpus: Any, lm_cache: Path | None) -> torch.nn.Module:
    torch.manual_seed(s.seed)
    model = ex.byte_llama(s.layers, s.dim, s.heads)
    if lm_cache is not None and lm_cache.exists():
        model.load_state_dict(torch.load(lm_cache, map_location="cpu"))
    else:
        ex.pretrain(model, corpus, s, log=False)
        if lm_cache is not None:
            torch.save(model.state_dict(), lm_cache)
    return model.eval()


def _index(kinds: list[str], kind: str) -> torch.Tensor:
    return torch.tensor([i for i, w in enumerate(kinds) if kind in ("all", w)])


def sets_by_kind(model: torch.nn.Module, corpus: Any, s: ex.Settings, top: int = 5) -> dict[str, Any]:
    """Cheapest fixed sets per kind and k, and the budget split between kinds at the target rate."""
    om = rewrite.optimize(model, {"passes": [{"layer_skip": {}}]},
                          example_kwargs={"input_ids": torch.zeros(2, 16, dtype=torch.long)})
    n_skip = round(s.target_skip * s.layers)
    ks = sorted({max(1, n_skip - 1), n_skip, min(s.layers - 1, n_skip + 1)})
    out: dict[str, Any] = {"cheapest": {}}
    data: dict[tuple[str, str, int], Any] = {}
    for split in ("train", "heldout"):
        windows, kinds = ex.evaluation_windows(corpus, s, split, "spread")
        for k in ks:
            losses = skip_set_losses(om, windows, s.prompt_length, k)
            tokens = losses.continuation_tokens
            for kind in corpus.kinds:
                idx = _index(kinds, kind)
                rise = (losses.continuation[idx].sum(0) - losses.full_continuation[idx].sum()) / (idx.numel() * tokens)
                data[(split, kind, k)] = (rise, losses.continuation[idx], losses.full_continuation[idx], tokens)
                out["cheapest"][f"{split} {kind} k={k}"] = [
                    [list(losses.combos[c]), rise[c].item()] for c in rise.argsort()[:top].tolist()
                ]
    splits: dict[str, Any] = {}
    if len(corpus.kinds) == 2:
        for a in ks:
            b = 2 * n_skip - a
            if b not in ks:
                continue
            row = {}
            for split in ("train", "heldout"):
                total = full = count = 0.0
                for kind, k in zip(corpus.kinds, (a, b), strict=True):
                    best = int(data[("train", kind, k)][0].argmin())  # chosen on training windows
                    _, cont, full_cont, tokens = data[(split, kind, k)]
                    total += cont[:, best].sum().item()
                    full += full_cont.sum().item()
                    count += cont.shape[0] * tokens
                row[split] = {"perplexity": math.exp(total / count), "increase": math.exp((total - full) / count) - 1}
            splits[f"{corpus.kinds[0]} {a} + {corpus.kinds[1]} {b}"] = row
    out["budget_split"] = splits
    return out


def kind_probe(model: torch.nn.Module, corpus: Any, s: ex.Settings) -> list[float]:
    """Per routed block, the held-out accuracy of a linear probe telling prose from code on the block's
    input mean-pooled over the prompt (what a router reads), fitted on the training windows' prompts."""

    def pooled(windows: torch.Tensor) -> torch.Tensor:
        parts = []
        with torch.no_grad():
            for i in range(0, windows.shape[0], 32):
                out = model(input_ids=windows[i : i + 32, : s.prompt_length], output_hidden_states=True)
                parts.append(torch.stack([h.mean(1) for h in out.hidden_states[: s.layers]], 1))
        return torch.cat(parts)  # [N, layers, D]: the input of each block

    (train, train_kinds), (held, held_kinds) = (ex.evaluation_windows(corpus, s, split, "spread") for split in ("train", "heldout"))
    y_train = torch.tensor([k == "prose" for k in train_kinds]).float()
    y_held = torch.tensor([k == "prose" for k in held_kinds]).float()
    f_train, f_held = pooled(train), pooled(held)
    return [_probe(f_train[:, layer], y_train, f_held[:, layer], y_held) for layer in range(s.layers)]


def _probe(x: torch.Tensor, y: torch.Tensor, x_held: torch.Tensor, y_held: torch.Tensor) -> float:
    """Held-out accuracy of an L2-regularised logistic regression on standardised features."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=200)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = ((x - mean) / std) @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + 1e-3 * w.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return ((((x_held - mean) / std) @ w + b > 0).float() == y_held).float().mean().item()


def temperatures(model: torch.nn.Module, corpus: Any, s: ex.Settings, values: list[float]) -> dict[str, Any]:
    """set_cost routers per label temperature, top-k against the static set best on training text."""
    n_skip = round(s.target_skip * s.layers)
    windows = {split: ex.evaluation_windows(corpus, s, split, "spread") for split in ("train", "heldout")}
    out: dict[str, Any] = {}
    static: dict[str, Any] = {}
    for t in values:
        generator = torch.Generator().manual_seed(s.seed + 1)
        om = train_routers(
            model, lambda step, generator=generator: corpus.batches(s.batch, s.length, generator=generator),
            RouterTrainingConfig(steps=s.set_cost_steps, lr=s.router_lr, target_skip=s.target_skip, loss="set_cost",
                                 mode=s.router_mode, prompt_length=s.prompt_length, label_temperature=t, progress=False),
        ).module
        if not static:
            train_windows = windows["train"][0]
            losses = skip_set_losses(om, train_windows, s.prompt_length, n_skip)
            static["set"] = list(losses.combos[int(losses.continuation.sum(0).argmin())])
        rows: dict[str, Any] = {}
        for split, (w, kinds) in windows.items():
            if split not in static:
                static[split] = continuation_perplexity(om, w, s.prompt_length, static_skip=static["set"])
            routed = continuation_perplexity(om, w, s.prompt_length, top_k=n_skip)
            tokens = w.shape[1] - s.prompt_length
            assert routed.window_losses is not None and static[split].window_losses is not None
            for kind in ("all", *corpus.kinds):
                idx = _index(kinds, kind)
                mine, theirs = routed.window_losses[idx], static[split].window_losses[idx]
                rows[f"{split} {kind}"] = {
                    "perplexity": math.exp(mine.sum().item() / (idx.numel() * tokens)),
                    "static_perplexity": math.exp(theirs.sum().item() / (idx.numel() * tokens)),
                    "vs_static": ex._paired((mine - theirs) / tokens),
                    "distinct_sets": ex._distinct(routed.decisions[idx]),
                }
        out[f"{t:g}"] = rows
    return {"static": static["set"], "by_temperature": out}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--lm-cache", type=Path)
    parser.add_argument("--temperatures", default="", help="comma-separated label temperatures (empty: skip)")
    parser.add_argument("--no-sets", action="store_true", help="skip the per-kind sets analysis")
    parser.add_argument("--probe", action="store_true", help="linear probe: do the routers' inputs tell the kinds apart?")
    parser.add_argument("--spread-windows", type=int, default=512)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    s = replace(ex.TINY if args.tiny else ex.Settings(), corpus="mixed", spread_windows=args.spread_windows)
    if args.tiny:
        s = replace(s, spread_windows=8)
    corpus = ex.load_corpus(s.corpus)
    model = _model(s, corpus, args.lm_cache)
    result: dict[str, Any] = {"settings": asdict(s), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if not args.no_sets:
        result["sets"] = sets_by_kind(model, corpus, s)
    if args.probe:
        result["kind_probe_accuracy"] = kind_probe(model, corpus, s)
        print("held-out accuracy of a linear probe (prose vs code) per block input:",
              " ".join(f"{a:.3f}" for a in result["kind_probe_accuracy"]))
    if args.temperatures:
        result["temperatures"] = temperatures(model, corpus, s, [float(t) for t in args.temperatures.split(",")])
    for name, rows in result.get("sets", {}).get("cheapest", {}).items():
        print(name, ", ".join(f"{c} {r:+.4f}" for c, r in rows))
    for name, row in result.get("sets", {}).get("budget_split", {}).items():
        print(name, ", ".join(f"{split} {v['increase']:+.2%}" for split, v in row.items()))
    for t, rows in result.get("temperatures", {}).get("by_temperature", {}).items():
        for name, r in rows.items():
            print(f"T={t} {name}: top-k {r['perplexity']:.4f} static {r['static_perplexity']:.4f} "
                  "vs static {:+.4f} [{:+.4f}, {:+.4f}]".format(*r["vs_static"]))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
