"""Pass `sequence_parallel`: outputs and gradients on 2 and 4 gloo processes equal the single-process model.

Each world size is spawned once (module-scoped fixture); every rank runs every case and the
assertions run in the ranks (`torch.testing.assert_close` against the model without the pass, on
the full sequence); the tests below read what each case reported. The reference for gradients is
the single-process model's parameter gradients; the split model's are summed over the ranks.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import socket
import tempfile
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import rewrite
from examples.models import TARGETS
from rewrite.distributed import (
    CountingGroup,
    all_reduce_gradients,
    bind_group,
    gather_sequence,
    get_group,
    register_group,
    run_on_threads,
    sequence_parallel_loss,
    shard,
    shard_inputs,
    shift_labels,
    threaded_groups,
)
from rewrite.distributed import cost as sp_cost
from rewrite.distributed.groups import GroupError
from rewrite.distributed.layout import LayoutError, unshard
from rewrite.errors import PassError, PlanError

SP = "sequence_parallel"


def _case(family: str, strategy: object, layout: str = "contiguous", kind: str | None = None,
          mixer_layers: object = "all", packed: bool = False, **options: object) -> dict:
    return {"family": family, "strategy": strategy, "layout": layout, "kind": kind, "mixer_layers": mixer_layers,
            "packed": packed, "options": options}


CASES = {
    "llama-softmax-ulysses": _case("llama", "ulysses"),
    "llama-softmax-ring-zigzag": _case("llama", "ring", "zigzag"),
    "gpt2-softmax-ring-absolute-positions": _case("gpt2", "ring"),
    "llama-gla-lasp2-zigzag": _case("llama", "lasp2", "zigzag", "gla"),
    "llama-retention-lasp2": _case("llama", "lasp2", kind="retention"),
    "llama-gated_deltanet-allscan": _case("llama", "allscan", kind="gated_deltanet"),
    "llama-gated_deltanet-lasp2-zigzag": _case("llama", "lasp2", "zigzag", "gated_deltanet"),
    "llama-mamba2-lasp2": _case("llama", "lasp2", kind="mamba2"),
    "bert-bidirectional-lasp2": _case("bert", "lasp2", kind="bidirectional"),
    "llama-hybrid-auto": _case("llama", "auto", kind="gla", mixer_layers=[0]),
    "handwritten-unfused-softmax-ulysses": _case("handwritten", "ulysses"),
    "transformer_encoder-softmax-ring": _case("transformer_encoder", "ring", "zigzag"),
    "minilm-pretrained-ulysses": _case("minilm", "ulysses"),
    "llama-softmax-ulysses_ring-zigzag": _case("llama", "ulysses_ring", "zigzag", ulysses_size=2),
    "lfm2-short-conv-ring-zigzag": _case("lfm2", "ring", "zigzag"),  # a causal conv over the tokens: halos
    # packed rows (position_ids restarting per sequence), sequences crossing rank boundaries
    "llama-packed-softmax-ulysses": _case("llama", "ulysses", packed=True),
    "llama-packed-softmax-ring-zigzag": _case("llama", "ring", "zigzag", packed=True),
    "llama-packed-softmax-ulysses_ring": _case("llama", "ulysses_ring", packed=True, ulysses_size=2),
    "llama-packed-gla-lasp2": _case("llama", "lasp2", kind="gla", packed=True),
    "llama-packed-hybrid-ulysses_ring-allscan": _case(
        "llama", {"softmax": "ulysses_ring", "linear": "allscan"}, kind="gla", mixer_layers=[0], packed=True,
        ulysses_size=2),
}
PACKED_LENGTHS = [5, 1, 2, 1, 7]
"""16 tokens: at 4 ranks (shards of 4) sequences cross the boundaries at 4 and 12, one of one token starts rank 2,
and rank 1 holds a one-token sequence inside; at 2 ranks the second rank starts with a one-token sequence."""
GLOO_CASES = {  # (group size, case): 4 processes, the size-2 cases on two pairs of them at once
    (4, "llama-softmax-ulysses"): "kv heads (2) < ranks (4)",
    (2, "loss"): "loss helper",
    (4, "llama-softmax-ulysses_ring-zigzag"): "Ulysses x ring 2 x 2, kv heads (2) < ranks (4)",
    (2, "llama-packed-gla-lasp2"): "packed rows, gla state passing",
}
"""Each rank runs every case (its optimize calls dominate the fixture), so the processes take one case per
collective: all-to-all (Ulysses), ring exchanges (Ulysses x ring, and the benchmark's ring / allscan), lasp2's
gathered states (packed gla), the loss and gradient all-reduce; vector-gated lasp2 in zigzag and packed Ulysses x
ring run as threads."""
THREAD_CASES = [(2, name) for name in (
    "llama-gla-lasp2-zigzag", "llama-softmax-ring-zigzag", "gpt2-softmax-ring-absolute-positions",
    "llama-retention-lasp2", "llama-gated_deltanet-allscan", "bert-bidirectional-lasp2",
    "handwritten-unfused-softmax-ulysses", "transformer_encoder-softmax-ring", "minilm-pretrained-ulysses",
    "lfm2-short-conv-ring-zigzag",
)] + [(4, name) for name in (
    "llama-hybrid-auto", "llama-gated_deltanet-lasp2-zigzag", "llama-mamba2-lasp2",
)]
PACKED_THREAD_CASES = [(2, "llama-packed-softmax-ulysses"), (4, "llama-packed-softmax-ring-zigzag"),
                       (4, "llama-packed-softmax-ulysses_ring"), (4, "llama-packed-hybrid-ulysses_ring-allscan")]
LENGTH = 16


def _plan(case: dict, group: str) -> dict:
    passes: list = []
    if case["kind"] is not None:
        passes.append({"mixer": {"kind": case["kind"], "layers": case["mixer_layers"]}})
    sp = {"strategy": case["strategy"], "layout": case["layout"], "group": group, **case["options"]}
    if case["packed"]:
        sp["packed"] = "position_ids"
    passes.append({SP: sp})
    return {"passes": passes}


def _main_output(out) -> torch.Tensor:
    for name in ("logits", "last_hidden_state"):
        if hasattr(out, name):
            return getattr(out, name)
    return out[0] if isinstance(out, tuple) else out


def _tolerance(ref: torch.Tensor) -> dict:
    return {"rtol": 1e-4, "atol": 1e-5 * max(1.0, float(ref.abs().max()))}


class Prepared:
    """A case's split module, and the single-process model's outputs and gradients on the full sequence."""

    def __init__(self, case: dict, group: str, size: int):
        model, inputs = TARGETS[case["family"]](batch=2, length=LENGTH)
        if isinstance(inputs, tuple):  # positional [B, L, D] inputs (torch.nn / hand-written modules)
            inputs = {name: x for name, x in zip(inspect.signature(model.forward).parameters, inputs)}
        self.case, self.inputs, self.group = case, inputs, group
        plan = _plan(case, group)
        if case["strategy"] == "auto":
            plan["passes"][-1][SP]["group_size"] = size
        self.split = rewrite.optimize(copy.deepcopy(model), plan, example_kwargs=inputs)
        reference_plan = {"passes": plan["passes"][:-1]}
        reference = (rewrite.optimize(copy.deepcopy(model), reference_plan, example_kwargs=inputs)
                     if reference_plan["passes"] else copy.deepcopy(model))
        extra = {"use_cache": False} if "use_cache" in reference.forward.__code__.co_varnames else {}
        full = _main_output(reference(**inputs, **extra))
        self.real = (inputs["attention_mask"].bool() if "attention_mask" in inputs
                     else torch.ones(full.shape[:2], dtype=torch.bool))
        self.weight = torch.randn(full.shape, generator=torch.Generator().manual_seed(1)) * self.real[..., None]
        (full * self.weight).sum().backward()
        self.full = full.detach()
        self.grads = {n: p.grad for n, p in reference.named_parameters()}

    def step(self, rank: int, size: int) -> torch.Tensor:
        """This rank's forward and backward on its shard; returns its outputs."""
        layout = self.case["layout"]
        local = _main_output(self.split(**shard_inputs(self.inputs, group=self.group, layout=layout)))
        (local * shard(self.weight, rank, size, layout)).sum().backward()
        return local.detach()

    def check(self, gathered: torch.Tensor) -> None:
        """Outputs at real tokens and every parameter gradient (summed over ranks) equal the reference's."""
        torch.testing.assert_close(gathered[self.real], self.full[self.real], **_tolerance(self.full))
        checked = 0
        for name, param in self.split.named_parameters():
            ref = self.grads[name]
            if ref is None:
                assert param.grad is None or not param.grad.any(), name
                continue
            torch.testing.assert_close(param.grad, ref, **_tolerance(ref), msg=lambda m, n=name: f"grad of {n}: {m}")
            checked += 1
        assert checked > 0


class PackedPrepared(Prepared):
    """A packed row of `PACKED_LENGTHS` sequences: the reference runs the model on each sequence alone."""

    def __init__(self, case: dict, group: str, size: int):
        model, inputs = TARGETS[case["family"]](batch=1, length=LENGTH)
        ids = inputs["input_ids"]
        positions = torch.cat([torch.arange(n) for n in PACKED_LENGTHS])[None]
        self.case, self.group = case, group
        self.inputs = {"input_ids": ids, "position_ids": positions}
        plan = _plan(case, group)
        self.split = rewrite.optimize(copy.deepcopy(model), plan, example_kwargs=self.inputs)
        reference_plan = {"passes": plan["passes"][:-1]}
        reference = (rewrite.optimize(copy.deepcopy(model), reference_plan,
                                      example_kwargs={"input_ids": ids[:, :PACKED_LENGTHS[0]]})
                     if reference_plan["passes"] else copy.deepcopy(model))
        extra = {"use_cache": False} if "use_cache" in reference.forward.__code__.co_varnames else {}
        starts = [sum(PACKED_LENGTHS[:i]) for i in range(len(PACKED_LENGTHS))]
        full = torch.cat([_main_output(reference(input_ids=ids[:, a: a + n], **extra))
                          for a, n in zip(starts, PACKED_LENGTHS)], dim=1)
        self.real = torch.ones(full.shape[:2], dtype=torch.bool)
        self.weight = torch.randn(full.shape, generator=torch.Generator().manual_seed(1))
        (full * self.weight).sum().backward()
        self.full = full.detach()
        self.grads = {n: p.grad for n, p in reference.named_parameters()}


def prepare(name: str, group: str, size: int) -> Prepared:
    """The case's split module and reference (packed rows: each sequence alone)."""
    case = CASES[name]
    return (PackedPrepared if case["packed"] else Prepared)(case, group, size)


def run_loss_case(group: str) -> None:
    """The loss helper: global mean over real tokens, and its gradients summed over ranks, equal one process's."""
    model, inputs = TARGETS["llama"](batch=2, length=LENGTH)
    real = inputs["attention_mask"].bool()
    # a target is counted when its token and the token predicting it are real (padded queries' logits are arbitrary)
    predicted_from_real = torch.cat([torch.zeros_like(real[:, :1]), real[:, :-1]], dim=1)
    labels = inputs["input_ids"].masked_fill(~(real & predicted_from_real), -100)
    plan = {"passes": [{SP: {"strategy": "ulysses", "group": group}}]}
    split = rewrite.optimize(copy.deepcopy(model), plan, example_kwargs=inputs)
    reference = copy.deepcopy(model)
    logits = reference(**inputs, use_cache=False).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), shift_labels(labels).flatten(), ignore_index=-100)
    expected.backward()
    local = shard_inputs({**inputs, "labels": labels}, group=group)
    logits = split(input_ids=local["input_ids"], attention_mask=local["attention_mask"]).logits
    loss = sequence_parallel_loss(logits, local["labels"], group=group)
    loss.backward()
    all_reduce_gradients(split, group=group)
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    grads = dict(reference.named_parameters())
    for name, param in split.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, **_tolerance(grads[name].grad))


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    register_group("pair", pairs[rank // 2])
    results = {}
    try:
        for size, name in GLOO_CASES:
            group = "world" if size == world else "pair"
            torch.manual_seed(0)
            try:
                if name == "loss":
                    run_loss_case(group)
                else:
                    prepared = prepare(name, group, size)
                    local = prepared.step(dist.get_rank(get_group(group).group), size)
                    all_reduce_gradients(prepared.split, group=group)
                    prepared.check(gather_sequence(local, group=group, layout=prepared.case["layout"]))
                results[f"{size}:{name}"] = "ok"
            except Exception:  # reported to the test, which fails with it
                results[f"{size}:{name}"] = traceback.format_exc()
            dist.barrier()
        try:  # the multi-GPU benchmark's logic, unchanged, on gloo
            from benchmarks import sequence_parallel_multi_gpu as bench

            # ring and allscan: the point-to-point exchanges, across processes
            rows = bench.run_rank(bench.parse(["--tiny", "--models", "hybrid", "--softmax", "ring", "--linear", "allscan"]))
            if rows is not None:
                bench.report(rows, str(Path(out_dir, "multi_gpu.json")))
            results["multi_gpu_benchmark"] = "ok"
        except Exception:
            results["multi_gpu_benchmark"] = traceback.format_exc()
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.barrier()  # no rank closes its connections while another still exchanges (gloo aborts that rank)
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _warm_up_capture() -> None:
    """One capture in this process, so the forked ranks start with the capture machinery imported and set up (the
    first `optimize` in a fresh process costs seconds more than the next)."""
    model, inputs = TARGETS["llama"](batch=1, length=4)
    rewrite.optimize(model, {"passes": []}, example_kwargs=inputs)


@pytest.fixture(scope="module")
def gloo_results() -> list[dict[str, str]]:
    """Every gloo case's report from each of 4 processes ("ok" or the traceback).

    The ranks are forked, not spawned: each starts with this process's imports (torch, transformers, the rewriter)
    instead of importing them again, four at a time on a few cores. Each sets one CPU thread before any work."""
    _warm_up_capture()
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(4, _free_port(), out_dir), nprocs=4, join=True, start_method="fork")
        reports = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(4)]
        bench = Path(out_dir, "multi_gpu.json")
        reports[0]["multi_gpu_rows"] = json.loads(bench.read_text())["rows"] if bench.exists() else []
        return reports


@pytest.mark.parametrize(("size", "name"), list(GLOO_CASES), ids=[f"P{s}-{n}" for s, n in GLOO_CASES])
def test_gloo_processes_match_single_process(gloo_results, size: int, name: str) -> None:
    reports = [r.get(f"{size}:{name}", "not run") for r in gloo_results]
    failures = [f"rank {r}:\n{text}" for r, text in enumerate(reports) if text != "ok"]
    assert not failures, "\n".join(failures)


def test_multi_gpu_benchmark_runs_on_gloo_with_exact_byte_predictions(gloo_results) -> None:
    reports = [r.get("multi_gpu_benchmark", "not run") for r in gloo_results]
    assert reports == ["ok"] * 4, "\n".join(reports)
    rows = gloo_results[0]["multi_gpu_rows"]
    assert [r["rank"] for r in rows] == [0, 1, 2, 3]
    for row in rows:
        assert row["bytes_received"] == row["bytes_predicted"] > 0
        assert row["rel_err_check"] < 1e-5


# --- in one process: threads as ranks -------------------------------------------------------------


def _on_threads(size: int, work) -> list:
    groups = threaded_groups(size)

    def run(rank: int):
        with bind_group("world", groups[rank]):
            return work(groups[rank])

    return run_on_threads(groups, run)


@pytest.mark.parametrize(("size", "name"), THREAD_CASES + PACKED_THREAD_CASES,
                         ids=[f"P{s}-{n}" for s, n in THREAD_CASES + PACKED_THREAD_CASES])
def test_ranks_as_threads_match_single_process(size: int, name: str) -> None:
    """Every strategy x mixer kind: ranks as threads sharing one split module (gradients sum in place).

    Packed rows are compared with the model run on each sequence alone."""
    torch.manual_seed(0)
    prepared = prepare(name, "world", size)
    outputs = _on_threads(size, lambda group: prepared.step(group.rank, size))
    prepared.check(unshard(outputs, CASES[name]["layout"]))


@pytest.mark.parametrize(("strategy", "packed"), [("ulysses", False), ("ring", False), ("ulysses_ring", False),
                                                   ("ulysses_ring", True), ("ring", True)])
def test_counted_bytes_equal_the_cost_model(strategy: str, packed: bool) -> None:
    """Masked (key validity gathered) or packed (sequence starts gathered): one byte per token either way."""
    batch, heads, kv_heads, length, dim, size, inner = 2, 4, 2, 16, 8, 4, 2
    q, k, v = torch.randn(batch, heads, length, dim), torch.randn(batch, kv_heads, length, dim), torch.randn(
        batch, kv_heads, length, dim)
    mask = torch.ones(batch, 1, length // size, length // size, dtype=torch.bool).tril()
    positions = torch.cat([torch.arange(n) for n in PACKED_LENGTHS])[None].expand(batch, length)

    def work(group):
        counting = CountingGroup(group)
        with bind_group("counted", counting):
            from rewrite.distributed.graph_functions import sp_attention

            extra = {"positions": shard(positions, group.rank, size), "check_mask": False} if packed else {}
            sp_attention(*(shard(x, group.rank, size, dim=2) for x in (q, k, v)), mask, causal=True,
                         strategy=strategy, group="counted", inner=inner, **extra)
        return counting.total_bytes()

    counted = _on_threads(size, work)
    shape = sp_cost.AttentionShape(heads, kv_heads, dim, dim, 4, True)
    if strategy == "ulysses_ring":
        formula = sp_cost.ulysses_ring_bytes(shape, inner, size, masked=True)
    else:
        formula = {"ulysses": sp_cost.ulysses_bytes, "ring": sp_cost.ring_bytes}[strategy](shape, size, masked=True)
    predicted = int(formula.subs({sp_cost.SEQ: length, sp_cost.BATCH: batch}))
    assert counted == [predicted] * size


@pytest.mark.parametrize("strategy", ["lasp2", "allscan"])
def test_counted_state_bytes_equal_the_cost_model(strategy: str) -> None:
    from rewrite.distributed.recurrent_kernels import SequenceParallelKernels
    from rewrite.kernels.linear_attention import linear_attention

    batch, heads, kv_heads, length, dim, size = 1, 4, 2, 16, 8, 4
    q, k, v = torch.randn(batch, length, heads, dim), torch.randn(batch, length, kv_heads, dim), torch.randn(
        batch, length, kv_heads, dim + 2)
    g = torch.nn.functional.logsigmoid(torch.randn(batch, length, kv_heads, dim))

    def work(group):
        counting = CountingGroup(group)
        with SequenceParallelKernels(counting, layout="contiguous", strategy=strategy, scan_blocks=3):
            linear_attention(*(shard(x, group.rank, size) for x in (q, k, v, g)))
        return counting.total_bytes()

    counted = _on_threads(size, work)
    if strategy == "lasp2":
        predicted = [int(sp_cost.lasp2_bytes(kv_heads, dim, dim + 2, size).subs(sp_cost.BATCH, batch))] * size
    else:
        one = int(sp_cost.allscan_bytes(kv_heads, dim, dim + 2).subs(sp_cost.BATCH, batch))
        predicted = [0] + [one] * (size - 1)
    assert counted == predicted


def test_zigzag_shard_round_trip_and_positions() -> None:
    x = torch.arange(2 * 16).view(2, 16)
    parts = [shard(x, r, 4, "zigzag") for r in range(4)]
    assert parts[0][0].tolist() == [0, 1, 14, 15]
    assert torch.equal(unshard(parts, "zigzag"), x)


def test_uneven_length_is_refused_with_the_multiple_to_pad_to() -> None:
    _, inputs = TARGETS["llama"](batch=1, length=15)
    with pytest.raises(LayoutError, match="multiple of 4"):
        _on_threads(2, lambda g: shard_inputs(inputs, group=g, layout="zigzag"))


def test_group_size_that_does_not_fit_ulysses_lists_valid_sizes() -> None:
    model, inputs = TARGETS["llama"](batch=1, length=12)
    with pytest.raises(PassError, match=r"valid sizes: \[1, 2, 4\]"):
        rewrite.optimize(model, {"passes": [{SP: {"strategy": "ulysses", "group_size": 3}}]}, example_kwargs=inputs)


def test_ulysses_ring_factorisation_that_does_not_fit_lists_valid_choices() -> None:
    model, inputs = TARGETS["llama"](batch=1, length=12)  # 4 query heads, 2 kv heads
    plan = {"passes": [{SP: {"strategy": "ulysses_ring", "group_size": 4, "ulysses_size": 3}}]}
    with pytest.raises(PassError, match=r"valid ulysses x ring factorisations: 1 x 4, 2 x 2, 4 x 1"):
        rewrite.optimize(model, plan, example_kwargs=inputs)
    plan = {"passes": [{SP: {"strategy": "ulysses_ring", "group_size": 12, "ulysses_size": 8}}]}
    with pytest.raises(PassError, match=r"factorisations: 1 x 12, 2 x 6, 4 x 3\)"):
        rewrite.optimize(model, plan, example_kwargs=inputs)


def test_auto_takes_ulysses_ring_where_ulysses_cannot_split_the_heads() -> None:
    model, inputs = TARGETS["llama"](batch=1, length=16)  # 4 query heads: Ulysses alone cannot use 8 ranks
    om = rewrite.optimize(model, {"passes": [{SP: {"group_size": 8, "expected_seq": 4096}}]}, example_kwargs=inputs)
    (result,) = [r for r in om.report.results if r.name == SP]
    # 2 x 4 exposes the least: its all-to-alls are smaller than 4 x 2's and its ring steps are mostly hidden
    assert result.changed == [f"layer {i} (model.layers.{i}): softmax attention -> ulysses_ring (2 x 4)"
                              for i in range(2)], result.changed
    assert all(f"{name} " in result.messages[0] for name in ("ring", "ulysses_ring 2x4", "ulysses_ring 4x2"))
    assert "ulysses " not in result.messages[0]  # 8 ranks cannot split 4 heads
    from rewrite.distributed.graph_functions import sp_attention

    assert [n.kwargs["inner"] for n in om.program.graph.nodes if n.target is sp_attention] == [2, 2]


def test_convolutions_over_the_tokens_split_only_in_the_causal_depthwise_form() -> None:
    """A dense conv over the tokens is refused naming its module; LFM2's causal short conv on packed rows too (its
    halo would read across a sequence start)."""
    from test_stateful_conv import built

    model, ids = built(3, depthwise=False)
    with pytest.raises(PassError, match=r"a convolution over the tokens of this form cannot be split along the "
                                        r"sequence; supported: a causal depthwise conv") as info:
        rewrite.optimize(model, {"passes": [{SP: {"group_size": 2, "strategy": "ring"}}]}, (ids,))
    assert info.value.module_path == "conv"
    model, inputs = TARGETS["lfm2"](batch=1, length=16)
    packed = {"input_ids": inputs["input_ids"], "position_ids": torch.cat([torch.arange(8), torch.arange(8)])[None]}
    with pytest.raises(PassError, match="causal conv over the tokens has no sequence-parallel form for packed"):
        rewrite.optimize(model, {"passes": [{SP: {"group_size": 2, "strategy": "ring", "packed": "position_ids"}}]},
                         example_kwargs=packed)


def test_packed_option_errors_name_the_input_and_the_kind() -> None:
    model, inputs = TARGETS["llama"](batch=1, length=16)
    with pytest.raises(PlanError, match="sequence_parallel.packed.*position_ids"):
        rewrite.optimize(model, {"passes": [{SP: {"group_size": 2, "strategy": "ring", "packed": "position_ids"}}]},
                         example_kwargs={"input_ids": inputs["input_ids"]})
    packed = {"input_ids": inputs["input_ids"], "position_ids": torch.cat([torch.arange(8), torch.arange(8)])[None]}
    plan = {"passes": [{"mixer": {"kind": "mamba2"}}, {SP: {"group_size": 2, "packed": "position_ids"}}]}
    with pytest.raises(PassError, match="'mamba2' has no sequence-parallel form for packed sequences"):
        rewrite.optimize(model, plan, example_kwargs=packed)


def test_bad_plan_fields_are_named() -> None:
    model, inputs = TARGETS["llama"](batch=1, length=8)
    with pytest.raises(PlanError, match="sequence_parallel.strategy"):
        rewrite.optimize(model, {"passes": [{SP: {"strategy": "allscan", "layout": "zigzag"}}]}, example_kwargs=inputs)
    with pytest.raises(PlanError, match="sequence_parallel.group_size"):
        rewrite.optimize(model, {"passes": [{SP: {"strategy": "auto"}}]}, example_kwargs=inputs)
    with pytest.raises(PlanError, match="sequence_parallel.layout"):
        rewrite.optimize(model, {"passes": [{SP: {"layout": "striped", "group_size": 2}}]}, example_kwargs=inputs)


def test_sliding_window_mixer_is_refused_naming_the_layer() -> None:
    model, inputs = TARGETS["llama"](batch=1, length=8)
    plan = {"passes": [{"mixer": {"kind": "sliding_window", "window": 4}}, {SP: {"group_size": 2}}]}
    with pytest.raises(PassError, match="layer 0.*sliding_window"):
        rewrite.optimize(model, plan, example_kwargs=inputs)


def test_unknown_group_is_an_error() -> None:
    from rewrite.distributed import get_group

    with pytest.raises(GroupError, match="unknown sequence group 'nope'"):
        get_group("nope")


def test_simulated_ranks_benchmark_matches_single_model_and_predicted_bytes(tmp_path) -> None:
    from benchmarks import sequence_parallel_simulated

    checks = sequence_parallel_simulated.main(
        ["--tiny", "--sizes", "4", "--models", "hybrid", "--softmax", "ulysses_ring", "--ulysses-size", "2",
         "--out", str(tmp_path / "sim.json")])
    assert [c["P"] for c in checks] == [4]
    assert checks[0]["bytes_match"]
    assert checks[0]["rel_err_vs_single"] < 1e-5


def test_example_runs_at_tiny_size() -> None:
    from examples import sequence_parallel as example

    assert example.main(["--tiny", "--threads", "2", "--layout", "zigzag"]) < 1e-5


def test_explain_shows_the_strategy_chosen_per_layer(capsys) -> None:
    from rewrite.cli import main as cli

    plan = "{passes: [{mixer: {kind: gla, layers: [0]}}, {sequence_parallel: {group_size: 4, strategy: {softmax: ring}}}]}"
    cli(["explain", "llama", "--plan", plan, "--seq", "4k"])
    out = capsys.readouterr().out
    assert "sequence_parallel: layer 1 (model.layers.1): ring (asked)" in out
    assert "auto at P 4:" in out


def _brute_force_step(lengths: list[int], gpus: int, sizes: tuple[int, ...], cap: int, cost) -> float:
    """The best step time by trying every multiset of group sizes and every assignment (tiny cases)."""
    import itertools

    best = float("inf")
    for count in range(1, gpus + 1):
        for groups in itertools.combinations_with_replacement(sizes, count):
            if sum(groups) > gpus:
                continue
            for choice in itertools.product(range(count), repeat=len(lengths)):
                if any(lengths[i] > groups[g] * cap for i, g in enumerate(choice)):
                    continue
                loads = [sum(cost.seconds(lengths[i], groups[g]) for i in range(len(lengths)) if choice[i] == g)
                         for g in range(count)]
                best = min(best, max(loads))
    return best


def test_flexsp_assignment_is_optimal_against_brute_force() -> None:
    pytest.importorskip("scipy")
    from rewrite.distributed.flexsp import SequenceCost, assign

    lengths, gpus, sizes, cap = [8192, 1024, 3000, 512, 6000], 4, (1, 2, 4), 4096
    cost = SequenceCost(quadratic=1e-10, linear=1e-6, comm_per_token=5e-7)
    result = assign(lengths, gpus, sizes=sizes, max_tokens_per_gpu=cap, cost=cost)
    assert sorted(i for _, members in result.groups for i in members) == list(range(len(lengths)))
    assert sum(size for size, _ in result.groups) <= gpus
    loads = [sum(cost.seconds(lengths[i], size) for i in members) for size, members in result.groups]
    assert max(loads) == pytest.approx(result.step_seconds, rel=1e-6)
    assert result.step_seconds == pytest.approx(_brute_force_step(lengths, gpus, sizes, cap, cost), rel=1e-6)
    with pytest.raises(ValueError, match="does not fit the largest group"):
        assign([20000], gpus, sizes=sizes, max_tokens_per_gpu=cap, cost=cost)


def _split_against_whole(size: int, layout: str, whole, split, inputs: list[torch.Tensor], seq_dims: list) -> None:
    """`split(group, *shards)` on threads equals `whole(*inputs)`, outputs and every input's gradient."""
    leaves = [x.clone().requires_grad_(x.is_floating_point()) for x in inputs]
    expected = whole(*leaves)
    probe = torch.randn(expected.shape, generator=torch.Generator().manual_seed(2)).to(expected)
    (expected * probe).sum().backward()

    def work(group):
        parts = [(shard(x, group.rank, size, layout, d) if d is not None else x).detach().clone()
                 .requires_grad_(x.is_floating_point()) for x, d in zip(inputs, seq_dims)]
        out = split(group, *parts)
        (out * shard(probe, group.rank, size, layout, 1)).sum().backward()
        return out.detach(), [p.grad for p in parts]

    results = _on_threads(size, work)
    torch.testing.assert_close(unshard([r[0] for r in results], layout), expected.detach(), **_tolerance(expected))
    for i, (leaf, dim) in enumerate(zip(leaves, seq_dims)):
        if leaf.grad is None:
            continue
        got = (sum(r[1][i] for r in results) if dim is None
               else unshard([r[1][i] for r in results], layout, dim))
        torch.testing.assert_close(got, leaf.grad, **_tolerance(leaf.grad))


def _under_sp(fn, strategy: str, layout: str):
    from rewrite.distributed.recurrent_kernels import SequenceParallelKernels

    def run(group, *args):
        with SequenceParallelKernels(group, layout=layout, strategy=strategy, scan_blocks=3):
            return fn(*args)

    return run


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_short_conv_halo_exchange(layout: str) -> None:
    from rewrite.kernels.short_conv import short_conv

    def conv(x, w, b):
        return short_conv(x, w, b, activation="silu")[0]

    inputs = [torch.randn(2, 16, 6), torch.randn(6, 3), torch.randn(6)]
    _split_against_whole(4, layout, conv, _under_sp(conv, "lasp2", layout), inputs, [1, None, None])


@pytest.mark.parametrize(("strategy", "layout", "save"), [("allscan", "contiguous", False), ("lasp2", "zigzag", False),
                                                      ("allscan", "contiguous", True)])
def test_delta_rule_chunk_transitions(strategy: str, layout: str, save: bool, monkeypatch) -> None:
    """save: the delta rule's SAVE_FOR_BACKWARD on (its `_saving` op takes the split form too)."""
    from rewrite.kernels.delta_rule import delta_rule
    from rewrite.kernels.delta_rule import op as delta_op

    monkeypatch.setattr(delta_op, "SAVE_FOR_BACKWARD", save)

    def rule(q, k, v, beta, g):
        return delta_rule(q, k, v, beta, g)[0]

    q, v = torch.randn(2, 16, 4, 8), torch.randn(2, 16, 2, 8)
    k = torch.nn.functional.normalize(torch.randn(2, 16, 2, 8), dim=-1)
    beta, g = torch.rand(2, 16, 2), torch.nn.functional.logsigmoid(torch.randn(2, 16, 2))
    _split_against_whole(4, layout, rule, _under_sp(rule, strategy, layout), [q, k, v, beta, g], [1] * 5)


@pytest.mark.parametrize(("decay", "save"), [("constant", False), ("vector", False), ("vector", True)])
def test_linear_attention_decays_zigzag(decay: str, save: bool, monkeypatch) -> None:
    """save: linear attention's SAVE_STATES on (its `_saving` op takes the split form too)."""
    from rewrite.kernels.linear_attention import linear_attention
    from rewrite.kernels.linear_attention import op as la_op

    monkeypatch.setattr(la_op, "SAVE_STATES", save)

    def attend(q, k, v, g):
        return linear_attention(q, k, v, g, decay=decay)[0]

    q, k, v = torch.randn(1, 16, 4, 8), torch.randn(1, 16, 2, 8) * 0.5, torch.randn(1, 16, 2, 8)
    g = torch.nn.functional.logsigmoid(torch.randn(2) if decay == "constant" else torch.randn(1, 16, 2, 8))
    seq_dims = [1, 1, 1, None if decay == "constant" else 1]
    _split_against_whole(4, "zigzag", attend, _under_sp(attend, "lasp2", "zigzag"), [q, k, v, g], seq_dims)


@pytest.mark.parametrize("save", [False, True])
def test_linear_attention_key_gate_zigzag(save: bool, monkeypatch) -> None:
    """The vector key gate that the kernels compute from the raw keys (the ops' key_gate): the split form computes
    it from the raw keys itself; outputs and gradients (the keys' through the attention and the gate) as unsplit."""
    from rewrite.kernels.linear_attention import api as la_api
    from rewrite.kernels.linear_attention import linear_attention
    from rewrite.kernels.linear_attention import op as la_op

    monkeypatch.setattr(la_op, "SAVE_STATES", save)
    monkeypatch.setattr(la_api, "KERNEL_KEY_GATE", True)

    def attend(q, k, v):
        return linear_attention(q, k, v, key_gate_normalizer=4.0, feature_map="elu")[0]

    q, k, v = torch.randn(1, 16, 4, 8), torch.randn(1, 16, 2, 8), torch.randn(1, 16, 2, 8)
    _split_against_whole(4, "zigzag", attend, _under_sp(attend, "lasp2", "zigzag"), [q, k, v], [1, 1, 1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("strategy", ["lasp2", "allscan"])
def test_gated_linear_attention_with_triton_kernels_on_gpu(strategy: str) -> None:
    from rewrite.kernels.linear_attention import linear_attention

    def attend(q, k, v, g):
        return linear_attention(q, k, v, g, decay="vector")[0]

    device = "cuda"
    q, k, v = (torch.randn(1, 512, 4, 64, device=device), torch.randn(1, 512, 2, 64, device=device) * 0.2,
               torch.randn(1, 512, 2, 64, device=device))
    g = torch.nn.functional.logsigmoid(torch.randn(1, 512, 2, 64, device=device)) / 8
    _split_against_whole(4, "contiguous", attend, _under_sp(attend, strategy, "contiguous"), [q, k, v, g], [1] * 4)


def test_packed_varlen_graph_is_refused_not_left_unsplit() -> None:
    model, inputs = TARGETS["llama"](batch=2, length=16)
    plan = {"passes": ["varlen", {SP: {"group_size": 2, "strategy": "ring"}}]}
    with pytest.raises(PassError, match="packed variable-length sequences"):
        rewrite.optimize(model, plan, example_kwargs=inputs)


def test_cost_model_counts_one_ranks_attention_against_the_whole_sequence() -> None:
    from rewrite.cost_model import estimate
    from rewrite.distributed.graph_functions import sp_attention
    from rewrite.ir_ops import SDPA

    model, inputs = TARGETS["llama"](batch=1, length=16)
    whole = rewrite.optimize(copy.deepcopy(model), {"passes": []}, example_kwargs=inputs)
    split = rewrite.optimize(copy.deepcopy(model), {"passes": [{SP: {"group_size": 4, "strategy": "ulysses"}}]},
                             example_kwargs=inputs)

    def attention_flops(om, target) -> float:
        report = estimate(om.program)
        names = [n.name for n in om.program.graph.nodes if n.target is target]
        assert len(names) == 2
        return sum(report.node_costs[name].evaluate(1024, 1)["flops"] for name in names)

    # at the same shard length, each rank's queries meet keys 4x as long
    assert attention_flops(split, sp_attention) == pytest.approx(4 * attention_flops(whole, SDPA), rel=1e-12)
