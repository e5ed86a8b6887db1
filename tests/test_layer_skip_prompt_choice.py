"""Skip decisions measured on the prompt (`rewrite.routing.prompt_choice`) against the original model run with
the skipped layers replaced by the identity (forward hooks on the Hugging Face layers, not the routed program)."""

from __future__ import annotations

import itertools

import pytest
import torch

import rewrite
from rewrite.routing.prompt_choice import PromptChoice, calibrate_prompt_choice, choose_skips_by_prompt

LAYERS = 4


@pytest.fixture(scope="module")
def lm():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg).eval()
    om = rewrite.optimize(model, {"passes": [{"layer_skip": {}}]},
                          example_kwargs={"input_ids": torch.zeros(2, 16, dtype=torch.long)})
    return model, om


def _identity(module, args, kwargs, out):
    hidden = args[0] if args else kwargs["hidden_states"]
    return hidden if isinstance(out, torch.Tensor) else (hidden, *out[1:])


def token_losses(model, ids: torch.Tensor, skipped: tuple[int, ...]) -> torch.Tensor:
    """[N, T - 1] next-token losses of the original model with the layers `skipped` made the identity."""
    handles = [model.model.layers[i].register_forward_hook(_identity, with_kwargs=True) for i in skipped]
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")


def ids(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def test_choice_is_the_set_of_lowest_prompt_cost_plus_weighted_prior(lm):
    model, om = lm
    combos = list(itertools.combinations(range(LAYERS), 2))
    prior = torch.linspace(0.0, 0.05, len(combos)).flip(0)
    prompts = ids(5, 12, seed=1)
    for weight in (0.0, 3.0):
        choice = PromptChoice(combos, prior, weight, LAYERS)
        got = choose_skips_by_prompt(om, prompts, choice, batch_size=2)
        costs = torch.stack([token_losses(model, prompts, c).mean(1) for c in combos], 1)
        want = torch.zeros(5, LAYERS, dtype=torch.bool)
        for n, c in enumerate((costs + weight * prior).argmin(1).tolist()):
            want[n, list(combos[c])] = True
        assert torch.equal(got, want), f"weight {weight}"
        assert got.sum(1).eq(2).all()


def test_calibration_prior_candidates_and_weight(lm):
    model, om = lm
    prompt = 8
    windows = ids(6, 15, seed=2)
    weights = (0.0, 1.0, 100.0)
    full = calibrate_prompt_choice(om, windows, prompt, 1, weights=weights, batch_size=4)
    assert full.combos == [(0,), (1,), (2,), (3,)] and full.n_routed == LAYERS
    losses = {c: token_losses(model, windows, c) for c in full.combos}
    want_prior = torch.stack([losses[c].mean() for c in full.combos])
    torch.testing.assert_close(full.prior, want_prior, rtol=1e-4, atol=1e-5)

    def continuation_loss(weight: float, combos: list[tuple[int, ...]], prior: torch.Tensor) -> float:
        prompt_cost = torch.stack([losses[c][:, : prompt - 1].mean(1) for c in combos], 1)
        choice = (prompt_cost + weight * prior).argmin(1)
        return sum(losses[combos[c]][n, prompt - 1 :].sum().item() for n, c in enumerate(choice.tolist()))

    scores = [continuation_loss(w, full.combos, want_prior) for w in weights]
    assert full.weight == weights[min(range(len(weights)), key=scores.__getitem__)]

    two = calibrate_prompt_choice(om, windows, prompt, 1, candidates=2, weights=weights, batch_size=4)
    best_two = sorted(want_prior.argsort()[:2].tolist())
    assert two.combos == [full.combos[i] for i in best_two]
    torch.testing.assert_close(two.prior, want_prior[best_two], rtol=1e-4, atol=1e-5)
    decided = choose_skips_by_prompt(om, windows[:, :prompt], two)
    allowed = torch.zeros(LAYERS, dtype=torch.bool)
    allowed[[full.combos[i][0] for i in best_two]] = True
    assert (decided & ~allowed).sum() == 0 and decided.sum(1).eq(1).all()


def test_bad_arguments_are_named(lm):
    _, om = lm
    with pytest.raises(ValueError, match="n_skip"):
        calibrate_prompt_choice(om, ids(2, 12, 0), 6, 0)
    with pytest.raises(ValueError, match="candidates"):
        calibrate_prompt_choice(om, ids(2, 12, 0), 6, 1, candidates=0)
    choice = PromptChoice([(0,)], torch.zeros(1), 0.0, LAYERS)
    with pytest.raises(ValueError, match=r"prompts must be token ids \[N, P\]"):
        choose_skips_by_prompt(om, ids(1, 12, 0)[0], choice)
