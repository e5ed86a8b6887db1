"""Pass `layer_skip` against the original run with the same layers skipped by hand; router training,
evaluation, the CLI command and the example at tiny sizes."""

from __future__ import annotations

import copy
import math

import pytest
import sympy
import torch
import torch.fx as fx
from conftest import HostReads, OpCounts, main_output, reference_kwargs, split_example

import rewrite
from examples import layer_skip as example
from examples import models
from rewrite.analysis import BATCH, SEQ
from rewrite.cli import main as cli_main
from rewrite.cost_model import estimate
from rewrite.errors import PassError, PlanError
from rewrite.routing import RoutedBlock, last_call_probabilities, record_skips, skip_controls
from rewrite.routing.evaluation import (
    best_static_skip,
    continuation_perplexity,
    router_probabilities,
    skip_set_losses,
    top_k_decisions,
)
from rewrite.routing.training import LoraSettings, RouterTrainingConfig, set_cost_labels, train_routers

PLAN = {"passes": [{"layer_skip": {}}]}


def optimize(model, example, plan=PLAN):
    args, kwargs = split_example(example)
    return rewrite.optimize(model, plan, args, example_kwargs=kwargs)


def call(module, example, **controls):
    args, kwargs = split_example(example)
    with torch.no_grad(), skip_controls(**controls), record_skips() as report:
        out = module(*args, **kwargs)
    return main_output(out), report


def randomize_routers(om, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in om.named_parameters():
            if ".router." in name:
                p.copy_(torch.randn(p.shape, generator=g) * (3.0 if name.endswith("bias") else 1.0))


def row(example, b):
    """Row b of every tensor input (batch is dim 0)."""
    args, kwargs = split_example(example)
    pick = lambda x: x[b : b + 1] if isinstance(x, torch.Tensor) else x  # noqa: E731
    if args:
        return tuple(pick(a) for a in args)
    return {k: pick(v) for k, v in kwargs.items()}


def _pass_through(module, args, kwargs, out):
    hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("src"))
    return hidden if isinstance(out, torch.Tensor) else (hidden, *out[1:])


def reference_with_skips(model, layers, example, skip):
    """The original model run one sequence at a time, each layer it skips replaced by the identity."""
    outs = []
    for b in range(skip.shape[0]):
        handles = [
            layer.register_forward_hook(_pass_through, with_kwargs=True)
            for layer, skipped in zip(layers, skip[b].tolist())
            if skipped
        ]
        try:
            args, kwargs = split_example(row(example, b))
            with torch.no_grad():
                outs.append(main_output(model(*args, **reference_kwargs(model, kwargs))))
        finally:
            for h in handles:
                h.remove()
    return torch.cat(outs)


def handwritten_with_skips(model, ids, skip):
    """HandwrittenLM's forward written out, with skipped blocks left out per sequence."""
    outs = []
    for b in range(ids.shape[0]):
        x = model.embed(ids[b : b + 1])
        for block, skipped in zip(model.blocks, skip[b].tolist()):
            if not skipped:
                x = x + block["attn"](block["norm1"](x))
                x = x + block["mlp"](block["norm2"](x))
        outs.append(model.norm(x) @ model.embed.weight.T)
    return torch.cat(outs)


def single_head_llama():
    """One attention head: the rotary cos / sin entering each block are as wide as the hidden state."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1,
                                      num_key_value_heads=1, vocab_size=64, max_position_embeddings=64)
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(0))
    return transformers.LlamaForCausalLM(config).eval(), {"input_ids": ids}


FAMILIES = {
    "llama": (lambda: models.llama(batch=3, length=10), lambda m: m.model.layers),
    "llama_single_head": (single_head_llama, lambda m: m.model.layers),
    "gpt2": (lambda: models.gpt2(batch=3, length=10), lambda m: m.transformer.h),
    "bert": (lambda: models.bert(batch=3, length=10), lambda m: m.encoder.layer),
    "transformer_encoder": (lambda: models.transformer_encoder(batch=3, length=10), lambda m: m.layers),
    "minilm": (lambda: models.minilm(batch=3, length=12), lambda m: m.encoder.layer),
}

MASK = torch.tensor([[True, False], [False, False], [False, True]])
MINILM_MASK = torch.tensor([[True, False, True, False, False, True], [False] * 6, [False, True, True, True, True, False]])


@pytest.mark.parametrize("family", [*FAMILIES, "handwritten"])
def test_threshold_that_never_skips_gives_the_original_outputs_exactly(family):
    model, example = models.handwritten(batch=3, length=10) if family == "handwritten" else FAMILIES[family][0]()
    om = optimize(model, example)
    randomize_routers(om)
    got, report = call(om, example, threshold=1.0)
    args, kwargs = split_example(example)
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused nn.TransformerEncoder path rounds differently
    try:
        with torch.no_grad():
            want = main_output(model(*args, **reference_kwargs(model, kwargs)))
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    assert torch.equal(got, want)
    assert not report.decisions.any()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_skip_mask_matches_the_original_with_those_layers_skipped(family):
    build, layers_of = FAMILIES[family]
    model, example = build()
    om = optimize(model, example)
    mask = MINILM_MASK if family == "minilm" else MASK
    got, report = call(om, example, skip_mask=mask)
    assert torch.equal(report.decisions, mask)
    want = reference_with_skips(model, list(layers_of(model)), example, mask)
    if "attention_mask" in split_example(example)[1]:
        keep = split_example(example)[1]["attention_mask"].bool()
        got, want = got[keep], want[keep]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_handwritten_module_skips_per_sequence():
    model, (ids,) = models.handwritten(batch=3, length=10)
    om = optimize(model, (ids,))
    got, _ = call(om, (ids,), skip_mask=MASK)
    with torch.no_grad():
        want = handwritten_with_skips(model, ids, MASK)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_everything_skipped_reduces_llama_to_embeddings_and_head():
    model, example = models.llama(batch=2, length=10)
    om = optimize(model, example)
    got, report = call(om, example, threshold=-1.0)
    assert report.decisions.all()
    with torch.no_grad():
        want = model.lm_head(model.model.norm(model.model.embed_tokens(example["input_ids"])))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_everything_skipped_reduces_gpt2_to_embeddings_and_head():
    model, example = models.gpt2(batch=2, length=10)
    om = optimize(model, example)
    got, _ = call(om, example, budget=1.0)
    ids = example["input_ids"]
    with torch.no_grad():
        t = model.transformer
        want = model.lm_head(t.ln_f(t.wte(ids) + t.wpe(torch.arange(ids.shape[1]))))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_decisions_follow_the_routers_on_each_blocks_pooled_input():
    model, example = models.llama(batch=4, length=10)
    om = optimize(model, example)
    randomize_routers(om, seed=3)
    _, report = call(om, example, threshold=1.0)
    with torch.no_grad():
        states = model(**example, use_cache=False, output_hidden_states=True).hidden_states
    params = dict(om.named_parameters())
    for j, layer in enumerate(report.layers):
        w, b = params[f"{layer}.router.weight"], params[f"{layer}.router.bias"]
        want = torch.sigmoid(states[j].double().mean(1) @ w.double() + b.double())
        torch.testing.assert_close(report.last.probabilities[j].double(), want, atol=1e-6, rtol=1e-6)
    threshold = float(torch.stack(report.last.probabilities).median())
    _, thresholded = call(om, example, threshold=threshold)
    probs = torch.stack(report.last.probabilities, dim=1)
    first = probs[:, 0] > threshold
    assert torch.equal(thresholded.decisions[:, 0], first)


def count_block_calls(om):
    """Wrap every routed block's body so that each call records the batch size it ran on."""
    calls: dict[str, list[int]] = {}
    for node in om.graph.nodes:
        if isinstance(node.target, RoutedBlock):
            block = node.target
            body = block.body
            calls[block.layer] = []

            def counted(*inputs, _body=body, _log=calls[block.layer]):
                _log.append(inputs[0].shape[0])
                return _body(*inputs)

            block.body = counted
    return calls


def test_skipped_rows_are_not_computed_and_a_fully_skipped_block_is_not_called():
    model, example = models.llama(batch=3, length=10)
    om = optimize(model, example)
    calls = count_block_calls(om)
    call(om, example, skip_mask=torch.tensor([[True, True], [False, True], [True, True]]))
    assert calls == {"model.layers.0": [1], "model.layers.1": []}


def test_a_held_mask_is_prepared_once_then_calls_read_nothing_and_skipping_nothing_runs_the_unrouted_ops():
    model, example = models.llama(batch=3, length=1)  # a decode-sized call: one token per sequence
    om = optimize(model, example)
    plain = optimize(model, example, {"passes": []})
    args, kwargs = split_example(example)
    spread = torch.tensor([[True, False], [False, True], [False, False]])

    def watched(module, watch, mask=None):
        with torch.no_grad(), skip_controls(skip_mask=mask), watch() as w:
            module(*args, **kwargs)
        return w

    for mask in (spread, torch.zeros(3, 2, dtype=torch.bool)):
        assert watched(om, HostReads, mask).seen  # a new mask is read once (the counter sees it)
        for _ in range(2):  # the same mask again: prepared already, nothing is read on the host
            assert watched(om, HostReads, mask).seen == []
    assert watched(om, OpCounts, torch.zeros(3, 2, dtype=torch.bool)).ops != watched(plain, OpCounts).ops
    nothing = torch.zeros(3, 2, dtype=torch.bool)
    watched(om, OpCounts, nothing)
    assert watched(om, OpCounts, nothing).ops == watched(plain, OpCounts).ops
    nothing[0, 1] = True  # changed in place: prepared again, and applied
    got, report = call(om, example, skip_mask=nothing)
    assert torch.equal(report.decisions, nothing)
    torch.testing.assert_close(got, reference_with_skips(model, list(model.model.layers), example, nothing),
                               atol=1e-5, rtol=1e-5)


def test_decisions_made_at_prefill_hold_during_decode():
    model, example = models.llama(batch=3, length=8)
    om = optimize(model, example)
    randomize_routers(om, seed=1)
    _, prefill = call(om, example)
    decisions = prefill.decisions
    ids, mask = example["input_ids"], example["attention_mask"]
    for _ in range(3):
        logits, step = call(om, {"input_ids": ids, "attention_mask": mask}, skip_mask=decisions)
        assert torch.equal(step.decisions, decisions)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    want = reference_with_skips(model, list(model.model.layers), {"input_ids": ids, "attention_mask": mask}, decisions)
    got, _ = call(om, {"input_ids": ids, "attention_mask": mask}, skip_mask=decisions)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], atol=1e-5, rtol=1e-5)


def test_budget_skips_the_same_number_of_blocks_in_every_sequence():
    model, example = models.bert(batch=4, length=10)
    om = optimize(model, example)
    randomize_routers(om, seed=2)
    for budget, per_row in ((0.5, 1), (1.0, 2), (0.0, 0)):
        _, report = call(om, example, budget=budget)
        assert report.decisions.sum(1).tolist() == [per_row] * 4


def test_router_parameters_have_readable_names_and_survive_save_and_load(tmp_path):
    model, example = models.gpt2(batch=3, length=10)
    om = optimize(model, example)
    randomize_routers(om, seed=4)
    names = [n for n, _ in om.named_parameters() if "router" in n]
    assert names == [f"transformer.h.{i}.router.{p}" for i in (0, 1) for p in ("weight", "bias")]
    assert set(names) <= set(om.state_dict())
    got, report = call(om, example)
    om.save(tmp_path)
    for loaded in (rewrite.load(tmp_path, model=copy.deepcopy(model)), rewrite.load(tmp_path)):
        for name in names:
            assert torch.equal(loaded.state_dict()[name], om.state_dict()[name])
        again, report2 = call(loaded, example)
        assert torch.equal(report2.decisions, report.decisions)
        torch.testing.assert_close(again, got, atol=0, rtol=0)


def test_selected_layers_only():
    model, example = models.llama(batch=2, length=8)
    om = optimize(model, {**example}, {"passes": [{"layer_skip": {"layers": [-1]}}]})
    _, report = call(om, example, threshold=-1.0)
    assert report.layers == ["model.layers.1"]


@pytest.mark.parametrize(
    "options, field",
    [({"layers": [5]}, "layer_skip.layers"), ({"budget": 1.5}, "budget"), ({"threshold": "high"}, "threshold")],
)
def test_bad_options_name_the_plan_field(options, field):
    model, example = models.llama(batch=2, length=8)
    with pytest.raises(PlanError, match=field):
        optimize(model, example, {"passes": [{"layer_skip": options}]})


def test_model_without_numbered_layers_is_refused_naming_the_module():
    model, example = models.multihead_attention()
    with pytest.raises(PassError, match="no numbered layers"):
        optimize(model, example)


def test_block_making_a_value_later_blocks_read_is_refused_naming_its_readers():
    """T5 computes its relative position bias in the first block and every later block reads it: skipping the first
    block would leave the others without it."""
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    model = transformers.T5EncoderModel(config).eval()
    example = {"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    with pytest.raises(PassError, match=r"layer 0 \(encoder\.block\.0\): 2 values leave the block \(.*read by "
                                        r"encoder\.block\.1\.layer\.0\.SelfAttention.*position bias"):
        optimize(model, example)


def test_skip_mask_of_the_wrong_shape_is_refused():
    model, example = models.llama(batch=2, length=8)
    om = optimize(model, example)
    with pytest.raises(ValueError, match=r"\[batch, routed blocks\] = \[2, 2\]"):
        call(om, example, skip_mask=torch.zeros(2, 3, dtype=torch.bool))


class _InPlaceBlock(torch.nn.Module):
    """Turns the outside padding mask into an additive one by writing into a tensor it made itself
    (`torch.zeros_like(mask).masked_fill_(mask, -inf)`, as `nn.MultiheadAttention` does with a bool
    key_padding_mask); with `into_input`, also writes into a view of its input, which it must not."""

    def __init__(self, into_input: bool = False):
        super().__init__()
        self.proj, self.into_input = torch.nn.Linear(16, 16), into_input

    def forward(self, x, pad):
        bias = torch.zeros_like(pad, dtype=x.dtype).masked_fill_(pad, -1e4)
        if self.into_input:
            x[:, 0].add_(1.0)
        return x + self.proj(x).softmax(-1) * bias.exp()[..., None]


class _InPlaceModel(torch.nn.Module):
    def __init__(self, into_input: bool = False):
        super().__init__()
        self.embed = torch.nn.Embedding(32, 16)
        self.layers = torch.nn.ModuleList([_InPlaceBlock(into_input) for _ in range(2)])

    def forward(self, input_ids, attention_mask):
        x, pad = self.embed(input_ids), attention_mask == 0
        for layer in self.layers:
            x = layer(x, pad)
        return x


def test_in_place_write_into_the_blocks_own_tensor_is_routed_and_into_its_input_refused():
    """Reading an outside value is not writing into it: only the written argument (followed through views)
    must come from inside the block."""
    torch.manual_seed(0)
    ids = torch.randint(0, 32, (2, 6))
    example = {"input_ids": ids, "attention_mask": (torch.arange(6) < torch.tensor([[6], [4]])).long()}
    model = _InPlaceModel().eval()
    om = rewrite.optimize(model, PLAN, example_kwargs=example)
    assert len(om.report.results[-1].changed) == 2
    with torch.no_grad(), skip_controls(threshold=1.0):
        assert torch.equal(om(**example), model(**example))
    with pytest.raises(PassError, match=r"layer 0 .*add_ writes in place into a value from outside the block"):
        rewrite.optimize(_InPlaceModel(into_input=True).eval(), PLAN, example_kwargs=example)


# --- training, evaluation, CLI, example ---------------------------------------------------------


def batches(step: int) -> torch.Tensor:
    return torch.randint(0, 128, (4, 13), generator=torch.Generator().manual_seed(step))


def config(**kw) -> RouterTrainingConfig:
    return RouterTrainingConfig(**{"steps": 8, "lr": 0.1, "target_skip": 0.6, "progress": False, **kw})


@pytest.mark.parametrize("mode", ["straight_through", "soft"])
def test_training_moves_routers_toward_the_budget_and_leaves_the_model_alone(mode):
    model, _ = models.llama(batch=4, length=12)
    before = copy.deepcopy(model.state_dict())
    result = train_routers(model, batches, config(mode=mode))
    assert result.trained_parameters == [f"model.layers.{i}.router.{p}" for i in (0, 1) for p in ("weight", "bias")]
    first, last = result.history[0], result.history[-1]
    assert abs(last["mean_probability"] - 0.6) < abs(first["mean_probability"] - 0.6)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.requires_grad for p in model.parameters())


def test_soft_mode_mixes_block_output_by_the_router_probability():
    model, (ids,) = models.handwritten(batch=2, length=8)
    result = train_routers(model, lambda s: torch.randint(0, 128, (2, 9)), config(steps=1, target_skip=0.9))
    om = result.module
    with skip_controls(mode="soft"):
        got = om(ids)
        probs = last_call_probabilities()
    with torch.no_grad():
        x = model.embed(ids)
        for j, block in enumerate(model.blocks):
            y = x + block["attn"](block["norm1"](x))
            y = y + block["mlp"](block["norm2"](y))
            p = probs[:, j].reshape(-1, 1, 1)
            x = p * x + (1 - p) * y
        want = model.norm(x) @ model.embed.weight.T
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    assert all(p.grad is not None for n, p in om.named_parameters() if ".router." in n)


def test_resuming_from_a_checkpoint_gives_the_same_routers(tmp_path):
    model, _ = models.llama(batch=4, length=12)
    straight = train_routers(copy.deepcopy(model), batches, config(steps=6))
    part = train_routers(copy.deepcopy(model), batches, config(steps=3, checkpoint_dir=str(tmp_path), checkpoint_every=3))
    assert [p.name for p in part.checkpoints] == ["step_000003.pt", "final.pt"]
    resumed = train_routers(copy.deepcopy(model), batches, config(steps=6), resume_from=part.checkpoints[0])
    want = dict(straight.module.named_parameters())
    for name, value in resumed.module.named_parameters():
        if ".router." in name:
            torch.testing.assert_close(value, want[name], atol=1e-6, rtol=1e-5)


def test_lora_with_distillation_trains_adapters_and_routers():
    model, _ = models.llama(batch=4, length=12)
    lora = LoraSettings(rank=2, target_modules=["q_proj"], merge=False)
    result = train_routers(model, batches, config(steps=3, loss="distill", lora=lora))
    names = result.trained_parameters
    assert any("lora_B" in n for n in names) and any(".router." in n for n in names)
    assert result.history[0]["quality"] == pytest.approx(0.0, abs=1e-6)  # nothing skipped yet: equal to the teacher
    lora_b = [p for n, p in result.module.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)


def test_merged_lora_routers_compute_what_the_adapters_did():
    runs = {}
    for merge in (False, True):
        model, _ = models.llama(batch=4, length=12)
        lora = LoraSettings(rank=2, target_modules=["q_proj", "v_proj"], merge=merge)
        runs[merge] = train_routers(model, batches, config(steps=3, loss="distill", lora=lora)).module
    unmerged, merged = runs[False], runs[True]
    names = [n for n, _ in merged.named_parameters()]
    assert not [n for n in names if "lora_" in n or "base_layer" in n] and "lora" not in merged.code
    assert [n for n, _ in unmerged.named_parameters() if "lora_B" in n]
    adapters = dict(unmerged.named_parameters())
    for name, value in merged.named_parameters():
        if ".router." in name:  # the routers keep their trained values
            torch.testing.assert_close(value, adapters[name], atol=0, rtol=0)
    ids = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(9))
    mask = torch.tensor([[True, False], [False, True], [False, False]])  # fixed decisions: rows skip different blocks
    with torch.no_grad(), skip_controls(skip_mask=mask[:, : _routed(merged)]):
        got, want = main_output(merged(input_ids=ids)), main_output(unmerged(input_ids=ids))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    original = dict(models.llama(batch=4, length=12)[0].named_parameters())
    changed = [n for n, p in merged.named_parameters() if n in original and not torch.equal(p, original[n])]
    assert changed and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in changed)  # only adapted weights


def _routed(om) -> int:
    return sum(1 for n, _ in om.named_parameters() if ".router." in n and n.endswith("weight"))


def test_bad_training_settings_are_named():
    model, _ = models.llama(batch=4, length=12)
    with pytest.raises(ValueError, match="unknown loss 'mse'"):
        train_routers(model, batches, config(loss="mse"))
    with pytest.raises(Exception, match="LoRA target modules \\['nope'\\]"):
        train_routers(model, batches, config(lora=LoraSettings(target_modules=["nope"])))


def test_static_baseline_is_the_best_fixed_layer_set():
    model, _ = models.llama(batch=4, length=12)
    om = train_routers(model, batches, config(steps=1)).module
    windows = torch.randint(0, 128, (6, 17), generator=torch.Generator().manual_seed(5))
    layers, best = best_static_skip(om, windows, 8, 1)
    others = [continuation_perplexity(om, windows, 8, static_skip=[j]).perplexity for j in range(2)]
    assert best.perplexity == min(others) and layers == [others.index(min(others))]
    assert best.skip_rate == 0.5
    full = continuation_perplexity(om, windows, 8, threshold=math.inf)
    assert full.skip_rate == 0.0


def test_skip_set_losses_agree_with_static_evaluation_and_with_the_prompt_alone():
    model, _ = models.llama(batch=4, length=12)
    om = train_routers(model, batches, config(steps=1)).module
    windows = torch.randint(0, 128, (6, 17), generator=torch.Generator().manual_seed(5))
    losses = skip_set_losses(om, windows, 8, 1, batch_size=4)
    assert losses.combos == [(0,), (1,)] and losses.continuation_tokens == 9
    full = continuation_perplexity(om, windows, 8, threshold=math.inf).perplexity
    assert math.exp(losses.full_continuation.sum().item() / (6 * 9)) == pytest.approx(full, rel=1e-5)
    for c, combo in enumerate(losses.combos):
        static = continuation_perplexity(om, windows, 8, static_skip=list(combo)).perplexity
        assert losses.perplexity(torch.full((6,), c)) == pytest.approx(static, rel=1e-5)
        # the prompt's loss is that of the prompt run alone: it never sees the continuation
        mask = torch.zeros(6, 2, dtype=torch.bool)
        mask[:, list(combo)] = True
        with torch.no_grad(), skip_controls(skip_mask=mask):
            logits = om(input_ids=windows[:, :8]).logits
        alone = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), windows[:, 1:8], reduction="none").sum(1)
        torch.testing.assert_close(losses.prompt[:, c], alone, rtol=1e-5, atol=1e-5)
    per_window_best = losses.continuation.argmin(1)
    assert losses.perplexity(per_window_best) <= min(losses.perplexity(torch.full((6,), c)) for c in (0, 1))
    decisions = losses.decisions(per_window_best, 2)
    assert decisions.shape == (6, 2) and decisions.sum(1).eq(1).all()
    assert decisions[torch.arange(6), per_window_best].all()


def test_example_runs_at_tiny_size(tmp_path):
    result = example.main(["--tiny", "--out", str(tmp_path / "r.json")])
    assert (tmp_path / "r.json").exists()
    rows = {r["variant"].split(",")[0].split(" ")[0]: r for r in result["rows"]}
    assert rows["full"]["skip_rate"] == 0.0 and rows["static"]["skip_rate"] == 0.25
    assert result["rows"][1]["skip_rate"] == 0.25
    assert set(result["tables"]) == {"first", "spread"}
    for table in result["tables"].values():
        by_name = {r["variant"]: r for r in table["rows"]}
        top_k = [r for name, r in by_name.items() if name.startswith("routed (set_cost), top 1/4")]
        assert len(top_k) == 1 and top_k[0]["skip_rate"] == 0.25
        static = [r["perplexity"] for name, r in by_name.items() if name.startswith("static")]
        upper = by_name["oracle: per sequence, the set cheapest on its continuation (upper bound)"]["perplexity"]
        assert len(static) == 2 and upper <= min(static) + 1e-9


def test_cli_trains_and_reports(tmp_path, capsys):
    target = "examples.layer_skip:target?layers=2,dim=16,heads=2"
    out = tmp_path / "routed"
    status = cli_main(["layer-skip", "train", target, "--steps", "2", "--batch", "2", "--length", "24",
                       "--eval-windows", "2", "--out", str(out), "-q"])
    assert status == 0
    assert (out / "history.json").exists() and (out / "checkpoints" / "final.pt").exists()
    status = cli_main(["layer-skip", "report", target, "--routers", str(out / "checkpoints" / "final.pt"),
                       "--budget", "0.5", "--sequences", "3", "--length", "24", "-q"])
    assert status == 0
    text = capsys.readouterr().out
    assert "skipped 50.0% of layer executions" in text
    status = cli_main(["layer-skip", "report", target, "--routers", str(out / "checkpoints" / "final.pt"),
                       "--top-k", "1", "--sequences", "3", "--length", "24", "-q"])
    assert status == 0
    assert "skipped 50.0% of layer executions" in capsys.readouterr().out
    status = cli_main(["layer-skip", "report", target, "--top-k", "3", "--sequences", "3", "--length", "24", "-q"])
    assert status != 0 and "k must lie in [0, 2]" in capsys.readouterr().err


def test_cli_refuses_a_model_with_a_small_vocabulary(capsys):
    status = cli_main(["layer-skip", "train", "llama", "--steps", "1", "--out", "unused", "-q"])
    assert status == 2
    assert "needs at least 256" in capsys.readouterr().err


def test_cost_model_counts_routed_blocks_in_full_plus_the_routers():
    model, example = models.handwritten(batch=2, length=8)
    om = optimize(model, example)
    before = estimate(fx.GraphModule(om, om.captured_graph)).total
    after = estimate(om.program).total
    routers = 2 * 2 * BATCH * SEQ * 64  # two routers, one multiply-add per element of a [B, L, 64] input
    assert sympy.simplify(after.flops - before.flops - routers) == 0


def test_routers_survive_a_recapture():
    model, example = models.handwritten(batch=3, length=8)
    om = optimize(model, example)
    randomize_routers(om, seed=6)
    _, before = call(om, example)
    routers = {n: p for n, p in om.named_parameters() if ".router." in n}
    om.train()
    call(om, example)  # train mode: captured again, the plan re-run
    om.eval()
    _, after = call(om, example)
    assert torch.equal(after.decisions, before.decisions)
    assert all(p is routers[n] for n, p in om.named_parameters() if ".router." in n)


def test_skip_cost_loss_fits_routers_to_the_cheapest_blocks_of_each_sequence():
    model, example = models.llama(batch=4, length=12)
    om = optimize(model, example)
    randomize_routers(om, seed=7)
    params = {n: p.detach().clone() for n, p in om.named_parameters() if ".router." in n}
    batch = batches(0)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    result = train_routers(om, batch, config(steps=1, loss="skip_cost", target_skip=0.5))
    layers = list(model.model.layers)
    with torch.no_grad():
        states = model(input_ids=inputs, use_cache=False, output_hidden_states=True).hidden_states

        def per_sequence_ce(skip):
            logits = reference_with_skips(model, layers, {"input_ids": inputs}, skip)
            return torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)

        base = per_sequence_ce(torch.zeros(4, 2, dtype=torch.bool))
        costs = torch.stack([per_sequence_ce(torch.tensor([[j == 0, j == 1]] * 4)) - base for j in (0, 1)], 1)
        labels = (costs == costs.min(1, keepdim=True).values).float()  # the cheaper of the two blocks
        probs = torch.stack(
            [
                torch.sigmoid(states[j].mean(1) @ params[f"model.layers.{j}.router.weight"] + params[f"model.layers.{j}.router.bias"])
                for j in (0, 1)
            ],
            1,
        )
        want = torch.nn.functional.binary_cross_entropy(probs, labels).item()
    assert result.history[0]["quality"] == pytest.approx(want, rel=1e-4)


def test_set_cost_labels_are_the_weight_of_the_sets_holding_each_block():
    combos = [(0, 1), (0, 2), (1, 2)]
    costs = torch.tensor([[0.1, 0.5, 0.2], [0.3, 0.3, 0.0]])
    hard = set_cost_labels(costs, combos, 3, 0.0)
    assert torch.equal(hard, torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]))
    soft = set_cost_labels(costs, combos, 3, 0.1)
    w = torch.softmax(-costs / 0.1, dim=1)
    want = torch.stack([w[:, 0] + w[:, 1], w[:, 0] + w[:, 2], w[:, 1] + w[:, 2]], 1)
    torch.testing.assert_close(soft, want)
    torch.testing.assert_close(soft.sum(1), torch.full((2,), 2.0))


def test_set_cost_loss_fits_prompt_routers_to_the_set_cheapest_on_the_continuation():
    model, example = models.llama(batch=4, length=12)
    om = optimize(model, example)
    randomize_routers(om, seed=8)
    params = {n: p.detach().clone() for n, p in om.named_parameters() if ".router." in n}
    batch = batches(1)
    inputs, targets, prompt = batch[:, :-1], batch[:, 1:], 5
    result = train_routers(
        om, batch, config(steps=1, loss="set_cost", target_skip=0.5, prompt_length=prompt, label_temperature=0.05)
    )
    layers = list(model.model.layers)
    with torch.no_grad():
        # the routers read the prompt alone, run with nothing skipped
        states = model(input_ids=inputs[:, :prompt], use_cache=False, output_hidden_states=True).hidden_states
        probs = torch.stack(
            [
                torch.sigmoid(states[j].mean(1) @ params[f"model.layers.{j}.router.weight"] + params[f"model.layers.{j}.router.bias"])
                for j in (0, 1)
            ],
            1,
        )
        costs = []
        for j in (0, 1):  # k = 1 of 2 blocks: the sets are the single blocks
            logits = reference_with_skips(model, layers, {"input_ids": inputs}, torch.tensor([[j == 0, j == 1]] * 4))
            ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            costs.append(ce[:, prompt - 1 :].mean(1))  # the continuation only
        labels = torch.softmax(-torch.stack(costs, 1) / 0.05, dim=1)
        want = torch.nn.functional.binary_cross_entropy(probs, labels).item()
    assert result.history[0]["quality"] == pytest.approx(want, rel=1e-4)


def test_set_cost_refuses_a_prompt_that_leaves_no_continuation():
    model, _ = models.llama(batch=4, length=12)
    with pytest.raises(ValueError, match="leaves no continuation"):
        train_routers(model, batches, config(steps=1, loss="set_cost", prompt_length=12))
    with pytest.raises(ValueError, match="label_temperature"):
        train_routers(model, batches, config(loss="set_cost", label_temperature=-1.0))


def test_top_k_decisions_skip_exactly_the_k_highest_routers_of_each_prompt():
    model, example = models.llama(batch=4, length=10)
    om = optimize(model, example)
    randomize_routers(om, seed=4)
    prompts = example["input_ids"]
    probs = router_probabilities(om, prompts)
    _, report = call(om, {"input_ids": prompts}, threshold=math.inf)
    torch.testing.assert_close(probs, torch.stack(report.last.probabilities, 1))
    decisions = top_k_decisions(om, prompts, 1)
    assert torch.equal(decisions.sum(1), torch.ones(4, dtype=torch.long))
    assert torch.equal(decisions[:, 1], probs[:, 1] > probs[:, 0])
    assert torch.equal(top_k_decisions(om, prompts, 2), torch.ones(4, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="k must lie"):
        top_k_decisions(om, prompts, 3)
    windows = torch.randint(0, 128, (4, 15), generator=torch.Generator().manual_seed(2))
    routed = continuation_perplexity(om, windows, 10, top_k=1)
    assert torch.equal(routed.decisions, top_k_decisions(om, windows[:, :10], 1)) and routed.skip_rate == 0.5


def test_example_on_the_mixed_corpus_reports_each_kind_in_a_fixed_proportion():
    result = example.main(["--tiny", "--corpus", "mixed", "--eval-layout", "spread"])
    assert result["corpus"]["kinds"] == ["code", "prose"] and result["corpus"]["mix"] == [0.5, 0.5]
    table = result["tables"]["spread"]
    assert table["windows"] == {"code": 4, "prose": 4}
    assert set(table["by_kind"]) == {"code", "prose"}
    names = [r["variant"] for r in table["rows"]]
    assert [r["variant"] for r in table["by_kind"]["prose"]] == names
    assert any(n.startswith("static per kind: code") for n in names)
    for rows in [table["rows"], *table["by_kind"].values()]:
        assert rows[0]["increase"] == 0.0 and all(r["skip_rate"] == 0.25 for r in rows if "top 1/4" in r["variant"])


def test_kinds_analysis_runs_at_tiny_size():
    from examples import layer_skip_kinds

    result = layer_skip_kinds.main(["--tiny", "--temperatures", "0.5", "--probe"])
    assert len(result["kind_probe_accuracy"]) == 4
    splits = result["sets"]["budget_split"]
    assert "code 1 + prose 1" in splits and set(splits["code 1 + prose 1"]) == {"train", "heldout"}
    assert "train prose k=1" in result["sets"]["cheapest"]
    rows = result["temperatures"]["by_temperature"]["0.5"]
    assert {"train all", "heldout code", "heldout prose"} <= set(rows)


def test_encoder_decoder_blocks_with_post_norm_route_their_residual_stream():
    """BART's decoder layers read the encoder's output, as wide as their own hidden state; the hidden state is the
    input that reaches the block's output through the residual sums and the post-norms."""
    import transformers

    torch.manual_seed(0)
    model = transformers.BartModel(transformers.BartConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=64, max_position_embeddings=64, pad_token_id=0)).eval()
    g = torch.Generator().manual_seed(0)
    example = {"input_ids": torch.randint(3, 64, (3, 9), generator=g),
               "decoder_input_ids": torch.randint(3, 64, (3, 6), generator=g)}
    om = optimize(model, example)
    skip = torch.tensor([[True, False], [False, False], [False, True]])  # the decoder's layers are the blocks
    got, report = call(om, example, skip_mask=skip)
    assert torch.equal(report.decisions, skip)
    want = reference_with_skips(model, list(model.decoder.layers), example, skip)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_prompt_length_analysis_scores_the_same_continuation_at_every_prompt_length():
    from examples import layer_skip_prompts

    result = layer_skip_prompts.main(["--tiny", "--fit-routers", "--update-sizes", "--train-routers", "16", "--router-loss", "set_cost",
                                      "--prompt-choice", "all,2"])
    tables = result["by_prompt"]
    assert [t["prompt_length"] for t in tables] == [8, 16]
    assert [t["window_bytes"] for t in tables] == [17, 25] and {t["scored_tokens"] for t in tables} == {9}
    for table in tables:
        rows = table["rows"]
        assert rows[0]["variant"] == "full model" and rows[0]["increase"] == 0.0
        assert -1.0 <= table["headroom"]["prompt_continuation_correlation"] <= 1.0 and table["headroom"]["median_gap"] >= 0
        assert rows[1]["variant"].startswith("static") and "vs_static" not in rows[1]
        assert all(r["skip_rate"] == 0.25 for r in rows[1:])  # exactly 1 of 4 blocks in every window
        fitted = [r["variant"] for r in rows if r["variant"].startswith(("linear routers", "ridge regression"))]
        # fixed setting, cross-validated logistic and ridge on the pooled prompt; the latter two on the last 4 bytes
        # and on the blocks' update sizes
        assert len(fitted) == 7 and sum("update size" in v for v in fitted) == 2 and sum("last 4" in v for v in fitted) == 2
        # each window's cheapest set on its continuation: no choice of one set per window does better
        best = next(r for r in rows if "cheapest on its continuation" in r["variant"])
        assert best["perplexity"] == min(r["perplexity"] for r in rows[1:]) and best["vs_static"][2] <= 0
        # the library's decision with every set as a candidate, run on the prompts alone, is the oracle's with the
        # training prior computed from the windows' stored losses
        library = [r for r in rows if r["variant"].startswith("prompt choice")]
        assert len(library) == 2 and "4 prompt forwards" in library[0]["variant"] and "2 prompt forwards" in library[1]["variant"]
        oracle = next(r for r in rows if "training prior" in r["variant"])
        assert library[0]["perplexity"] == pytest.approx(oracle["perplexity"], rel=1e-6)
    routed = result["routers"]["rows"]
    assert [r["variant"].split(" ")[0] for r in routed] == ["full", "static", "routed"]
    assert all(r["skip_rate"] == 0.25 and len(r["vs_static"]) == 3 for r in routed[2:])
