"""Held-out quality of a routed causal LM: decide from a prompt, score the continuation.

As in generation, each sequence's decisions are made once on its prompt and held for the tokens
that follow; the perplexity counts only the continuation, so no decision has seen the tokens it is
scored on. A static baseline applies the same fixed set of skipped layers to every sequence.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from rewrite.routing.controls import record_skips, skip_controls
from rewrite.routing.language_model import logits_of, next_token_loss, takes_input_ids


@dataclass
class Evaluation:
    """Perplexity of the continuation and the fraction of (sequence, routed block) executions skipped."""

    perplexity: float
    skip_rate: float
    decisions: torch.Tensor  # [N, n_routed] bool
    window_losses: torch.Tensor | None = None
    """[N] summed next-token loss of each window's continuation (for per-window comparisons and subsets)."""


def routed_blocks(module: torch.nn.Module, sample: torch.Tensor) -> list[str]:
    """Module paths of the routed blocks, in decision order (one call on `sample`)."""
    with torch.no_grad(), skip_controls(threshold=math.inf), record_skips() as report:
        logits_of(module, sample, keyword=takes_input_ids(module))
    return report.layers


def continuation_perplexity(
    module: torch.nn.Module,
    windows: torch.Tensor,
    prompt_length: int,
    *,
    batch_size: int = 16,
    threshold: float | None = None,
    budget: float | None = None,
    static_skip: list[int] | None = None,
    top_k: int | None = None,
) -> Evaluation:
    """Perplexity on windows [N, T + 1] past `prompt_length` tokens, decisions made on the prompt.

    With `static_skip` (column indices of routed blocks) every sequence skips those blocks and the
    routers are not consulted; with `top_k` each sequence skips the `top_k` blocks its routers rank
    highest on the prompt run with nothing skipped (`top_k_decisions`); otherwise `threshold` /
    `budget` act as in `skip_controls` (the prompt run is routed: decisions in layer order).
    """
    if not 0 < prompt_length < windows.shape[1] - 1:
        raise ValueError(f"prompt_length must lie in (0, {windows.shape[1] - 1}), got {prompt_length}")
    keyword = takes_input_ids(module)
    device = next(module.parameters()).device
    n_routed = len(routed_blocks(module, windows[:1, :prompt_length].to(device)))
    total, count, all_decisions, all_losses = 0.0, 0, [], []
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        if static_skip is not None:
            decisions = torch.zeros(batch.shape[0], n_routed, dtype=torch.bool, device=device)
            decisions[:, static_skip] = True
        elif top_k is not None:
            decisions = top_k_decisions(module, batch[:, :prompt_length], top_k).to(device)
        else:
            with torch.no_grad(), skip_controls(threshold=threshold, budget=budget), record_skips() as report:
                logits_of(module, batch[:, :prompt_length], keyword=keyword)
            decisions = report.decisions.to(device)
        with torch.no_grad(), skip_controls(skip_mask=decisions):
            logits = logits_of(module, batch[:, :-1], keyword=keyword)
        scored = logits[:, prompt_length - 1 :]
        targets = batch[:, prompt_length:]
        total += next_token_loss(scored, targets).item() * targets.numel()
        count += targets.numel()
        all_decisions.append(decisions.cpu())
        per_token = torch.nn.functional.cross_entropy(scored.float().transpose(1, 2), targets, reduction="none")
        all_losses.append(per_token.sum(1).cpu())
    decisions = torch.cat(all_decisions)
    return Evaluation(math.exp(total / count), decisions.float().mean().item(), decisions, torch.cat(all_losses))


def router_probabilities(module: torch.nn.Module, prompts: torch.Tensor) -> torch.Tensor:
    """[B, n_routed] skip probabilities of every router on `prompts` [B, P] run with nothing skipped."""
    with torch.no_grad(), skip_controls(threshold=math.inf), record_skips() as report:
        logits_of(module, prompts, keyword=takes_input_ids(module))
    probs = report.last.probabilities
    if any(p is None for p in probs):
        raise RuntimeError("router_probabilities: a routed block recorded no probability")
    return torch.stack([p for p in probs if p is not None], dim=1)


def top_k_decisions(module: torch.nn.Module, prompts: torch.Tensor, k: int) -> torch.Tensor:
    """[B, n_routed] bool: per prompt, the `k` blocks with the highest router probability.

    Exactly `k` per sequence (ties go to the earlier block). The routers read the prompt run with
    nothing skipped, so, unlike `skip_controls(budget=)`, no decision changes what a later router
    sees: a deployment prefills the prompt in full and holds these decisions for the continuation
    (`skip_controls(skip_mask=)`, or a decode state).
    """
    probs = router_probabilities(module, prompts)
    if not 0 <= k <= probs.shape[1]:
        raise ValueError(f"top_k_decisions: k must lie in [0, {probs.shape[1]}], got {k}")
    decisions = torch.zeros(probs.shape, dtype=torch.bool)
    if k:
        # a stable descending sort keeps the earlier block first among equal probabilities
        order = torch.sort(probs, dim=1, descending=True, stable=True).indices[:, :k]
        decisions.scatter_(1, order, True)
    return decisions


def best_static_skip(
    module: torch.nn.Module, windows: torch.Tensor, prompt_length: int, n_skip: int, *, batch_size: int = 16
) -> tuple[list[int], Evaluation]:
    """The fixed set of `n_skip` routed blocks whose skipping hurts the continuation least, and its evaluation.

    Every combination is tried (the strongest static baseline); keep `windows` small.
    """
    n_routed = len(routed_blocks(module, windows[:1, :prompt_length].to(next(module.parameters()).device)))
    best: tuple[list[int], Evaluation] | None = None
    for combo in itertools.combinations(range(n_routed), n_skip):
        result = continuation_perplexity(module, windows, prompt_length, batch_size=batch_size, static_skip=list(combo))
        if best is None or result.perplexity < best[1].perplexity:
            best = (list(combo), result)
    assert best is not None
    return best


def calibrate_threshold(
    module: torch.nn.Module, windows: torch.Tensor, prompt_length: int, rate: float, *, batch_size: int = 16,
    iterations: int = 14,
) -> float:
    """The threshold at which the routers skip `rate` of the routed blocks on these prompts (bisection).

    Calibrate on text the evaluation does not score (training text), as a deployment would.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must lie in [0, 1], got {rate}")
    keyword = takes_input_ids(module)
    device = next(module.parameters()).device
    prompts = windows[:, :prompt_length].to(device)

    def skip_rate(threshold: float) -> float:
        skipped = total = 0
        for start in range(0, prompts.shape[0], batch_size):
            with torch.no_grad(), skip_controls(threshold=threshold), record_skips() as report:
                logits_of(module, prompts[start : start + batch_size], keyword=keyword)
            skipped += int(report.decisions.sum())
            total += report.decisions.numel()
        return skipped / total

    low, high = 0.0, 1.0  # skip_rate falls as the threshold rises
    for _ in range(iterations):
        mid = (low + high) / 2
        if skip_rate(mid) > rate:
            low = mid
        else:
            high = mid
    # saturated routers make the rate jump: keep the end whose rate is nearer the target
    return min((low, high), key=lambda t: abs(skip_rate(t) - rate))


@dataclass
class SkipSetLosses:
    """Per-sequence summed next-token losses with each fixed set of routed blocks skipped.

    `prompt[n, c]` sums the loss of the prompt's own tokens (positions 1 .. prompt_length - 1,
    predicted from the prompt alone) for window n with `combos[c]` skipped; `continuation[n, c]`
    sums the loss of the tokens past the prompt. `full_prompt` / `full_continuation` [N] are the
    same with nothing skipped. A combination applies to every token of the window.
    """

    combos: list[tuple[int, ...]]
    prompt: torch.Tensor  # [N, C]
    continuation: torch.Tensor  # [N, C]
    full_prompt: torch.Tensor  # [N]
    full_continuation: torch.Tensor  # [N]
    continuation_tokens: int  # per window

    def full_perplexity(self) -> float:
        """Continuation perplexity with nothing skipped."""
        return math.exp(self.full_continuation.sum().item() / (self.full_continuation.numel() * self.continuation_tokens))

    def perplexity(self, choice: torch.Tensor) -> float:
        """Continuation perplexity when window n skips `combos[choice[n]]` (choice: [N] int indices)."""
        picked = self.continuation.gather(1, choice.long()[:, None]).squeeze(1)
        return math.exp(picked.sum().item() / (picked.numel() * self.continuation_tokens))

    def decisions(self, choice: torch.Tensor, n_routed: int) -> torch.Tensor:
        """[N, n_routed] bool decisions of a per-window choice of combination."""
        return set_decisions(self.combos, choice, n_routed)


def set_decisions(combos: list[tuple[int, ...]], choice: torch.Tensor, n_routed: int) -> torch.Tensor:
    """[N, n_routed] bool: row n skips the routed blocks `combos[choice[n]]`."""
    out = torch.zeros(choice.shape[0], n_routed, dtype=torch.bool)
    for n, c in enumerate(choice.tolist()):
        out[n, list(combos[c])] = True
    return out


def skip_set_losses(
    module: torch.nn.Module, windows: torch.Tensor, prompt_length: int, n_skip: int, *, batch_size: int = 16
) -> SkipSetLosses:
    """Losses of every window [N, T + 1] with every fixed set of `n_skip` routed blocks skipped.

    One forward per (batch, combination); the prompt's loss and the continuation's come from the
    same causal forward (the prompt's logits do not see the continuation). This is what per-sequence
    oracles are built from: choosing, per window, the set whose skipping hurts its prompt least is a
    decision made on the prompt; choosing by the continuation is an upper bound for any policy that
    skips `n_skip` fixed-per-sequence blocks.
    """
    if not 1 < prompt_length < windows.shape[1] - 1:
        raise ValueError(f"prompt_length must lie in (1, {windows.shape[1] - 1}), got {prompt_length}")
    keyword = takes_input_ids(module)
    device = next(module.parameters()).device
    n_routed = len(routed_blocks(module, windows[:1, :prompt_length].to(device)))
    combos = list(itertools.combinations(range(n_routed), n_skip))

    def summed(batch: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), skip_controls(skip_mask=mask):
            logits = logits_of(module, batch[:, :-1], keyword=keyword)
        losses = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), batch[:, 1:], reduction="none")
        return losses[:, : prompt_length - 1].sum(1).cpu(), losses[:, prompt_length - 1 :].sum(1).cpu()

    prompt_parts, cont_parts, full_p, full_c = [], [], [], []
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        b = batch.shape[0]
        p, c = summed(batch, torch.zeros(b, n_routed, dtype=torch.bool))
        full_p.append(p)
        full_c.append(c)
        per_p, per_c = [], []
        for combo in combos:
            mask = torch.zeros(b, n_routed, dtype=torch.bool)
            mask[:, list(combo)] = True
            p, c = summed(batch, mask)
            per_p.append(p)
            per_c.append(c)
        prompt_parts.append(torch.stack(per_p, 1))
        cont_parts.append(torch.stack(per_c, 1))
    return SkipSetLosses(
        combos, torch.cat(prompt_parts), torch.cat(cont_parts), torch.cat(full_p), torch.cat(full_c),
        windows.shape[1] - 1 - (prompt_length - 1),
    )
