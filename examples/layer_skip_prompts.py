"""Does a longer prompt let a per-sequence choice of skipped layers beat the static choice?

    python -m examples.layer_skip_prompts --lm-cache lm512.pt --out prompts.json   # 64, 192, 448-byte prompts
    python -m examples.layer_skip_prompts --tiny                                   # seconds: a smoke run

One byte-level Llama (the evidence run's sizes, `examples.layer_skip`) is trained on windows as long
as the longest prompt plus the continuation, so that every prompt length is scored by the same model.
Held-out and training windows are taken at that longest length (spread evenly over each split); for a
prompt of P bytes each window keeps its last P + continuation + 1 bytes. The scored continuation is
the same bytes at every prompt length: only how much of the text before it the decision may read
changes. Per prompt length, with every fixed set of k = target_skip x layers blocks skipped
(`skip_set_losses`): the static set best on training text (the baseline), the per-sequence oracles of
the evidence run (the set cheapest on the prompt's own tokens; that with the training text's mean cost
as a prior; the set cheapest on the continuation, an upper bound), each paired per window against
static (nats per continuation token, mean and 95% bootstrap interval).

`--prompt-choice all,8`: the decision of `rewrite.routing.prompt_choice` (each held-out prompt run once per
candidate set, the set of lowest prompt cost + weighted prior kept; calibrated on the training windows), with
every set and with the 8 of lowest prior as candidates, scored from the same continuation losses.

`--fit-routers`: linear routers on each block's input mean-pooled over the prompt (what a router
reads), fitted (L2-regularised logistic regression) to set_cost's labels (the weight of the sets
holding the block, `set_cost_labels`) on the training windows, ranked top k on held-out prompts;
their sets are scored from the same losses (no more forwards). `--train-routers P`: routers trained
through `train_routers` (losses in `--router-loss`) at prompt length P, top k on the held-out windows.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

import rewrite
from examples import layer_skip as ex
from examples.layer_skip_kinds import _model
from rewrite.routing.evaluation import SkipSetLosses, continuation_perplexity, skip_set_losses
from rewrite.routing.prompt_choice import calibrate_prompt_choice, choose_skips_by_prompt
from rewrite.routing.training import RouterTrainingConfig, set_cost_labels, train_routers


def pooled_inputs(model: torch.nn.Module, prompts: torch.Tensor, layers: int, last: int = 0) -> torch.Tensor:
    """[N, layers, D]: each block's input mean-pooled over the prompt, nothing skipped (what a router reads);
    with `last`, over the prompt's last `last` positions only (the whole prompt still read as context)."""
    parts = []
    with torch.no_grad():
        for i in range(0, prompts.shape[0], 16):
            out = model(input_ids=prompts[i : i + 16], output_hidden_states=True)
            parts.append(torch.stack([h[:, -last:].mean(1) for h in out.hidden_states[:layers]], 1))
    return torch.cat(parts)


def update_sizes(model: torch.nn.Module, prompts: torch.Tensor, layers: int) -> torch.Tensor:
    """[N, layers, 2]: per block, over the prompt run with nothing skipped, the mean relative size of the block's
    update (|out - in| / |in| per position) and its mean cosine with the input: how much the block changes
    this text, read at prefill (the blocks run on the prompt anyway)."""
    seen: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        y = out if isinstance(out, torch.Tensor) else out[0]
        d = y - x
        size = (d.norm(dim=-1) / x.norm(dim=-1)).mean(1)
        cos = torch.nn.functional.cosine_similarity(d, x, dim=-1).mean(1)
        seen.append(torch.stack([size, cos], 1))

    handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in model.model.layers[:layers]]
    parts = []
    try:
        with torch.no_grad():
            for i in range(0, prompts.shape[0], 16):
                seen.clear()
                model(input_ids=prompts[i : i + 16])
                parts.append(torch.stack(seen, 1))
    finally:
        for h in handles:
            h.remove()
    return torch.cat(parts)


def fit_router(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logistic regression with soft labels on standardised features: (mean, std, w, b)."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=300)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * w.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return mean, std, w.detach(), b.detach()


def combo_index(decisions: torch.Tensor, combos: list[tuple[int, ...]]) -> torch.Tensor:
    """[N] index into `combos` of each row of [N, n] bool decisions."""
    lookup = {c: i for i, c in enumerate(combos)}
    return torch.tensor([lookup[tuple(int(j) for j in row.nonzero().flatten())] for row in decisions])


def fitted_router_choices(
    f_train: torch.Tensor, sel: SkipSetLosses, f_held: torch.Tensor, n_skip: int, temperature: float, l2: float
) -> torch.Tensor:
    """Top-k of linear routers fitted to set_cost labels on the training windows: a set index per held-out window."""
    layers = f_train.shape[1]
    labels = set_cost_labels(sel.continuation / sel.continuation_tokens, sel.combos, layers, temperature)
    scores = torch.empty(f_held.shape[0], layers)
    for layer in range(layers):
        mean, std, w, b = fit_router(f_train[:, layer], labels[:, layer], l2)
        scores[:, layer] = ((f_held[:, layer] - mean) / std) @ w + b
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :n_skip]
    decisions = torch.zeros(scores.shape, dtype=torch.bool).scatter_(1, order, True)
    return combo_index(decisions, sel.combos)


def headroom(losses: SkipSetLosses, prompt: int) -> dict[str, float]:
    """Per window, the gap (nats per continuation token) between its best and second-best set on the continuation;
    and how well a window's per-set costs on its prompt follow those on its continuation: the correlation of the
    two after removing each window's mean over sets and each set's mean over windows."""
    cont = losses.continuation / losses.continuation_tokens
    two = cont.sort(1).values[:, :2]
    gap = two[:, 1] - two[:, 0]

    def centred(x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean(1, keepdim=True)
        return x - x.mean(0)

    a, b = centred(losses.prompt / (prompt - 1)), centred(cont)
    return {"median_gap": gap.median().item(), "mean_gap": gap.mean().item(),
            "prompt_continuation_correlation": ((a * b).sum() / (a.norm() * b.norm())).item()}


def ridge_choices(f_train: torch.Tensor, sel: SkipSetLosses, f_held: torch.Tensor, lam: float) -> torch.Tensor:
    """Per held-out window, the set whose cost a ridge regression predicts lowest: each set's continuation cost
    (nats per token, less the window's mean over sets) regressed on every block's pooled input (standardised)."""
    x, xh = f_train.flatten(1), f_held.flatten(1)
    mean, std = x.mean(0), x.std(0) + 1e-6
    z, zh = (x - mean) / std, (xh - mean) / std
    y = sel.continuation / sel.continuation_tokens
    y = y - y.mean(1, keepdim=True)
    w = torch.linalg.solve(z.T @ z + lam * torch.eye(z.shape[1]), z.T @ (y - y.mean(0)))
    return (zh @ w + y.mean(0)).argmin(1)


def subset(losses: SkipSetLosses, index: torch.Tensor) -> SkipSetLosses:
    """The windows `index` of `losses`."""
    return SkipSetLosses(losses.combos, losses.prompt[index], losses.continuation[index], losses.full_prompt[index],
                         losses.full_continuation[index], losses.continuation_tokens)


def cross_validated(choose: Any, f_train: torch.Tensor, sel: SkipSetLosses, grid: list[Any], folds: int = 4) -> Any:
    """The setting of `grid` whose choices cost the training windows least when each fold is chosen for by a
    fit on the other folds (`choose(f_fit, losses_fit, f_val, setting)` -> a set index per window)."""
    n = f_train.shape[0]
    parts = [torch.arange(i, n, folds) for i in range(folds)]

    def cost(setting: Any) -> float:
        total = 0.0
        for i, val in enumerate(parts):
            fit = torch.cat([p for j, p in enumerate(parts) if j != i])
            choice = choose(f_train[fit], subset(sel, fit), f_train[val], setting)
            total += sel.continuation[val].gather(1, choice.long()[:, None]).sum().item()
        return total

    return min(grid, key=cost)


LOGISTIC_GRID = [(t, l2) for t in (0.02, 0.1, 0.5) for l2 in (1e-3, 1e-2, 1e-1, 1.0)]
RIDGE_GRID = [1e1, 1e2, 1e3, 1e4, 1e5]


def fitted_choices(
    f_train: torch.Tensor, sel: SkipSetLosses, f_held: torch.Tensor, n_skip: int, fit: dict[str, float], pooled: str
) -> tuple[list[tuple[str, torch.Tensor]], dict[str, Any]]:
    """Held-out choices of routers fitted on the training windows' pooled inputs: the fixed setting, the
    logistic routers' setting chosen by cross-validation on training windows, and the ridge cost regression."""
    layers = f_train.shape[1]

    def logistic(f: torch.Tensor, losses: SkipSetLosses, fh: torch.Tensor, setting: tuple[float, float]) -> torch.Tensor:
        return fitted_router_choices(f, losses, fh, n_skip, *setting)

    def ridge(f: torch.Tensor, losses: SkipSetLosses, fh: torch.Tensor, lam: float) -> torch.Tensor:
        return ridge_choices(f, losses, fh, lam)

    chosen_l = cross_validated(logistic, f_train, sel, LOGISTIC_GRID)
    chosen_r = cross_validated(ridge, f_train, sel, RIDGE_GRID)
    fixed = (fit["temperature"], fit["l2"])
    rows = [
        (f"linear routers, set_cost labels (T={fixed[0]:g}, l2={fixed[1]:g}), top {n_skip}/{layers}, {pooled}",
         logistic(f_train, sel, f_held, fixed)),
        (f"linear routers, set_cost labels, T={chosen_l[0]:g} l2={chosen_l[1]:g} by 4-fold CV on training, top {n_skip}, {pooled}",
         logistic(f_train, sel, f_held, chosen_l)),
        (f"ridge regression of every set's cost, lambda={chosen_r:g} by 4-fold CV on training, {pooled}",
         ridge(f_train, sel, f_held, chosen_r)),
    ]
    return rows, {"logistic_cv": list(chosen_l), "ridge_cv": chosen_r}


def library_choices(
    om: torch.nn.Module, h: torch.Tensor, t: torch.Tensor, prompt: int, n_skip: int, held: SkipSetLosses,
    candidates: list[int | None],
) -> list[tuple[str, torch.Tensor]]:
    """Held-out choices of `rewrite.routing.prompt_choice`: calibrated on the training windows, decided by running
    each held-out prompt once per candidate set (every set, or the `candidates` of lowest prior)."""
    rows = []
    for count in candidates:
        choice = calibrate_prompt_choice(om, t, prompt, n_skip, candidates=count, weights=ex.PRIOR_WEIGHTS)
        decided = choose_skips_by_prompt(om, h[:, :prompt], choice)
        which = "every set" if count is None else f"the {count} sets of lowest prior"
        rows.append((f"prompt choice (rewrite.routing): {which}, {len(choice.combos)} prompt forwards, "
                     f"prior weight {choice.weight:g}", combo_index(decided, held.combos)))
    return rows


def prompt_row(
    model: torch.nn.Module, om: torch.nn.Module, s: ex.Settings, held: torch.Tensor, train: torch.Tensor, prompt: int,
    continuation: int, fit: dict[str, float] | None, log: bool, keep: dict[int, Any] | None = None,
    reuse: dict[str, Any] | None = None, candidates: list[int | None] | None = None,
) -> dict[str, Any]:
    """Static, oracle (and fitted-router) rows at one prompt length; returns the table and its choices."""
    began = time.perf_counter()
    n_skip = round(s.target_skip * s.layers)
    width = prompt + continuation + 1
    h, t = held[:, -width:], train[:, -width:]
    if reuse is not None:
        hl, sl = SkipSetLosses(**reuse["held"]), SkipSetLosses(**reuse["train"])
    else:
        hl, sl = skip_set_losses(om, h, prompt, n_skip), skip_set_losses(om, t, prompt, n_skip)
    sp = replace(s, prompt_length=prompt)
    choices, chosen = ex.oracle_choices(sl, hl, sp, ["code"] * t.shape[0], ["code"] * h.shape[0])
    if candidates:
        choices += library_choices(om, h, t, prompt, n_skip, hl, candidates)
    if fit is not None:
        if reuse is not None:
            f_train, f_held = reuse["f_train"], reuse["f_held"]
        else:
            f_train, f_held = pooled_inputs(model, t[:, :prompt], s.layers), pooled_inputs(model, h[:, :prompt], s.layers)
        if keep is not None:
            keep[prompt] = {"held": hl, "train": sl, "f_held": f_held, "f_train": f_train}
        more, settings = fitted_choices(f_train, sl, f_held, n_skip, fit, "mean over the prompt")
        choices += more
        chosen["fits"] = {"whole prompt": settings}
        if fit.get("update_sizes"):
            f_train, f_held = update_sizes(model, t[:, :prompt], s.layers), update_sizes(model, h[:, :prompt], s.layers)
            more, settings = fitted_choices(f_train, sl, f_held, n_skip, fit, "each block's update size on the prompt")
            choices += more[1:]
            chosen["fits"]["update sizes"] = settings
        last = int(fit.get("pool_last", 0))
        if 0 < last < prompt:
            f_train = pooled_inputs(model, t[:, :prompt], s.layers, last)
            f_held = pooled_inputs(model, h[:, :prompt], s.layers, last)
            more, settings = fitted_choices(f_train, sl, f_held, n_skip, fit, f"mean over its last {last}")
            choices += more[1:]
            chosen["fits"][f"last {last}"] = settings
    nothing = torch.zeros(h.shape[0], s.layers, dtype=torch.bool)
    variants = [ex.Variant("full model", hl.full_continuation, nothing)]
    for name, choice in choices:
        variants.append(ex.Variant(name, hl.continuation.gather(1, choice.long()[:, None]).squeeze(1), hl.decisions(choice, s.layers)))
    rows = ex.table_rows(variants, torch.arange(h.shape[0]), hl.continuation_tokens, variants[1])
    table = {"prompt_length": prompt, "window_bytes": width, "scored_tokens": hl.continuation_tokens, "rows": rows,
             **chosen, "headroom": headroom(hl, prompt), "seconds": time.perf_counter() - began}
    if log:
        print_rows(table)
    return table


def _set_counts(decisions: torch.Tensor) -> dict[str, int]:
    """How many windows skip each set of blocks, most common first."""
    counts: dict[str, int] = {}
    for row in decisions.int().tolist():
        key = str([i for i, d in enumerate(row) if d])
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def routed_rows(
    model: torch.nn.Module, corpus: Any, s: ex.Settings, held: torch.Tensor, train: torch.Tensor, prompt: int,
    continuation: int, losses: list[str], steps: dict[str, int], log: bool, static_set: list[int] | None = None,
) -> dict[str, Any]:
    """Routers trained through `train_routers` at this prompt length, top k on the held-out windows, against
    the static set best on the training windows (`static_set` if known; both evaluated by
    `continuation_perplexity`)."""
    n_skip = round(s.target_skip * s.layers)
    width = prompt + continuation + 1
    h, t = held[:, -width:], train[:, -width:]
    out: dict[str, Any] = {"prompt_length": prompt, "rows": []}
    static = None
    for loss in losses:
        began = time.perf_counter()
        generator = torch.Generator().manual_seed(s.seed + 1)
        set_cost = loss == "set_cost"
        om = train_routers(
            model, lambda step, generator=generator: corpus.batches(s.batch, width - 1, generator=generator),
            RouterTrainingConfig(
                steps=steps[loss], lr=s.router_lr, target_skip=s.target_skip if set_cost else s.router_target, loss=loss,
                mode=s.router_mode, prompt_length=prompt, label_temperature=s.label_temperature, progress=log, log_every=10,
            ),
        ).module
        if static is None:
            if static_set is None:
                sl = skip_set_losses(om, t, prompt, n_skip)
                static_set = list(sl.combos[int(sl.continuation.sum(0).argmin())])
            out["static"] = static_set
            static = continuation_perplexity(om, h, prompt, static_skip=out["static"])
            full = continuation_perplexity(om, h, prompt, static_skip=[])
            out["rows"].append({"variant": "full model", "perplexity": full.perplexity})
            out["rows"].append({"variant": f"static {out['static']} (best on training text)", "perplexity": static.perplexity,
                                "increase": static.perplexity / full.perplexity - 1, "skip_rate": static.skip_rate})
        routed = continuation_perplexity(om, h, prompt, top_k=n_skip)
        assert routed.window_losses is not None and static.window_losses is not None
        tokens = h.shape[1] - prompt
        out["rows"].append({
            "variant": f"routed ({loss}, {steps[loss]} steps), top {n_skip}/{s.layers} on the prompt",
            "perplexity": routed.perplexity, "increase": routed.perplexity / full.perplexity - 1, "skip_rate": routed.skip_rate,
            "distinct_sets": ex._distinct(routed.decisions),
            "sets": _set_counts(routed.decisions),
            "vs_static": ex._paired((routed.window_losses - static.window_losses) / tokens), "seconds": time.perf_counter() - began,
        })
        if log:
            print(json.dumps(out["rows"][-1]), flush=True)
    return out


def print_rows(table: dict[str, Any]) -> None:
    print(f"\nprompt {table['prompt_length']} bytes, {table['scored_tokens']} scored "
          f"(median best-vs-second gap {table['headroom']['median_gap']:.4f} nats/token):")
    for r in table["rows"]:
        vs = "{:+.4f} [{:+.4f}, {:+.4f}]".format(*r["vs_static"]) if "vs_static" in r else ""
        print(f"{r['variant']:<82} {r['perplexity']:>8.4f} {r['skip_rate']:>6.1%} {r['increase']:>8.2%} "
              f"{r.get('distinct_sets', ''):>4} {vs:>26}", flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke run in seconds")
    parser.add_argument("--lm-cache", type=Path, help="load the trained LM from this file, or save it there")
    parser.add_argument("--prompt-lengths", default="64,192,448", help="comma-separated, evaluated in this order")
    parser.add_argument("--continuation", type=int, default=64, help="window inputs past the prompt (scored: this + 1)")
    parser.add_argument("--batch", type=int, default=8, help="LM training batch (windows of the longest length)")
    parser.add_argument("--held-windows", type=int, default=256)
    parser.add_argument("--train-windows", type=int, default=256, help="training windows: static choice, prior, fits")
    parser.add_argument("--fit-routers", action="store_true", help="linear routers fitted to set_cost labels")
    parser.add_argument("--fit-temperature", type=float, default=0.02)
    parser.add_argument("--fit-l2", type=float, default=1e-2)
    parser.add_argument("--update-sizes", action="store_true", help="fits also on each block's update size on the prompt")
    parser.add_argument("--pool-last", type=int, default=64, help="fits also on inputs pooled over the prompt's last N")
    parser.add_argument("--train-routers", type=int, default=0, help="prompt length at which to train routers (0: none)")
    parser.add_argument("--router-loss", default="set_cost,distill")
    parser.add_argument("--set-cost-steps", type=int, default=40)
    parser.add_argument("--distill-steps", type=int, default=150)
    parser.add_argument("--prompt-choice", default="",
                        help="rows of rewrite.routing.prompt_choice: comma-separated candidate counts, 'all' for every set")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--save-tensors", type=Path, help="with --fit-routers: save every set's losses and the pooled inputs")
    parser.add_argument("--reuse-tensors", type=Path, help="load those instead of computing them (same LM and windows)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = [int(p) for p in args.prompt_lengths.split(",")]
    if args.tiny:
        prompts, args.continuation, args.held_windows, args.train_windows = [8, 16], 8, 8, 8
        args.set_cost_steps, args.distill_steps, args.pool_last = 2, 2, 4
    base = ex.TINY if args.tiny else ex.Settings()
    longest = max(prompts) + args.continuation
    s = replace(base, length=longest, batch=args.batch if not args.tiny else base.batch, spread_windows=args.held_windows)
    corpus = ex.load_corpus("code")
    model = _model(s, corpus, args.lm_cache)
    held, _ = ex.evaluation_windows(corpus, s, "heldout", "spread")
    train, _ = ex.evaluation_windows(corpus, replace(s, spread_windows=args.train_windows), "train", "spread")
    om = rewrite.optimize(model, {"passes": [{"layer_skip": {}}]},
                          example_kwargs={"input_ids": torch.zeros(2, 16, dtype=torch.long)})
    fit = {"temperature": args.fit_temperature, "l2": args.fit_l2, "pool_last": args.pool_last,
           "update_sizes": args.update_sizes} if args.fit_routers else None
    reuse = torch.load(args.reuse_tensors, weights_only=False) if args.reuse_tensors else {}
    result: dict[str, Any] = {"settings": asdict(s), "continuation": args.continuation, "held_windows": held.shape[0],
                              "train_windows": train.shape[0], "torch": torch.__version__, "device": "cpu",
                              "threads": torch.get_num_threads(), "fit": fit, "by_prompt": []}

    def save() -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2))

    keep: dict[int, Any] = {}
    candidates = [None if c == "all" else int(c) for c in filter(None, args.prompt_choice.split(","))]
    for prompt in prompts:
        result["by_prompt"].append(prompt_row(model, om, s, held, train, prompt, args.continuation, fit, not args.tiny, keep,
                                               reuse.get(prompt), candidates))
        save()
        if args.save_tensors:
            torch.save({p: {k: asdict(v) if isinstance(v, SkipSetLosses) else v for k, v in d.items()} for p, d in keep.items()},
                       args.save_tensors)
    if args.train_routers:
        steps = {"set_cost": args.set_cost_steps, "distill": args.distill_steps}
        result["router_steps"] = steps
        known = next((t["static"] for t in result["by_prompt"] if t["prompt_length"] == args.train_routers), None)
        result["routers"] = routed_rows(model, corpus, s, held, train, args.train_routers, args.continuation,
                                        args.router_loss.split(","), steps, not args.tiny, known)
        save()
    return result


if __name__ == "__main__":
    main()
