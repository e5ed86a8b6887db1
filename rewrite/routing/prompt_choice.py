"""Per-sequence skip decisions measured on the prompt: which fixed set of routed blocks a sequence skips.

A learned router reads a pooled hidden state; this decision instead runs the prompt once per
candidate set of skipped blocks and keeps, for each sequence, the set whose skipping raises the loss
of the prompt's own next tokens least, plus a weighted prior: each set's mean loss on calibration
text. It costs one prompt forward per candidate set (before generation; the decisions are then held,
`skip_controls(skip_mask=...)`), and it needs no router training.

    choice = calibrate_prompt_choice(om, training_windows, prompt_length=448, n_skip=2)
    skips = choose_skips_by_prompt(om, prompts, choice)          # [N, n_routed] bool
    with skip_controls(skip_mask=skips):
        out = om(input_ids=prompts_and_more)

Prompts are token ids [N, P] with every position real (no padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rewrite.routing.controls import skip_controls
from rewrite.routing.evaluation import set_decisions, skip_set_losses
from rewrite.routing.language_model import logits_of, takes_input_ids

PRIOR_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
"""Weights of the calibration prior tried by `calibrate_prompt_choice`."""


@dataclass
class PromptChoice:
    """Candidate sets of routed blocks and what `choose_skips_by_prompt` adds to their prompt cost."""

    combos: list[tuple[int, ...]]  # candidate sets (indices of routed blocks, in routing order)
    prior: torch.Tensor  # [C] mean next-token loss per token on calibration text with each set skipped
    weight: float  # the prior's weight, chosen on calibration text
    n_routed: int

    def decisions(self, choice: torch.Tensor) -> torch.Tensor:
        """[N, n_routed] bool: each row skips `combos[choice[n]]`."""
        return set_decisions(self.combos, choice, self.n_routed)


def calibrate_prompt_choice(
    module: torch.nn.Module,
    windows: torch.Tensor,
    prompt_length: int,
    n_skip: int,
    *,
    candidates: int | None = None,
    weights: tuple[float, ...] = PRIOR_WEIGHTS,
    batch_size: int = 16,
) -> PromptChoice:
    """Candidate sets of `n_skip` routed blocks, their prior and its weight, from calibration windows [N, T + 1].

    Every set of `n_skip` routed blocks is run on every window (`skip_set_losses`). Its prior is its mean
    next-token loss per token there; `candidates` keeps only that many sets, those of lowest prior (each
    candidate costs a prompt forward at decision time). The weight is the one of `weights` whose choices,
    made on each window's first `prompt_length` tokens, give the windows' continuations the lowest loss.
    """
    if n_skip < 1:
        raise ValueError(f"n_skip must be at least 1, got {n_skip}")
    losses = skip_set_losses(module, windows, prompt_length, n_skip, batch_size=batch_size)
    tokens = windows.shape[0] * (prompt_length - 1 + losses.continuation_tokens)
    prior = (losses.prompt.sum(0) + losses.continuation.sum(0)) / tokens
    keep = torch.arange(len(losses.combos))
    if candidates is not None:
        if candidates < 1:
            raise ValueError(f"candidates must be at least 1, got {candidates}")
        keep = prior.argsort(stable=True)[:candidates].sort().values
    prompt_cost = losses.prompt[:, keep] / (prompt_length - 1)
    continuation = losses.continuation[:, keep]

    def continuation_loss(weight: float) -> float:
        choice = (prompt_cost + weight * prior[keep]).argmin(1)
        return continuation.gather(1, choice[:, None]).sum().item()

    weight = min(weights, key=continuation_loss)
    n_routed = losses.combos[-1][-1] + 1  # the combinations of range(n_routed) end with its last block
    return PromptChoice([losses.combos[i] for i in keep.tolist()], prior[keep].clone(), float(weight), n_routed)


def prompt_costs(
    module: torch.nn.Module, prompts: torch.Tensor, choice: PromptChoice, *, batch_size: int = 16
) -> torch.Tensor:
    """[N, C] mean next-token loss of each prompt's own tokens with each candidate set skipped."""
    if prompts.dim() != 2 or prompts.shape[1] < 2:
        raise ValueError(f"prompts must be token ids [N, P] with P >= 2, got shape {tuple(prompts.shape)}")
    keyword = takes_input_ids(module)
    device = next(module.parameters()).device
    parts = []
    for start in range(0, prompts.shape[0], batch_size):
        batch = prompts[start : start + batch_size].to(device)
        per_set = []
        for combo in choice.combos:
            mask = torch.zeros(batch.shape[0], choice.n_routed, dtype=torch.bool)
            mask[:, list(combo)] = True
            with torch.no_grad(), skip_controls(skip_mask=mask):
                logits = logits_of(module, batch, keyword=keyword)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), batch[:, 1:], reduction="none"
            )
            per_set.append(loss.mean(1).cpu())
        parts.append(torch.stack(per_set, 1))
    return torch.cat(parts)


def choose_skips_by_prompt(
    module: torch.nn.Module, prompts: torch.Tensor, choice: PromptChoice, *, batch_size: int = 16
) -> torch.Tensor:
    """[N, n_routed] bool: per prompt, the candidate set of lowest prompt cost + weight x prior."""
    costs = prompt_costs(module, prompts, choice, batch_size=batch_size)
    if not torch.isfinite(costs).all():
        raise ValueError("a prompt's loss is not finite with some candidate set skipped; check the prompts' token ids")
    score = costs + choice.weight * choice.prior
    return choice.decisions(score.argmin(1))


__all__ = [
    "PRIOR_WEIGHTS",
    "PromptChoice",
    "calibrate_prompt_choice",
    "choose_skips_by_prompt",
    "prompt_costs",
]
