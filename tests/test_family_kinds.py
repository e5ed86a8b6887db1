"""Mixer kinds beyond `gla` on families the passes were not designed around (QK-norm, fused q / k / v, rotary GQA,
partial and interleaved rotary, multipliers, encoders counting positions from token ids), and sequence parallelism
on two of them: each kind replaces every layer, outputs are finite, and one training step of the linearized model
lowers its loss; sequence-parallel ranks (simulated as threads) give the single-process outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from test_unfamiliar_families import (
    PROBED_ENCODERS,
    VOCAB,
    _decoder_config,
    build,
    falcon_gqa,
    gptj,
    granite,
    olmo2,
    right_padded,
)

import rewrite
from rewrite.distributed import bind_group, gather_sequence, run_on_threads, shard_inputs, threaded_groups

transformers = pytest.importorskip("transformers")


def qwen3():
    return transformers.Qwen3ForCausalLM(_decoder_config(transformers.Qwen3Config, num_key_value_heads=2, head_dim=16))


def phi3():
    return transformers.Phi3ForCausalLM(_decoder_config(transformers.Phi3Config, num_key_value_heads=2,
                                                        pad_token_id=0, bos_token_id=1, eos_token_id=2))


def stablelm():
    return transformers.StableLmForCausalLM(_decoder_config(transformers.StableLmConfig, num_key_value_heads=2))


def starcoder2():
    return transformers.Starcoder2ForCausalLM(_decoder_config(transformers.Starcoder2Config, num_key_value_heads=2,
                                                              bos_token_id=1, eos_token_id=2))


def electra():
    return transformers.ElectraModel(transformers.ElectraConfig(
        embedding_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=VOCAB))


FAMILIES = {"qwen3": qwen3, "phi3": phi3, "falcon_gqa": falcon_gqa, "gptj": gptj, "stablelm": stablelm,
            "olmo2": olmo2, "granite": granite, "starcoder2": starcoder2, "roberta": PROBED_ENCODERS["roberta"],
            "distilbert": PROBED_ENCODERS["distilbert"], "electra": electra}
CASES = [("qwen3", "linear"), ("phi3", "retention"), ("falcon_gqa", "lawcat"), ("gptj", "hybrid_swa"),
         ("stablelm", "linear"), ("olmo2", "retention"), ("granite", "lawcat"), ("starcoder2", "hybrid_swa"),
         ("roberta", "bidirectional"), ("distilbert", "bidirectional"), ("electra", "bidirectional")]
"""Each decoder family with one causal kind (every kind on two families; all four kinds on all eight were probed and
behave alike), each encoder with `bidirectional`."""


def _loss(module: torch.nn.Module, batch: dict, encoder: bool) -> torch.Tensor:
    out = module(**batch)
    real = batch["attention_mask"].bool()
    if encoder:
        return out.last_hidden_state[real].pow(2).mean()
    ids = batch["input_ids"].masked_fill(~real, -100)
    return torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), ignore_index=-100)


@pytest.mark.parametrize(("family", "kind"), CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_kind_replaces_every_layer_and_trains(family: str, kind: str) -> None:
    model = build(FAMILIES[family])
    batch = right_padded([8, 5], 8)
    om = rewrite.optimize(model, [{"mixer": {"kind": kind}}], example_kwargs=batch)
    assert [c.split(": ")[-1] for c in om.report.results[-1].changed] == [kind] * 2
    encoder = kind == "bidirectional"
    before = _loss(om, batch, encoder)
    assert torch.isfinite(before)
    params = [p for p in om.parameters() if p.requires_grad]
    before.backward()
    assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p -= 0.05 * p.grad
        assert _loss(om, batch, encoder) < before


@pytest.mark.parametrize(("family", "kind", "strategy"), [("phi3", "retention", "lasp2"), ("gptj", None, "ulysses")],
                         ids=["phi3-retention-lasp2", "gptj-softmax-ulysses"])
def test_sequence_parallel_ranks_match_one_process(family: str, kind: str | None, strategy: str) -> None:
    model = build(FAMILIES[family])
    batch = right_padded([16, 11], 16)
    passes = [{"mixer": {"kind": kind}}] if kind else []
    reference = rewrite.optimize(copy.deepcopy(model), passes, example_kwargs=batch) if passes else model
    split = rewrite.optimize(copy.deepcopy(model), [*passes, {"sequence_parallel": {"strategy": strategy}}],
                             example_kwargs=batch)
    split.load_state_dict(reference.state_dict())
    groups = threaded_groups(2)

    def run(rank: int) -> torch.Tensor:
        with bind_group("world", groups[rank]), torch.no_grad():
            return gather_sequence(split(**shard_inputs(batch, group="world")).logits, group="world")

    got = run_on_threads(groups, run)[0]
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(got[real], reference(**batch).logits[real], atol=1e-5, rtol=1e-5)
