"""Pass `varlen` with static token counts (`token_capacity`) and its CUDA-graph replay (`cuda_graphs`)."""

from __future__ import annotations

import pytest
import torch
from conftest import main_output, reference_kwargs
from test_varlen import (
    CausalLM,
    _other_family,
    assert_real_tokens_close,
    padded_batch,
    reference_output,
    roberta_batch,
    torch_encoder_and_batch,
)

import rewrite
from examples.models import TARGETS
from rewrite.errors import PlanError
from rewrite.varlen.runtime import token_capacity

CAPTURE = padded_batch(128, [5, 9, 3], 9, left={2})
BATCH = padded_batch(128, [3, 10, 1, 7], 10, left={0, 3}, seed=11)  # 21 real tokens of 40


def _run_with_capacity(om, batch: dict, capacity: int):
    with torch.no_grad(), token_capacity(capacity):
        return main_output(om(**batch))


@pytest.mark.parametrize("name", ["bert", "llama", "qwen3", "gpt2"])
@pytest.mark.parametrize("capacity", [21, 32, 40])
def test_static_capacity_matches_the_padded_model_on_real_tokens(name, capacity):
    model, _ = TARGETS[name]()
    om = rewrite.optimize(model, {"passes": ["varlen"]}, example_kwargs=CAPTURE)
    got = _run_with_capacity(om, BATCH, capacity)
    with torch.no_grad():
        want = main_output(reference_output(model, name, BATCH))
    assert_real_tokens_close(got, want, BATCH["attention_mask"])
    assert got[BATCH["attention_mask"] == 0].abs().max() == 0  # filler tokens are dropped, padding holds 0


@pytest.mark.parametrize("name", ["opt", "roberta"])
def test_static_capacity_with_positions_counted_by_cumsum(name):
    model = _other_family(name)
    pad = model.config.pad_token_id
    capture = roberta_batch(pad, [4, 6, 2], 6, left={1})
    batch = roberta_batch(pad, [3, 10, 1, 7], 10, left={0, 3}, seed=11)
    om = rewrite.optimize(model, {"passes": ["varlen"]}, example_kwargs=capture)
    got = _run_with_capacity(om, batch, 30)
    with torch.no_grad():
        want = model(**batch).last_hidden_state
    assert_real_tokens_close(got, want, batch["attention_mask"])


def test_static_capacity_with_a_linearized_model():
    model, _ = TARGETS["llama"]()
    plan = {"passes": [{"mixer": {"kind": "gla"}}, "varlen"]}
    om = rewrite.optimize(model, plan, example_kwargs=CAPTURE)
    with torch.no_grad():
        want = main_output(om(**BATCH))
    got = _run_with_capacity(om, BATCH, 33)
    assert_real_tokens_close(got, want, BATCH["attention_mask"])


def test_static_capacity_with_torch_transformer_encoder():
    model, om, x, pad = torch_encoder_and_batch()
    with torch.no_grad(), token_capacity(25):
        got = om(x, src_key_padding_mask=pad)
    with torch.no_grad():
        want = model(x, src_key_padding_mask=pad)
    assert_real_tokens_close(got, want, ~pad)


def test_graph_plan_fields_are_checked():
    model, _ = TARGETS["bert"]()
    with pytest.raises(PlanError, match=r"varlen\.cuda_graphs.*'sometimes'.*auto"):
        rewrite.optimize(model, {"passes": [{"varlen": {"cuda_graphs": "sometimes"}}]}, example_kwargs=CAPTURE)
    with pytest.raises(PlanError, match=r"varlen\.token_bucket.*positive integer"):
        rewrite.optimize(model, {"passes": [{"varlen": {"token_bucket": 0}}]}, example_kwargs=CAPTURE)


def test_cpu_calls_run_eagerly_and_graph_policy_is_published():
    model, _ = TARGETS["bert"]()
    om = rewrite.optimize(model, {"passes": [{"varlen": {"token_bucket": 64}}]}, example_kwargs=CAPTURE)
    assert om.report.graph_replay.bucket == 64
    with torch.no_grad():
        om(**BATCH)
        om(**BATCH)
    assert om._replayer_for(om.report.graph_replay).replays == 0  # no CUDA here: nothing replayed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_gpu_graph_replay_matches_eager_and_buckets_token_counts(name):
    model, _ = TARGETS[name]()
    model = model.to("cuda", torch.float16)
    plan = {"passes": [{"varlen": {"token_bucket": 32}}]}
    om = rewrite.optimize(model, plan, example_kwargs={k: v.cuda() for k, v in CAPTURE.items()})
    eager = rewrite.optimize(model, {"passes": [{"varlen": {"cuda_graphs": "never"}}]},
                             example_kwargs={k: v.cuda() for k, v in CAPTURE.items()})
    runner = om._replayer_for(om.report.graph_replay)
    outs = []
    with torch.no_grad():
        for lengths, seed in (([40, 3, 77, 1], 1), ([40, 3, 77, 1], 2), ([50, 9, 60, 2], 3), ([77, 77, 77, 77], 4)):
            batch = {k: v.cuda() for k, v in padded_batch(128, lengths, 77, left={1}, seed=seed).items()}
            got, want = main_output(om(**batch)), main_output(eager(**batch))
            keep = batch["attention_mask"].bool()
            err = ((got[keep].float() - want[keep].float()).norm() / want[keep].float().norm()).item()
            assert err < 2e-3, f"{name} {lengths}: relative error {err:.2e}"
            assert got[~keep].abs().max() == 0 if (~keep).any() else True
            outs.append(got)
    # calls 1 and 2: 121 real tokens (bucket 128): eager then captured; call 3: 121 again, replayed;
    # call 4: 308 real tokens, a new bucket seen once: eager
    assert runner.replays == 2 and len(runner.graphs) == 1
    assert outs[0].data_ptr() != outs[1].data_ptr() != outs[2].data_ptr()  # callers own their outputs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_graph_captured_under_inference_mode_replays_under_no_grad():
    model, _ = TARGETS["bert"]()
    model = model.to("cuda", torch.float16)
    om = rewrite.optimize(model, {"passes": [{"varlen": {"cuda_graphs": "always"}}]},
                          example_kwargs={k: v.cuda() for k, v in CAPTURE.items()})
    batch = {k: v.cuda() for k, v in BATCH.items()}
    with torch.inference_mode():
        first = main_output(om(**batch))
    with torch.no_grad():
        second = main_output(om(**batch))
    assert om._replayer_for(om.report.graph_replay).replays == 2
    torch.testing.assert_close(second, first, atol=0, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_linearized_model_replays_from_the_first_call_with_always():
    model, _ = TARGETS["llama"]()
    model = model.to("cuda", torch.float16)
    capture = {k: v.cuda() for k, v in CAPTURE.items()}
    plan = {"passes": [{"mixer": {"kind": "gla"}}, {"varlen": {"cuda_graphs": "always"}}]}
    om = rewrite.optimize(model, plan, example_kwargs=capture)
    eager = rewrite.optimize(model, {"passes": [{"mixer": {"kind": "gla"}}, {"varlen": {"cuda_graphs": "never"}}]},
                             example_kwargs=capture)
    batch = {k: v.cuda() for k, v in BATCH.items()}
    with torch.no_grad():
        got, want = main_output(om(**batch)), main_output(eager(**batch))
    assert om._replayer_for(om.report.graph_replay).replays == 1
    keep = batch["attention_mask"].bool()
    err = ((got[keep].float() - want[keep].float()).norm() / want[keep].float().norm()).item()
    assert err < 2e-3, f"relative error {err:.2e}"


def _packed_row(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 128, (1, sum(lengths)), generator=torch.Generator().manual_seed(seed))
    return ids, torch.cat([torch.arange(n) for n in lengths])[None]


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_static_layout_of_packed_position_ids_matches_each_sequence_alone(name):
    model, _ = TARGETS[name]()
    om = rewrite.optimize(model, {"passes": ["varlen"]}, example_kwargs=dict(zip(("input_ids", "position_ids"),
                                                                                _packed_row([5, 3, 4], 5))))
    assert om.report.graph_replay.packed == "position_ids"
    lengths = [2, 7, 1, 6]
    ids, positions = _packed_row(lengths, 6)
    with torch.no_grad(), token_capacity(ids.shape[1], sequences=len(lengths)):
        got = main_output(om(input_ids=ids, position_ids=positions))
    with torch.no_grad():
        for piece, seq_ids in zip(torch.split(got, lengths, dim=1), torch.split(ids, lengths, dim=1)):
            want = main_output(model(**reference_kwargs(model, {"input_ids": seq_ids})))
            torch.testing.assert_close(piece, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), token_capacity(ids.shape[1], sequences=3), pytest.raises(ValueError, match="count 0, 1, 2"):
        om(input_ids=ids, position_ids=positions)  # a wrong sequence count is caught, not run wrong


def test_static_layout_of_packed_cu_seqlens_matches_each_sequence_alone():
    torch.manual_seed(0)
    model = CausalLM().eval()
    om = rewrite.optimize(model, {"passes": ["varlen"]}, example_kwargs={
        "input_ids": torch.randint(0, 64, (1, 12)), "cu_seqlens": torch.tensor([0, 5, 12], dtype=torch.int32)})
    assert om.report.graph_replay.packed == "cu_seqlens"
    lengths, ids = [4, 1, 9], torch.randint(0, 64, (1, 14))
    cu_seqlens = torch.tensor([0, 4, 5, 14], dtype=torch.int32)
    with torch.no_grad(), token_capacity(14):
        got = om(input_ids=ids, cu_seqlens=cu_seqlens)
        with pytest.raises(ValueError, match="rise from 0 to the 14"):
            om(input_ids=ids, cu_seqlens=torch.tensor([0, 4, 5, 13], dtype=torch.int32))
    for piece, seq_ids in zip(torch.split(got, lengths, dim=1), torch.split(ids, lengths, dim=1)):
        torch.testing.assert_close(piece, model(seq_ids), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_packed_position_ids_replay_from_a_graph():
    model, _ = TARGETS["llama"]()
    model = model.to("cuda", torch.float16)
    example = dict(zip(("input_ids", "position_ids"), (t.cuda() for t in _packed_row([5, 3, 4], 5))))
    om = rewrite.optimize(model, {"passes": [{"varlen": {"cuda_graphs": "always"}}]}, example_kwargs=example)
    eager = rewrite.optimize(model, {"passes": [{"varlen": {"cuda_graphs": "never"}}]}, example_kwargs=example)
    with torch.no_grad():
        for lengths, seed in (([2, 7, 1, 6], 6), ([9, 3, 3, 1], 7)):  # same T and count: one graph
            ids, positions = (t.cuda() for t in _packed_row(lengths, seed))
            got = main_output(om(input_ids=ids, position_ids=positions)).float()
            want = main_output(eager(input_ids=ids, position_ids=positions)).float()
            assert ((got - want).norm() / want.norm()).item() < 2e-3
    runner = om._replayer_for(om.report.graph_replay)
    assert runner.replays == 2 and len(runner.graphs) == 1
