"""Entry points other than `rewrite.optimize` on families the passes were not written around: the `torch.compile`
backend (attention_normalize and gla against the eager model / eager optimize, varlen on padded encoder batches and on
windowed decoders), the CLI on a family given as `file.py:factory`, `om.generate` with left-padded prompts of
different lengths, and sequence-parallel gradients (ranks as threads). A Hugging Face decoder called under
torch.compile with its KV cache (use_cache=True, its default, or past_key_values) is refused by the passes that
cannot carry that cache, naming the layer, where a cached decode step was left as softmax before."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from test_family_kinds import phi3, qwen3, starcoder2
from test_unfamiliar_families import (
    PROBED_ENCODERS,
    build,
    falcon_gqa,
    gemma,
    gpt_neox,
    mistral_window,
    modernbert,
    olmo2,
    right_padded,
)

import rewrite
from rewrite import cli
from rewrite.compile_backend import CompileReport
from rewrite.distributed import bind_group, run_on_threads, shard, shard_inputs, threaded_groups
from rewrite.distributed.layout import unshard
from rewrite.errors import PassError, RewriteError

pytest.importorskip("transformers")

DECODERS = {"qwen3": qwen3, "phi3": phi3, "gemma": gemma, "falcon_gqa": falcon_gqa, "olmo2": olmo2,
            "gpt_neox": gpt_neox}
ENCODERS = {"roberta": PROBED_ENCODERS["roberta"], "distilbert": PROBED_ENCODERS["distilbert"],
            "modernbert": modernbert}
TOL = {"atol": 1e-5, "rtol": 1e-5}
GLA = [{"mixer": {"kind": "gla"}}]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(model: torch.nn.Module, plan: object, reports: list[CompileReport], dynamic: bool | None = None):
    options = {"plan": plan, "inductor": False, "on_report": reports.append}
    return torch.compile(model, backend="rewrite", dynamic=dynamic, options=options)


def _inner(error: BaseException) -> BaseException:
    """The backend's own exception inside Dynamo's wrapper."""
    return getattr(error, "inner_exception", None) or error.__cause__ or error


def _main(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# --- torch.compile backend ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [*DECODERS, "roberta", "modernbert"])
def test_compiled_attention_normalize_equals_the_model_at_two_shapes(family: str) -> None:
    """Every site becomes one canonical attention, and a second shape (Dynamo recompiles) still equals the model."""
    model = build({**DECODERS, **ENCODERS}[family])
    extra = {"use_cache": False} if family in DECODERS else {}
    reports: list[CompileReport] = []
    compiled = _compiled(model, ["attention_normalize"], reports)
    for batch in (right_padded([12, 7], 12), right_padded([9, 4], 9)):
        with torch.no_grad():
            got, want = _main(compiled(**batch, **extra)), _main(model(**batch, **extra))
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(got[real], want[real], **TOL)
        assert len(reports[-1].pipeline.results[0].changed) == 2
    assert len(reports) == 2


@pytest.mark.parametrize("family", ["qwen3", "phi3", "gemma", "falcon_gqa"])
def test_compiled_gla_equals_eager_optimize_of_the_same_plan(family: str) -> None:
    model = build(DECODERS[family])
    batch = right_padded([12, 7], 12)
    reports: list[CompileReport] = []
    with torch.no_grad():
        got = _compiled(model, GLA, reports)(**batch, use_cache=False).logits
        want = rewrite.optimize(model, GLA, example_kwargs=batch)(**batch).logits
    assert [c.split(": ")[-1] for c in reports[0].pipeline.results[0].changed] == ["gla", "gla"]
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], **TOL)


@pytest.mark.parametrize("family", ["roberta", "distilbert", "modernbert", "mistral_window"])
def test_compiled_varlen_equals_the_model_on_real_tokens(family: str) -> None:
    """dynamic=True: one graph for both batches. The first batch is shorter than ModernBERT's local window (4 keys
    each side) and Mistral's causal window (8), the second longer: the windows are kept, not taken for full
    attention."""
    model = build(ENCODERS.get(family) or (lambda: mistral_window(8)))
    extra = {"use_cache": False} if family == "mistral_window" else {}
    reports: list[CompileReport] = []
    compiled = _compiled(model, ["varlen"], reports, dynamic=True)
    for batch in (right_padded([6, 4], 6), right_padded([20, 9, 3], 20)):
        with torch.no_grad():
            got, want = _main(compiled(**batch, **extra)), _main(model(**batch, **extra))
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(got[real], want[real], **TOL)
    assert len(reports) == 1 and len(reports[0].pipeline.results[0].changed) == 2


def test_compiled_varlen_without_dynamic_names_the_setting() -> None:
    """Dynamo's first graph has fixed sizes unless compiled with dynamic=True; the error says so (it blamed a
    too-short example or a model that fixes the length)."""
    compiled = _compiled(build(ENCODERS["roberta"]), ["varlen"], [])
    with pytest.raises(Exception) as info, torch.no_grad():
        compiled(**right_padded([8, 5], 8))
    assert isinstance(_inner(info.value), RewriteError)
    assert "dynamic=True" in str(_inner(info.value))


def test_compiled_gla_refuses_a_decode_step_over_a_kv_cache() -> None:
    """With its default use_cache=True the compiled decoder returns a KV cache; a call continuing from it attends over
    cached keys, which a linear mixer cannot carry. It was left as softmax attention (logits 0.16 away from the
    linearized model's); it is refused naming the layer and how to decode a linearized model."""
    model = build(qwen3)
    ids = right_padded([8, 8], 8)["input_ids"]
    compiled = _compiled(model, GLA, [])
    with torch.no_grad():
        prefill = compiled(input_ids=ids)  # the cache starts empty: this call's attention is its own
        want = rewrite.optimize(model, GLA, example_kwargs={"input_ids": ids})(input_ids=ids).logits
        torch.testing.assert_close(prefill.logits, want, **TOL)
        with pytest.raises(Exception) as info:
            compiled(input_ids=ids[:, :1], past_key_values=prefill.past_key_values)
    error = _inner(info.value)
    assert isinstance(error, PassError) and error.module_path == "model.layers.0.self_attn"
    assert "cannot linearize the attention of layer 0" in str(error) and "use_cache=False" in str(error)
    assert "'stateful'" in str(error)


@pytest.mark.parametrize("plan", [["varlen"], ["stateful"], [{"layer_skip": {"threshold": 1.0}}]],
                         ids=["varlen", "stateful", "layer_skip"])
def test_compiled_decoder_with_its_kv_cache_is_refused_naming_use_cache(plan: list) -> None:
    """Padding-free and decode programs keep no caller's cache, and a routed block returns one value: refused at the
    layer, saying to call with use_cache=False (varlen failed at a `cat` it could not prove token-wise and layer_skip
    at a block with three outputs, neither naming the cause); called so, the routed model equals the original."""
    model = build(qwen3)
    batch = right_padded([8, 5], 8)
    compiled = _compiled(model, plan, [], dynamic=True)
    with pytest.raises(Exception) as info, torch.no_grad():
        compiled(**batch)
    error = _inner(info.value)
    assert isinstance(error, PassError) and "use_cache=False" in str(error)
    if "layer_skip" in plan[0]:
        assert error.module_path == "model.layers.0" and "a KV cache" in str(error)
        torch._dynamo.reset()
        with torch.no_grad():
            got = _compiled(model, plan, [], dynamic=True)(**batch, use_cache=False).logits
            assert torch.equal(got, model(**batch, use_cache=False).logits)
    else:
        assert error.module_path == "model.layers.0.self_attn" and "keys are joined along the tokens" in str(error)


# --- CLI ----------------------------------------------------------------------------------------------------------


def gemma_target() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A CLI target: Gemma (multi-query, scaled embeddings) with a right-padded batch."""
    return build(gemma), right_padded([8, 5], 8)


def falcon_gqa_target() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A CLI target: Falcon's new decoder architecture (fused grouped q / k / v)."""
    return build(falcon_gqa), right_padded([8, 5], 8)


def roberta_target() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A CLI target: RoBERTa (positions counted from the token ids)."""
    return build(ENCODERS["roberta"]), right_padded([8, 5], 8)


@pytest.mark.parametrize(("target", "plan", "stage", "new_op"), [
    ("gemma_target", "{passes: [{mixer: {kind: gla}}]}", "mixer", "gla_mixer"),
    ("falcon_gqa_target", "attention_normalize", "attention_normalize", "rewrite.attention"),
    ("roberta_target", "varlen", "varlen", "packed_attention"),
])
def test_cli_dumps_a_family_given_as_a_factory(capsys, target: str, plan: str, stage: str, new_op: str) -> None:
    """The CLI takes no Hugging Face config or family name (built-in names, `file.py:factory`, `module:factory`);
    a family as a factory in a file dumps the pass's stage with both layers' attention replaced."""
    code = cli.main(["dump", f"{Path(__file__)}:{target}", "--plan", plan, "--stage", stage, "--format", "json", "-q"])
    dumped = json.loads(capsys.readouterr().out)
    assert code == 0 and [s["name"] for s in dumped["stages"]] == [stage]
    ops = Counter(node["op"] for node in dumped["stages"][0]["nodes"])
    assert ops[new_op] == 2 and ops["aten.scaled_dot_product_attention"] == 0
    assert cli.main(["dump", "gemma", "-q"]) == 2
    assert "unknown target 'gemma'" in capsys.readouterr().err


# --- generate -----------------------------------------------------------------------------------------------------


def _left_padded(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompts as rows, left-padded ids, mask): each row's prompt is its first `length` ids."""
    raw = right_padded(lengths, max(lengths))["input_ids"]
    ids, mask = torch.zeros_like(raw), torch.zeros_like(raw)
    for row, length in enumerate(lengths):
        ids[row, -length:], mask[row, -length:] = raw[row, :length], 1
    return raw, ids, mask


@pytest.mark.parametrize(("family", "kind"), [("qwen3", "gla"), ("phi3", "retention"), ("gemma", "gla"),
                                              ("starcoder2", "retention")])
def test_batched_left_padded_generate_equals_each_prompt_alone(family: str, kind: str) -> None:
    """Greedy tokens of prompts of 9, 5 and 7 tokens batched with left padding equal each prompt's own generation,
    which equals re-running the linearized forward on the whole sequence per token."""
    model = build({**DECODERS, "starcoder2": starcoder2}[family])
    om = rewrite.optimize(model, [{"mixer": {"kind": kind}}, "stateful"], example_kwargs=right_padded([8, 5], 8))
    lengths, new = [9, 5, 7], 4
    raw, ids, mask = _left_padded(lengths)
    with torch.no_grad():
        batched = om.generate(ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[])
        for row, length in enumerate(lengths):
            alone = om.generate(raw[row:row + 1, :length], max_new_tokens=new, eos_token_id=[])
            assert torch.equal(batched[row, -(length + new):], alone[0]), f"row {row}"
            seq = raw[row:row + 1, :length]
            for _ in range(new):
                seq = torch.cat([seq, om(input_ids=seq).logits[:, -1:].argmax(-1)], 1)
            assert torch.equal(alone, seq), f"row {row}"


# --- sequence parallel backward -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "kind", "strategy", "layout"), [
    ("gemma", "gla", "lasp2", "zigzag"), ("olmo2", None, "ring", "zigzag"), ("falcon_gqa", None, "ulysses",
                                                                             "contiguous")])
def test_sequence_parallel_gradients_equal_one_process(family: str, kind: str | None, strategy: str,
                                                       layout: str) -> None:
    """Two ranks as threads share the split module, so its gradients sum over the ranks in place; they, and the
    outputs at real tokens, equal the single-process module's on the whole padded batch."""
    model = build(DECODERS[family])
    batch = right_padded([16, 11], 16)
    passes = [{"mixer": {"kind": kind}}] if kind else []
    reference = rewrite.optimize(copy.deepcopy(model), passes, example_kwargs=batch) if passes else copy.deepcopy(model)
    split = rewrite.optimize(copy.deepcopy(model), [*passes, {"sequence_parallel": {"strategy": strategy,
                                                                                   "layout": layout}}],
                             example_kwargs=batch)
    split.load_state_dict(reference.state_dict())
    real = batch["attention_mask"].bool()
    full = reference(**batch, **({} if passes else {"use_cache": False})).logits
    weight = torch.randn(full.shape, generator=torch.Generator().manual_seed(1)) * real[..., None]
    (full * weight).sum().backward()
    groups = threaded_groups(2)

    def step(rank: int) -> torch.Tensor:
        with bind_group("world", groups[rank]):
            local = split(**shard_inputs(batch, group="world", layout=layout)).logits
            (local * shard(weight, rank, 2, layout)).sum().backward()
            return local.detach()

    got = unshard(run_on_threads(groups, step), layout)
    torch.testing.assert_close(got[real], full.detach()[real], **TOL)
    reference_grads = dict(reference.named_parameters())
    checked = 0
    for name, param in split.named_parameters():
        want = reference_grads[name].grad
        if want is None:
            assert param.grad is None or not param.grad.any(), name
            continue
        tolerance = {"rtol": 1e-4, "atol": 1e-5 * max(1.0, float(want.abs().max()))}
        torch.testing.assert_close(param.grad, want, **tolerance, msg=lambda m, n=name: f"grad of {n}: {m}")
        checked += 1
    assert checked > 10

