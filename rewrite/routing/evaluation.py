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
) -> Evaluation:
    """Perplexity on windows [N, T + 1] past `prompt_length` tokens, decisions made on the prompt.

    With `static_skip` (column indices of routed blocks) every sequence skips those blocks and the
    routers are not consulted; otherwise `threshold` / `budget` act as in `skip_controls`.
    """
    if not 0 < prompt_length < windows.shape[1] - 1:
        raise ValueError(f"prompt_length must lie in (0, {windows.shape[1] - 1}), got {prompt_length}")
    keyword = takes_input_ids(module)
    device = next(module.parameters()).device
    n_routed = len(routed_blocks(module, windows[:1, :prompt_length].to(device)))
    total, count, all_decisions = 0.0, 0, []
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        if static_skip is not None:
            decisions = torch.zeros(batch.shape[0], n_routed, dtype=torch.bool, device=device)
            decisions[:, static_skip] = True
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
    decisions = torch.cat(all_decisions)
    return Evaluation(math.exp(total / count), decisions.float().mean().item(), decisions)


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
