"""Pass `stateful` and `OptimizedModule.generate`: token-by-token logits equal the full-sequence
forward for softmax, linear and hybrid models of several families; batched prompts of different
lengths give the same tokens as one-by-one generation; sampling, eos, streaming and errors; layer-skip
routed models decode with prefill's decisions held (against the model without the skipped layers);
the lazy module's generate."""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import importlib
import re

import pytest
import torch
from conftest import HostReads, OpCounts, decode_fusion, module_switch, stepwise_program_logits
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import rewrite
import rewrite.routing.runtime as routing_runtime
from examples.models import TARGETS
from rewrite.decode import decode_program
from rewrite.decode.sampling import Sampling, filter_logits, next_tokens
from rewrite.decode.state import RecurrentState, RingKVCache
from rewrite.errors import PassError, PlanError, RewriteError
from rewrite.routing import record_skips, skip_controls

ATOL, RTOL = 1e-5, 1e-5


@pytest.fixture(autouse=True)
def _no_grad():
    """Decode is inference: every test here runs without autograd (scoped, not process-wide)."""
    with torch.no_grad():
        yield


class LearnedPositionLM(nn.Module):
    """A causal LM that computes its positions itself (arange over the length, learned embeddings)."""

    def __init__(self, vocab: int = 96, dim: int = 32, heads: int = 2, layers: int = 2):
        super().__init__()
        self.heads = heads
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(64, dim)
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(layers))
        self.out = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        x = self.tokens(ids) + self.positions(torch.arange(t, device=ids.device))
        for qkv, out in zip(self.qkv, self.out, strict=True):
            q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in qkv(x).chunk(3, dim=-1))
            o = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + out(o.transpose(1, 2).reshape(b, t, -1))
        return self.head(x)


def _target(family: str):
    if family == "positions":
        torch.manual_seed(0)
        return LearnedPositionLM().eval(), (torch.randint(0, 96, (2, 12)),)
    return TARGETS[family]()


@functools.cache
def optimized(family: str, plan_key: str):
    """(original model, optimized module, token ids [2, L]) for a family and a plan, built once."""
    plan = PLANS[plan_key]
    model, inputs = _target(family)
    if isinstance(inputs, dict):
        ids = inputs["input_ids"]
        om = rewrite.optimize(model, plan, example_kwargs={"input_ids": ids})
    else:
        ids = inputs[0]
        om = rewrite.optimize(model, plan, (ids,))
    return model, om, ids


PLANS = {
    "softmax": [],
    "gla": [{"mixer": {"kind": "gla"}}],
    "gla_norm": [{"mixer": {"kind": "gla", "feature_map": "elu1", "normalize": True}}],
    "linear": [{"mixer": {"kind": "linear"}}],
    "retention": [{"mixer": {"kind": "retention"}}],
    "hybrid": [{"mixer": {"kind": "gla", "layers": [0]}}],
    "gated_deltanet": [{"mixer": {"kind": "gated_deltanet"}}],
    "mamba2": [{"mixer": {"kind": "mamba2"}}],
    "lawcat": [{"mixer": {"kind": "lawcat"}}],
    "hybrid_swa": [{"mixer": {"kind": "hybrid_swa", "window": 4, "sinks": 1}}],
    "mamba2_keep_rope": [{"mixer": {"kind": "mamba2", "rope": "keep"}}],
    "mamba2_drop_rope": [{"mixer": {"kind": "mamba2", "rope": "drop"}}],
    "hybrid_drop_rope": [{"mixer": {"kind": "gla", "layers": [0], "rope": "drop"}}],
}


def logits_of(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def full_forward(module, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the full-sequence forward of a model or an optimized module."""
    base = getattr(module, "source", None) or module
    return logits_of(module(input_ids=ids)) if hasattr(base, "config") else module(ids)


def stepwise_logits(om, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of a prefill of `prefill` tokens, then one decode step per remaining token."""
    return stepwise_program_logits(decode_program(om), ids, prefill)


STEP_CASES = [
    ("llama", "softmax"), ("llama", "gla"), ("llama", "gla_norm"), ("llama", "hybrid"), ("gpt2", "linear"),
    ("qwen3", "retention"), ("handwritten", "hybrid"), ("positions", "retention"),
]


@pytest.mark.parametrize("family,plan", STEP_CASES)
def test_token_by_token_logits_equal_full_forward(family, plan):
    model, om, ids = optimized(family, plan)
    reference = full_forward(model if plan == "softmax" else om, ids)  # the original itself for softmax
    torch.testing.assert_close(stepwise_logits(om, ids, prefill=5), reference, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("kind", ["gated_deltanet", "mamba2", "lawcat", "hybrid_swa"])
def test_other_mixer_kinds_decode_like_their_full_forward(kind):
    _, om, ids = optimized("llama", kind)
    torch.testing.assert_close(stepwise_logits(om, ids, prefill=6), full_forward(om, ids), atol=ATOL, rtol=RTOL)
    prompt, mask = _ragged(ids)
    batched = om.generate(prompt, mask, max_new_tokens=3)
    assert torch.equal(batched[0, 4:], om.generate(prompt[:1, 4:], max_new_tokens=3)[0])


@pytest.mark.parametrize("family,plan", [("qwen3", "mamba2_drop_rope"), ("qwen3", "hybrid_drop_rope"),
                                         ("llama", "mamba2_keep_rope")])
def test_mixers_reading_q_and_k_before_rope_decode_like_their_full_forward(family, plan):
    """mamba2 with RoPE dropped; the hybrid keeps a softmax layer whose positions must continue while its
    neighbour reads q and k before the rotation. Decoding carries no attention-transfer teacher."""
    _, om, ids = optimized(family, plan)
    dropped = [m for m in om.report.results[0].messages if "before the rotary embedding" in m]
    assert len(dropped) == (0 if plan.endswith("keep_rope") else 2 if plan.startswith("mamba2") else 1)
    torch.testing.assert_close(stepwise_logits(om, ids, prefill=5), full_forward(om, ids), atol=ATOL, rtol=RTOL)
    program = decode_program(om)
    mixers = [n for n in program.graph_module.graph.nodes if n.meta.get("rewrite_mixer")]
    assert mixers and not any("teacher_qk" in n.kwargs for n in mixers)
    trig = [n for n in program.graph_module.graph.nodes if n.target in (torch.ops.aten.cos.default, torch.ops.aten.sin.default)]
    assert (trig == []) == (plan == "mamba2_drop_rope")  # no layer left that reads rotated q / k: the rotary is gone
    prompt, mask = _ragged(ids)
    batched = om.generate(prompt, mask, max_new_tokens=3)
    alone = om.generate(prompt[:1, 4:], max_new_tokens=3)
    assert torch.equal(batched[0, 4:], alone[0])
    assert torch.equal(alone, greedy_reference(om, prompt[:1, 4:], 3))


def _ragged(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch with row 0 left-padded by 4 tokens (its prompt is shorter)."""
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    return ids, mask


def greedy_reference(module, ids: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy continuation by re-running the full forward on the whole sequence at every step."""
    seq = ids
    for _ in range(new):
        nxt = full_forward(module, seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq


@pytest.mark.parametrize("family,plan", [("llama", "softmax"), ("llama", "hybrid"), ("gpt2", "linear"),
                                         ("positions", "retention")])
def test_generate_greedy_matches_full_forward_loop_and_batches_ragged_prompts(family, plan):
    model, om, ids = optimized(family, plan)
    reference_module = model if plan == "softmax" else om
    prompt, mask = _ragged(ids)
    batched = om.generate(prompt, mask, max_new_tokens=5)
    for row, start in ((0, 4), (1, 0)):
        alone = om.generate(prompt[row : row + 1, start:], max_new_tokens=5)
        assert torch.equal(batched[row, start:], alone[0])
        assert torch.equal(alone, greedy_reference(reference_module, prompt[row : row + 1, start:], 5))


@pytest.mark.parametrize("family,plan", [("llama", "hybrid"), ("handwritten", "hybrid"), ("qwen2", "windowed")])
def test_ragged_prompts_attending_in_blocks_of_queries_generate_each_prompts_tokens(monkeypatch, family, plan):
    """With `sites.PROMPT_MASK_ELEMENTS` so small that a padded prompt's softmax layers attend a few queries at a
    time (kept layers of hybrids; Qwen2's full and windowed layers), a padded prefill gives one call's logits and a
    ragged batch generates each prompt's own greedy tokens."""
    from rewrite.decode import sites

    if plan == "windowed":
        model = _windowed_hf(family)
        ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))
        om, reference_module = rewrite.optimize(model, [], example_kwargs={"input_ids": ids}), model
    else:
        model, om, ids = optimized(family, plan)
        reference_module = om
    prompt, mask = _ragged(ids)

    def padded_prefill_logits():
        program = decode_program(om)
        state = program.new_state(2, ids.shape[1])
        state.begin(ids.shape[1], mask.bool())
        return program(prompt, (mask.cumsum(-1) - 1).clamp(min=0), state)

    whole = padded_prefill_logits()
    calls: list[int] = []
    block_of = sites._query_block
    monkeypatch.setattr(sites, "_query_block", lambda q, keys: calls.append(block_of(q, keys) < q.shape[2]) or
                        block_of(q, keys))
    monkeypatch.setattr(sites, "PROMPT_MASK_ELEMENTS", 64)
    blocked = padded_prefill_logits()
    assert any(calls)  # the prefill attended in blocks
    torch.testing.assert_close(blocked[0, 4:], whole[0, 4:])  # row 0 is left-padded by 4
    torch.testing.assert_close(blocked[1], whole[1])
    batched = om.generate(prompt, mask, max_new_tokens=5)
    for row, start in ((0, 4), (1, 0)):
        alone = om.generate(prompt[row : row + 1, start:], max_new_tokens=5)
        assert torch.equal(batched[row, start:], alone[0])
        assert torch.equal(alone, greedy_reference(reference_module, prompt[row : row + 1, start:], 5))


def test_padded_prefill_logits_match_the_original_with_its_mask():
    model, om, ids = optimized("llama", "softmax")
    _, mask = _ragged(ids)
    program = decode_program(om)
    state = program.new_state(2, ids.shape[1])
    state.begin(ids.shape[1], mask.bool())
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    got = program(ids, positions, state)
    expected = logits_of(model(input_ids=ids, attention_mask=mask, position_ids=positions))
    torch.testing.assert_close(got[0, 4:], expected[0, 4:], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got[1], expected[1], atol=ATOL, rtol=RTOL)


def test_right_padded_prompts_are_left_aligned():
    _, om, ids = optimized("llama", "hybrid")
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0
    out = om.generate(ids, mask, max_new_tokens=3)
    alone = om.generate(ids[:1, :-4], max_new_tokens=3)
    assert torch.equal(out[0, 4:], alone[0])


def test_filter_logits_matches_a_naive_reference():
    torch.manual_seed(1)
    logits = torch.randn(3, 20)
    for top_k, top_p in [(5, None), (None, 0.7), (8, 0.5), (None, 1.0), (1, None)]:
        got = filter_logits(logits, top_k, top_p)
        for row in range(3):
            order = logits[row].argsort(descending=True).tolist()
            keep = set(order[:top_k] if top_k else order)
            if top_p is not None and top_p < 1:
                probs = logits[row].masked_fill(
                    torch.tensor([i not in keep for i in range(20)]), float("-inf")).softmax(-1)
                total, nucleus = 0.0, set()
                for i in probs.argsort(descending=True).tolist():
                    if total >= top_p:
                        break
                    nucleus.add(i)
                    total += float(probs[i])
                keep &= nucleus
            assert {i for i in range(20) if got[row, i] > float("-inf")} == keep


def test_sampling_is_seeded_stays_in_top_k_and_top_k_1_is_greedy():
    _, om, ids = optimized("llama", "gla")
    greedy = om.generate(ids, max_new_tokens=4)
    assert torch.equal(om.generate(ids, max_new_tokens=4, do_sample=True, top_k=1), greedy)
    runs = [om.generate(ids, max_new_tokens=4, do_sample=True, temperature=1.5, top_p=0.9,
                        generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    draws = torch.stack([next_tokens(logits, Sampling(True, 1.0, 3, None)) for _ in range(50)])
    allowed = logits.topk(3, dim=-1).indices
    assert all(bool((allowed[r] == draws[:, r, None]).any(-1).all()) for r in range(4))


def test_eos_stops_rows_and_streaming_reports_every_token():
    _, om, ids = optimized("llama", "hybrid")
    free = om.generate(ids, max_new_tokens=6)
    eos = int(free[0, ids.shape[1] + 1])  # row 0's second new token
    seen = []
    out = om.generate(ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=-1, streamer=seen.append)
    row0 = out[0, ids.shape[1]:]
    assert int(row0[1]) == eos and bool((row0[2:] == -1).all())
    first_eos = (free[1, ids.shape[1]:] == eos).nonzero()
    stop = int(first_eos[0]) + 1 if len(first_eos) else 6
    assert torch.equal(out[1, ids.shape[1]: ids.shape[1] + stop], free[1, ids.shape[1]: ids.shape[1] + stop])
    streamed = torch.stack([s.tokens for s in seen], dim=1)
    assert torch.equal(streamed, out[:, ids.shape[1]: ids.shape[1] + streamed.shape[1]])


def test_eos_and_pad_default_to_the_models_generation_config():
    model, om, ids = optimized("llama", "hybrid")
    free = om.generate(ids, max_new_tokens=6, eos_token_id=[])
    eos = int(free[0, ids.shape[1] + 1])
    config = model.generation_config
    saved = config.eos_token_id, config.pad_token_id
    config.eos_token_id, config.pad_token_id = eos, 5
    try:
        stopped = om.generate(ids, max_new_tokens=6)
        assert torch.equal(stopped, om.generate(ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=5))
        assert int(stopped[0, ids.shape[1] + 1]) == eos and bool((stopped[0, ids.shape[1] + 2:] == 5).all())
        assert torch.equal(om.generate(ids, max_new_tokens=6, eos_token_id=[]), free)
        as_tensors = om.generate(ids, max_new_tokens=6, eos_token_id=torch.tensor([eos]), pad_token_id=torch.tensor(5))
        assert torch.equal(as_tensors, stopped)  # tensors, as Hugging Face's generate takes them
    finally:
        config.eos_token_id, config.pad_token_id = saved


def test_a_pad_id_outside_the_vocabulary_is_shown_but_not_fed_to_the_model():
    """A config whose eos / pad id lies outside the vocabulary (a tiny model keeping its tokenizer's ids,
    as GPT-2's 50256): the output shows that id, the model is fed a real token there (never attended)."""
    model, om, ids = optimized("llama", "gla")
    prompt, mask = _ragged(ids)
    out_of_range = model.config.vocab_size + 7
    want = om.generate(prompt, mask, max_new_tokens=4, pad_token_id=0)
    got = om.generate(prompt, mask, max_new_tokens=4, pad_token_id=out_of_range)
    assert bool((got[0, :4] == out_of_range).all())  # row 0's left padding, as given
    assert torch.equal(got[:, 4:], want[:, 4:]) and torch.equal(got[1:], want[1:])


def test_stateful_in_a_plan_checks_sites_and_keeps_the_forward():
    model, om, ids = optimized("llama", "hybrid")
    checked = rewrite.optimize(model, [*PLANS["hybrid"], "stateful"], example_kwargs={"input_ids": ids})
    torch.testing.assert_close(logits_of(checked(input_ids=ids)), logits_of(om(input_ids=ids)), atol=0, rtol=0)
    messages = checked.report.results[-1].messages
    assert any("gla state" in m for m in messages) and any("KV cache" in m for m in messages)
    assert "decode_state" in decode_program(om).code


def test_errors_name_the_layer_or_field():
    model, inputs = TARGETS["bert"]()
    with pytest.raises(PassError, match=r"layer 0 .*not causal"):
        rewrite.optimize(model, ["stateful"], example_kwargs=inputs)
    with pytest.raises(PlanError, match="cuda_graph"):
        rewrite.optimize(model, [{"stateful": {"cuda_graph": "sometimes"}}], example_kwargs=inputs)
    _, om, ids = optimized("llama", "gla")
    with pytest.raises(ValueError, match="temperature"):
        om.generate(ids, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        om.generate(ids, do_sample=True, top_p=1.5)
    with pytest.raises(RewriteError, match="CUDA"):
        om.generate(ids, max_new_tokens=1, cuda_graph="always")
    gap = torch.ones_like(ids)
    gap[0, 3] = 0
    with pytest.raises(RewriteError, match="row 0 has padding between"):
        om.generate(ids, gap, max_new_tokens=1)
    program = decode_program(om)
    state = program.new_state(2, 4)
    with pytest.raises(RewriteError, match="capacity 4"):
        state.begin(5)


def _windowed_hf(family: str):
    import transformers

    torch.manual_seed(0)
    size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=64, sliding_window=4, attn_implementation="sdpa")
    if family == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**size)).eval()
    cfg = transformers.Qwen2Config(**size, use_sliding_window=True, max_window_layers=1)  # layers 1, 2 windowed
    return transformers.Qwen2ForCausalLM(cfg).eval()


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_layers_of_the_model_keep_their_window(family):
    model = _windowed_hf(family)
    ids = torch.randint(0, 64, (2, 11))
    om = rewrite.optimize(model, [], example_kwargs={"input_ids": ids})
    torch.testing.assert_close(stepwise_logits(om, ids, prefill=6), logits_of(model(input_ids=ids)),
                               atol=ATOL, rtol=RTOL)
    program = decode_program(om)
    state = program.new_state(2, 11)
    state.begin(11)
    program(ids, torch.arange(11).expand(2, -1), state)
    rings = [layer for layer in state.layers.values() if isinstance(layer, RingKVCache)]
    assert len(rings) == (3 if family == "mistral" else 2) and all(r.keys.shape[2] == 4 for r in rings)
    assert (state.valid is None) == (family == "mistral")  # only Qwen2's full layer needs the slot mask
    prompt, mask = _ragged(ids)
    batched = om.generate(prompt, mask, max_new_tokens=6)
    alone = om.generate(prompt[:1, 4:], max_new_tokens=6)
    assert torch.equal(batched[0, 4:], alone[0])
    assert torch.equal(alone, greedy_reference(model, prompt[:1, 4:], 6))


def test_a_config_whose_layer_types_window_no_layer_decodes_without_a_window():
    """Qwen2 with `sliding_window` set but every layer full (max_window_layers = the layer count): generate() sets
    no window, rather than a `window_layers` selector that selects no layer (a PlanError)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, sliding_window=4, use_sliding_window=True,
                                   max_window_layers=2, attn_implementation="sdpa")
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    assert "sliding_attention" not in cfg.layer_types
    ids = torch.randint(0, 64, (1, 7))
    om = rewrite.optimize(model, [], example_kwargs={"input_ids": ids})
    assert torch.equal(om.generate(ids, max_new_tokens=4), greedy_reference(model, ids, 4))


def test_layer_types_longer_than_the_layers_window_only_the_model_s_layers():
    """A config whose `layer_types` lists more layers than the model builds (shrunk after creation: OLMo 3's list
    stays 4 long for 2 layers): generate() windows the layers the model has, the last of them sliding, and decodes
    as Hugging Face's greedy search, rather than a `window_layers` PlanError for a layer the model lacks."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Olmo3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, sliding_window=3,
                                   layer_types=["full_attention", "sliding_attention"] * 2, attn_implementation="sdpa")
    cfg.num_hidden_layers = 2
    model = transformers.Olmo3ForCausalLM(cfg).eval()
    assert len(model.model.layers) == 2 and len(cfg.layer_types) == 4
    ids = torch.randint(0, 64, (1, 7))
    om = rewrite.optimize(model, [], example_kwargs={"input_ids": ids})
    assert torch.equal(om.generate(ids, max_new_tokens=5), greedy_reference(model, ids, 5))


class BandAttentionLM(nn.Module):
    """A hand-written LM whose unfused attention sees only the last 3 tokens (a band mask)."""

    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        x = self.embed(ids)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).chunk(3, dim=-1))
        i = torch.arange(t, device=ids.device)
        hide = (i[None, :] > i[:, None]) | (i[:, None] - i[None, :] >= 3)
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        o = scores.masked_fill(hide, float("-inf")).softmax(-1) @ v
        return self.head(x + o.transpose(1, 2).reshape(b, t, -1))


def test_a_window_the_plan_does_not_declare_is_refused_and_declared_it_decodes():
    torch.manual_seed(0)
    model = BandAttentionLM().eval()
    ids = torch.randint(0, 64, (2, 9))
    om = rewrite.optimize(model, [], (ids,))
    with pytest.raises(RewriteError, match=r"<root>.*not causal among the real tokens.*sliding_window"):
        om.generate(ids, max_new_tokens=1)
    declared = rewrite.optimize(model, [{"stateful": {"sliding_window": 3}}], (ids,))
    torch.testing.assert_close(stepwise_logits(declared, ids, prefill=5), model(ids), atol=ATOL, rtol=RTOL)
    with pytest.raises(PlanError, match="sliding_window"):
        rewrite.optimize(model, [{"stateful": {"sliding_window": 0}}], (ids,))


# -- layer-skip routed blocks -----------------------------------------------------------------------

ROUTED_PLANS = {
    "softmax": [{"layer_skip": {}}],
    "gla": [{"mixer": {"kind": "gla", "layers": [0, 2]}}, {"layer_skip": {}}],
    "windowed": [{"layer_skip": {}}],
}
GLA_LAYERS = {"softmax": [], "gla": [0, 2], "windowed": []}
"""Layers that the plan turns into gla mixers (the others keep softmax)."""


def _llama4():
    """A tiny 4-layer Llama, so that routed softmax and gla layers mix."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=256, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config).eval()


@functools.cache
def routed(plan_key: str, device: str = "cpu"):
    """(original model, routed optimized module with spread routers, token ids [3, 10]): a 4-layer
    Llama, or a 3-layer Mistral whose layers see a window of 4 tokens (`windowed`)."""
    model = (_windowed_hf("mistral") if plan_key == "windowed" else _llama4()).to(device)
    ids = torch.randint(0, model.config.vocab_size, (3, 10), generator=torch.Generator().manual_seed(3)).to(device)
    om = rewrite.optimize(model, ROUTED_PLANS[plan_key], example_kwargs={"input_ids": ids})
    g = torch.Generator().manual_seed(0)
    for name, p in om.named_parameters():  # routers that read the prompt: decisions differ per sequence
        if ".router." in name:
            p.copy_(torch.randn(p.shape, generator=g).to(device) * (0.5 if name.endswith("bias") else 30.0))
    return model, om, ids


def _assert_mixed(decisions: torch.Tensor) -> None:
    """The decisions exercise the routed paths: a block some rows skip and others run, and rows that differ."""
    partial = [j for j in range(decisions.shape[1]) if 0 < int(decisions[:, j].sum()) < decisions.shape[0]]
    assert partial, f"no block is skipped by only some sequences: {decisions}"
    assert any(not torch.equal(decisions[0], decisions[b]) for b in range(1, decisions.shape[0])), decisions


def without_skipped_layers(model, gla_layers: list[int], skipped: list[bool]):
    """The original model with the layers a sequence skipped removed (optimized with the same mixer
    layers when the plan has any): an independent reference for that sequence; built once per model, mixer layers
    and skip pattern (read only)."""
    return _without_skipped_layers(model, tuple(gla_layers), tuple(bool(s) for s in skipped))


@functools.cache
def _without_skipped_layers(model, gla_layers: tuple[int, ...], skipped: tuple[bool, ...]):
    kept = [i for i, s in enumerate(skipped) if not s]
    pruned = copy.deepcopy(model)
    pruned.model.layers = nn.ModuleList(pruned.model.layers[i] for i in kept)
    for j, layer in enumerate(pruned.model.layers):
        layer.self_attn.layer_idx = j
    pruned.config.num_hidden_layers = len(kept)
    pruned.config.use_cache = False
    mixed = [j for j, i in enumerate(kept) if i in gla_layers]
    if not mixed:
        return pruned
    example = torch.zeros(1, 4, dtype=torch.long)
    return rewrite.optimize(pruned, [{"mixer": {"kind": "gla", "layers": mixed}}], example_kwargs={"input_ids": example})


@pytest.mark.parametrize("plan", ["softmax", "gla", "windowed"])
def test_routed_token_by_token_logits_equal_the_model_without_the_skipped_layers(plan):
    model, om, ids = routed(plan)
    assert decode_program(om).signature.slot_mask == (plan != "windowed")  # windowed: row views, no slot mask
    with record_skips() as report:
        got = stepwise_logits(om, ids, prefill=5)
    held = report.calls[0].decisions
    _assert_mixed(held)
    assert len(report.calls) == 1 + ids.shape[1] - 5
    assert all(torch.equal(call.decisions, held) for call in report.calls)  # decided once, at prefill
    for b in range(ids.shape[0]):
        reference = without_skipped_layers(model, GLA_LAYERS[plan], held[b].tolist())
        torch.testing.assert_close(got[b : b + 1], full_forward(reference, ids[b : b + 1]), atol=ATOL, rtol=RTOL)
    with skip_controls(skip_mask=held):  # the routed forward with the same decisions held
        torch.testing.assert_close(got, logits_of(om(input_ids=ids)), atol=ATOL, rtol=RTOL)


def test_routed_generate_holds_prefill_decisions_and_batches_ragged_prompts():
    model, om, ids = routed("gla")
    prompt, mask = _ragged(ids)
    with record_skips() as report:
        batched = om.generate(prompt, mask, max_new_tokens=5)
    held = report.calls[0].decisions
    _assert_mixed(held)
    assert len(report.calls) == 5 and all(torch.equal(c.decisions, held) for c in report.calls)
    from rewrite.decode.hf import hf_generation_model

    with record_skips() as hf_report:
        hf = hf_generation_model(om).generate(prompt, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                              pad_token_id=0)
    assert torch.equal(hf[:, -5:], batched[:, -5:])
    assert all(torch.equal(c.decisions, held) for c in hf_report.calls)
    for row, start in ((0, 4), (1, 0), (2, 0)):
        alone_prompt = prompt[row : row + 1, start:]
        with record_skips() as forward:
            om(input_ids=alone_prompt)  # the routed model's own decision on the prompt
        with record_skips() as alone_report:
            alone = om.generate(alone_prompt, max_new_tokens=5)
        assert torch.equal(forward.decisions[0], held[row])
        assert torch.equal(alone_report.calls[0].decisions[0], held[row])
        # the routers pool the prompt's real tokens only: the padded row scores as it does alone
        torch.testing.assert_close(torch.stack(report.calls[0].probabilities, 1)[row],
                                   torch.stack(alone_report.calls[0].probabilities, 1)[0], atol=ATOL, rtol=RTOL)
        assert torch.equal(batched[row, start:], alone[0])
        reference = without_skipped_layers(model, GLA_LAYERS["gla"], held[row].tolist())
        assert torch.equal(alone, greedy_reference(reference, alone_prompt, 5))


@functools.cache
def _unrouted_gla():
    """The model of `routed("gla")` optimized by its plan without layer skipping (read only, shared)."""
    model, _, ids = routed("gla")
    return rewrite.optimize(model, ROUTED_PLANS["gla"][:1], example_kwargs={"input_ids": ids})


def test_routed_generate_that_skips_nothing_equals_the_unrouted_model_exactly():
    model, om, ids = routed("gla")
    unrouted = _unrouted_gla()
    prompt, mask = _ragged(ids)
    with skip_controls(threshold=1.0), record_skips() as report:
        got = om.generate(prompt, mask, max_new_tokens=6)
        logits = stepwise_logits(om, ids, prefill=5)
    assert not bool(report.calls[0].decisions.any())
    with record_skips() as spread:
        om.generate(prompt, mask, max_new_tokens=1)
    assert bool(spread.calls[0].decisions.any())  # the routers alone would skip: the threshold made the difference
    assert torch.equal(got, unrouted.generate(prompt, mask, max_new_tokens=6))
    torch.testing.assert_close(logits, stepwise_logits(unrouted, ids, prefill=5), atol=0, rtol=0)


def _block_states(state, layer: str) -> dict[str, list[torch.Tensor]]:
    """The tensors of the decode state that belong to routed block `layer`, per site (none: not stored)."""
    return {key: [t for t in torch.utils._pytree.tree_leaves(vars(value)) if isinstance(t, torch.Tensor)]
            for key, value in state.layers.items() if key.startswith(layer + ".")}


def _prefill_and_decode(program, ids: torch.Tensor, prefill: int = 5, watch=None):
    """(logits, state, what `watch()` saw in each call) of a prefill then one token per step; `watch` is
    a context manager factory entered around each program call."""
    batch, length = ids.shape
    state = program.new_state(batch, length)
    positions = torch.arange(length).expand(batch, -1)
    outs, seen = [], []
    for start, stop in [(0, prefill), *((t, t + 1) for t in range(prefill, length))]:
        state.begin(stop - start)
        if watch is None:
            outs.append(program(ids[:, start:stop], positions[:, start:stop], state))
        else:
            with watch() as w:
                outs.append(program(ids[:, start:stop], positions[:, start:stop], state))
            seen.append(w)
        state.advance()
    return torch.cat(outs, dim=1), state, seen


@pytest.mark.parametrize("plan", ["gla", "windowed"])
def test_a_routed_blocks_state_holds_its_running_sequences_only_each_as_it_would_alone(plan):
    _, om, ids = routed(plan)
    program = decode_program(om)
    layers = program.routed_layers
    logits, state, _ = _prefill_and_decode(program, ids)
    _assert_mixed(state.skips)
    batch = ids.shape[0]
    for j, layer in enumerate(layers):
        running = [b for b in range(batch) if not state.skips[b, j]]
        stored = _block_states(state, layer)
        if not running:
            assert not stored, f"{layer} runs no sequence but holds state"
            continue
        assert stored, f"no state for {layer} in {list(state.layers)}"
        for key, tensors in stored.items():  # one row per running sequence (a ring's slot list is shared)
            assert all(t.shape[0] == len(running) for t in tensors if t.dim() > 1), (key, running)
    for b in range(batch):  # each sequence alone: same decisions, and the same state in its rows
        alone_logits, alone, _ = _prefill_and_decode(program, ids[b : b + 1])
        assert torch.equal(alone.skips[0], state.skips[b])
        torch.testing.assert_close(alone_logits, logits[b : b + 1], atol=ATOL, rtol=RTOL)
        for j, layer in enumerate(layers):
            running = [r for r in range(batch) if not state.skips[r, j]]
            if b not in running:
                assert not _block_states(alone, layer)
                continue
            for key, tensors in _block_states(alone, layer).items():
                for mine, theirs in zip(_block_states(state, layer)[key], tensors, strict=True):
                    if mine.dim() > 1:
                        mine, theirs = mine[running.index(b)], theirs[0]
                    torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=RTOL, msg=f"{key}, sequence {b}")


def test_a_routed_blocks_state_refuses_rows_other_than_those_it_was_made_for():
    _, om, ids = routed("gla")
    program = decode_program(om)
    _, state, _ = _prefill_and_decode(program, ids, prefill=5)
    partial = next(j for j in range(state.skips.shape[1]) if 0 < int(state.skips[:, j].sum()) < ids.shape[0])
    for site in _block_states(state, program.routed_layers[partial]):
        store = state.layers[site]
        assert store.routed_rows == ids.shape[0] - int(state.skips[:, partial].sum())
        for reader in (state, state.select_rows(torch.arange(ids.shape[0]))):  # the whole batch, or other rows
            with pytest.raises(RewriteError, match="routed block's rows must stay those of the prefill"):
                reader.recurrent(site) if isinstance(store, RecurrentState) else reader.read_kv(store)


@pytest.mark.parametrize("plan", ["gla", "windowed"])
def test_routed_decode_steps_read_no_tensor_on_the_host(plan):
    _, om, ids = routed(plan)
    program = decode_program(om)
    _, state, seen = _prefill_and_decode(program, ids, watch=HostReads)
    _assert_mixed(state.skips)
    prefill, *steps = (w.seen for w in seen)
    # the counter sees reads: prefill reads each router's decisions (the block needs its row count)
    assert len(prefill) >= len(program.routed_layers), prefill
    assert steps == [[]] * len(steps), steps


def _routed_and_plain_step_ops(norms_fused: bool) -> tuple[list[OpCounts], list[OpCounts]]:
    """Op counts of each call of the routed program with nothing skipped and of the unrouted program."""
    _, om, ids = routed("gla")
    unrouted = _unrouted_gla()
    with decode_fusion("norms", norms_fused):
        with skip_controls(threshold=1.0):  # applies at prefill, held while decoding
            _, state, routed_steps = _prefill_and_decode(decode_program(om), ids, watch=OpCounts)
        assert not state.skips.any()
        _, _, plain_steps = _prefill_and_decode(decode_program(unrouted), ids, watch=OpCounts)
    assert routed_steps[0].ops != plain_steps[0].ops  # prefill: the routers run (the counter sees them)
    return routed_steps[1:], plain_steps[1:]


def test_a_routed_decode_step_that_skips_nothing_runs_the_unrouted_programs_ops():
    routed_steps, plain_steps = _routed_and_plain_step_ops(norms_fused=False)
    for routed_step, plain_step in zip(routed_steps, plain_steps, strict=True):
        assert routed_step.ops == plain_step.ops


def test_with_fused_norms_a_routed_block_boundary_keeps_its_residual_add_apart_from_the_next_norm():
    # the unrouted program folds a block's residual add into the next block's norm (add_rms_norm_cast); a routed
    # block runs only its rows, so the add that ends it and the norm that starts the next stay two ops
    routed_steps, plain_steps = _routed_and_plain_step_ops(norms_fused=True)
    for routed_step, plain_step in zip(routed_steps, plain_steps, strict=True):
        more = routed_step.ops.copy()
        more.subtract(plain_step.ops)
        changed = {op: n for op, n in more.items() if n and op != "aten._assert_tensor_metadata.default"}
        boundaries = changed.get("aten.add.Tensor", 0)
        assert boundaries > 0, changed
        assert changed == {"aten.add.Tensor": boundaries, "rewrite.rms_norm_cast.default": boundaries,
                           "rewrite.add_rms_norm_cast.default": -boundaries}


def _skip_by_identity(model, ids: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """Logits of the original model run one sequence at a time, the layers it skips replaced by the identity."""

    def identity(module, args, kwargs, out):
        hidden = args[0] if args else kwargs["hidden_states"]
        return hidden if isinstance(out, torch.Tensor) else (hidden, *out[1:])

    outs = []
    for b in range(ids.shape[0]):
        handles = [layer.register_forward_hook(identity, with_kwargs=True)
                   for layer, skipped in zip(model.model.layers, skip[b].tolist(), strict=True) if skipped]
        try:
            outs.append(logits_of(model(input_ids=ids[b : b + 1], use_cache=False)))
        finally:
            for h in handles:
                h.remove()
    return torch.cat(outs)


@pytest.mark.parametrize("plan", ["softmax", "windowed"])
def test_decode_with_a_held_skip_mask_equals_each_sequence_alone_with_its_blocks_made_identity(plan):
    model, om, ids = routed(plan)
    n = len(model.model.layers)
    # every block run by some sequences and skipped by others, a different set per sequence
    skip = torch.tensor([[j % 3 == b for j in range(n)] for b in range(3)])
    skip[0, n - 1] = True
    _assert_mixed(skip)
    with record_skips() as report:
        with skip_controls(skip_mask=skip):  # applies at prefill, held while decoding
            got, state, _ = _prefill_and_decode(decode_program(om), ids, prefill=4)
    assert torch.equal(state.skips, skip)
    assert all(torch.equal(c.decisions, skip) for c in report.calls) and len(report.calls) == 1 + ids.shape[1] - 4
    torch.testing.assert_close(got, _skip_by_identity(model, ids, skip), atol=ATOL, rtol=RTOL)


def _static_decode(program, ids: torch.Tensor, prompt: int, watch=None):
    """(logits [B, L, V] of a prefill of `prompt` tokens then one static step per remaining token (what a CUDA
    graph captures), the state, what `watch()` saw around each step)."""
    state, first = prefill_state(program, ids[:, :prompt], extra=ids.shape[1] - prompt)
    state.start_static()
    outs, seen = [first], []
    for t in range(prompt, ids.shape[1]):
        with watch() if watch is not None else contextlib.nullcontext() as w:
            outs.append(decode_token(program, state, ids[:, t : t + 1]))
        seen.append(w)
    return torch.cat(outs, 1), state, seen


def test_routed_static_steps_over_a_full_kv_cache_equal_each_sequence_alone_with_its_blocks_made_identity():
    """The static steps of a routed decode over full KV caches, where blocks run part of the batch, give the
    logits of each sequence alone with the layers it skips made the identity."""
    model, om, ids = routed("softmax")
    program = decode_program(om)
    skip = torch.tensor([[j % 3 == b for j in range(4)] for b in range(3)])
    _assert_mixed(skip)
    default, _, _ = _static_decode(program, ids, 4)
    with skip_controls(skip_mask=skip):  # applies at prefill, held while decoding
        got, state, _ = _static_decode(program, ids, 4)
    assert torch.equal(state.skips, skip) and state.capacity == 10  # the slots asked, not rounded
    torch.testing.assert_close(got, _skip_by_identity(model, ids, skip), atol=ATOL, rtol=RTOL)
    assert not torch.equal(got, default)  # the decisions skip something


class _AttentionCalls(TorchDispatchMode):
    """The key shapes of the SDPA calls run inside it."""

    def __init__(self):
        super().__init__()
        self.sdpa = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in str(func):
            self.sdpa.append(tuple(args[1].shape))
        return func(*args, **(kwargs or {}))


def test_a_static_steps_attention_is_one_sdpa_per_block_over_its_running_rows_and_every_slot():
    """The pieces of a static step's attention: one SDPA per block over [running rows, kv heads, every slot],
    so its work follows the rows a block runs (no cache gathered, no row rounded up)."""
    _, om, ids = routed("softmax")
    program = decode_program(om)
    skip = torch.tensor([[j % 3 == b and j < 3 for j in range(4)] for b in range(3)])
    running = (~skip).sum(0).tolist()
    assert running == [2, 2, 2, 3]  # the last block runs every sequence
    kv_heads, dim = 2, 16
    with skip_controls(skip_mask=skip):
        _, state, seen = _static_decode(program, ids, 4, watch=_AttentionCalls)
    assert [s.sdpa for s in seen] == [[(r, kv_heads, state.capacity, dim) for r in running]] * len(seen)


def test_routed_blocks_in_a_plan_are_checked_and_soft_decisions_are_refused():
    model, om, ids = routed("gla")
    checked = rewrite.optimize(model, [*ROUTED_PLANS["gla"], "stateful"], example_kwargs={"input_ids": ids})
    messages = checked.report.results[-1].messages
    assert sum("routed; decodes with the decision made at prefill" in m for m in messages) == 4
    assert any("gla state" in m for m in messages) and any("KV cache" in m for m in messages)
    with skip_controls(mode="soft"), pytest.raises(RewriteError, match="model.layers.0: layer skipping decodes with hard"):
        om.generate(ids, max_new_tokens=1)


def test_lazy_module_generates_by_capturing_from_the_prompt():
    model, om, ids = optimized("llama", "hybrid")
    lazy = rewrite.optimize(model, PLANS["hybrid"])
    assert lazy.optimized is None
    prompt, mask = _ragged(ids)
    got = lazy.generate(prompt, mask, max_new_tokens=5)
    assert lazy.optimized is not None
    assert torch.equal(got, om.generate(prompt, mask, max_new_tokens=5))
    assert torch.equal(lazy.generate(ids, max_new_tokens=3), greedy_reference(om, ids, 3))


def state_tensors(state) -> dict[str, torch.Tensor]:
    """Every tensor a decode state holds (its own attributes and every site's), by name."""
    found = {name: t for name, t in vars(state).items() if isinstance(t, torch.Tensor)}
    for site, layer in state.layers.items():
        leaves = torch.utils._pytree.tree_leaves(vars(layer))
        found.update({f"{site}[{i}]": t for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)})
    return found


def prefill_state(program, ids: torch.Tensor, valid: torch.Tensor | None = None, extra: int = 4):
    """(state, logits) after one prefill call of `ids` [B, L] (`valid` marks real tokens), closed."""
    state = program.new_state(ids.shape[0], ids.shape[1] + extra)
    positions = state.positions(ids.shape[1], valid)
    state.begin(ids.shape[1], valid)
    logits = program(ids, positions, state)
    state.advance()
    return state, logits


def decode_token(program, state, token: torch.Tensor) -> torch.Tensor:
    """Logits [B, 1, V] of one decode step of `token` [B, 1]."""
    positions = state.positions(1)
    state.begin(1)
    logits = program(token, positions, state)
    state.advance()
    return logits


def test_linear_mixer_decode_state_is_constant_in_context_length():
    _, om, _ = optimized("llama", "gla")
    program = decode_program(om)
    assert not program.signature.slot_mask
    vocab = om.source.config.vocab_size
    g = torch.Generator().manual_seed(5)
    totals, shapes = [], []
    for length in (16, 300):
        ids = torch.randint(0, vocab, (2, length), generator=g)
        state, _ = prefill_state(program, ids)
        held = state_tensors(state)
        sizes = state.nbytes()
        assert state.valid is None and state.counts.tolist() == [length, length]
        assert sizes["kv_cache"] == 0 and sizes["recurrent"] > 0
        assert sum(sizes.values()) == sum(t.nbytes for t in held.values())  # nbytes reports everything held
        if length == 300:
            assert not [n for n, t in held.items() if length in t.shape], {n: t.shape for n, t in held.items()}
        decode_token(program, state, ids[:, -1:])
        assert sum(state.nbytes().values()) == sum(sizes.values())
        totals.append(sum(sizes.values()))
        shapes.append({n: (tuple(t.shape), t.dtype) for n, t in held.items()})
    assert totals[0] == totals[1] and shapes[0] == shapes[1]


def test_a_full_kv_cache_keeps_its_slot_mask_and_grows_with_context():
    _, om, ids = optimized("llama", "hybrid")
    program = decode_program(om)
    assert program.signature.slot_mask
    small, _ = prefill_state(program, ids[:, :4])
    large, _ = prefill_state(program, ids)
    assert large.valid is not None and large.valid.shape == (2, ids.shape[1] + 4)
    assert sum(large.nbytes().values()) > sum(small.nbytes().values())
    state = decode_program(optimized("llama", "gla")[1]).new_state(2, 8)
    with pytest.raises(RewriteError, match="slot mask"):
        state.kv_cache("layer", torch.zeros(2, 1, 1, 4), torch.zeros(2, 1, 1, 4))


@pytest.mark.parametrize("plan", ["gla", "gla_norm", "hybrid", "gated_deltanet"])
def test_ragged_left_padded_token_by_token_logits_equal_each_prompt_alone(plan):
    _, om, ids = optimized("llama", plan)
    program = decode_program(om)
    _, mask = _ragged(ids)
    valid = mask.bool()
    prompt = 7
    state, first = prefill_state(program, ids[:, :prompt], valid[:, :prompt], extra=ids.shape[1])
    assert state.counts.tolist() == [prompt - 4, prompt]
    outs = [first] + [decode_token(program, state, ids[:, t : t + 1]) for t in range(prompt, ids.shape[1])]
    got = torch.cat(outs, dim=1)
    assert state.counts.tolist() == [ids.shape[1] - 4, ids.shape[1]]
    torch.testing.assert_close(got[0, 4:], full_forward(om, ids[:1, 4:])[0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got[1], full_forward(om, ids[1:])[0], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("plan", ["gla", "hybrid"])
def test_static_one_token_step_gives_the_eager_logits(plan):
    """The CUDA-graph step's mode (every buffer fixed), run eagerly on the CPU."""
    _, om, ids = optimized("llama", plan)
    program = decode_program(om)
    _, mask = _ragged(ids)
    runs = []
    for static in (False, True):
        state, _ = prefill_state(program, ids[:, :6], mask[:, :6].bool(), extra=ids.shape[1])
        if static:
            state.start_static()
        before = {n: (tuple(t.shape), t.data_ptr()) for n, t in state_tensors(state).items()}
        runs.append(torch.cat([decode_token(program, state, ids[:, t : t + 1]) for t in range(6, ids.shape[1])], 1))
        if static:  # the replayed step reads and writes the same buffers, of the same shapes
            assert {n: (tuple(t.shape), t.data_ptr()) for n, t in state_tensors(state).items()} == before
            assert sum(state.nbytes().values()) == sum(t.nbytes for t in state_tensors(state).values())
            assert (state.valid is None) == (plan == "gla")
        assert state.counts.tolist() == [ids.shape[1] - 4, ids.shape[1]]
    torch.testing.assert_close(runs[1], runs[0], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("plan", ["hybrid", "gla"])
def test_hugging_face_generate_drives_the_decode_program(plan, monkeypatch):
    import rewrite.decode.hf as hf_adapter

    monkeypatch.setattr(hf_adapter, "INITIAL_CAPACITY", 2)  # the cache must grow while generating
    seen, real_open = [], hf_adapter.DecodeStateCache.open
    monkeypatch.setattr(hf_adapter.DecodeStateCache, "open",
                        lambda cache, *args: seen.append(cache.get_seq_length()) or real_open(cache, *args))
    _, om, ids = optimized("llama", plan)
    prompt, mask = _ragged(ids)
    hf = hf_adapter.hf_generation_model(om)
    out = hf.generate(prompt, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out[:, -6:], om.generate(prompt, mask, max_new_tokens=6)[:, -6:])
    assert seen == [0, *range(ids.shape[1], ids.shape[1] + 5)]  # one prefill, then one token a step
    assert om.source.config._attn_implementation == "sdpa"  # the source's config is left alone


def test_generate_example_runs_and_with_decode_fusions_gives_the_unfused_tokens(capsys):
    """The example with its defaults (`--tiny` alone runs, was a test of its own), with chosen fusions and none."""
    from examples import generate as example
    from rewrite.decode import fusion_switches

    before = fusion_switches.current()
    assert example.main(["--tiny", "--fusions", "norms,rotary"]) == 0
    out = capsys.readouterr().out
    assert "decode fusions: norms, rotary (5 norms, 2 rotations, 0 gated activations fused)" in out  # 2 layers
    assert "the fused program's tokens equal the unfused program's" in out
    assert fusion_switches.current() == before  # put back
    assert example.main(["--tiny", "--fusions", "none"]) == 0
    assert "decode fusions: none (0 norms, 0 rotations, 0 gated activations fused)" in capsys.readouterr().out
    assert example.main(["--tiny"]) == 0  # the library's defaults: norms, rotary and the gated MLP products
    out = capsys.readouterr().out
    assert "(5 norms, 2 rotations, 2 gated activations fused)" in out
    assert "the fused program's tokens equal the unfused program's" in out
    with pytest.raises(SystemExit):
        example.main(["--tiny", "--fusions", "layernorm"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_gives_the_eager_tokens():
    model, inputs = TARGETS["llama"]()
    model = model.cuda()
    ids = inputs["input_ids"].cuda()
    om = rewrite.optimize(model, PLANS["hybrid"], example_kwargs={"input_ids": ids})
    _, mask = _ragged(ids)
    eager = om.generate(ids, mask, max_new_tokens=8, cuda_graph="never")
    graphed = om.generate(ids, mask, max_new_tokens=8, cuda_graph="always")
    assert torch.equal(eager, graphed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("plan", ["gla", "windowed"])
def test_cuda_graph_of_a_routed_decode_gives_the_eager_logits_and_tokens(plan, compiled):
    """Routed blocks replayed from a CUDA graph (the eager or the compiled step) decode as the eager
    program does, with decisions that differ per sequence."""
    from rewrite.decode.cuda_graph import GraphedStep

    _, om, ids = routed(plan, "cuda")
    program = decode_program(om)
    prompt, mask = _ragged(ids)
    state, _ = prefill_state(program, ids[:, :6], mask[:, :6].bool(), extra=ids.shape[1])
    _assert_mixed(state.skips)
    eager = torch.cat([decode_token(program, state, ids[:, t : t + 1]) for t in range(6, ids.shape[1])], 1)

    def graphed(program, state):
        step = GraphedStep(program, state, compiled=compiled)
        return lambda i, p: step(i, p)

    logits, _ = _compiled_and_eager_steps(program, ids, mask, 6, ids.shape[1] + 6, graphed)
    torch.testing.assert_close(logits[0], eager, atol=ATOL, rtol=RTOL, msg="static step vs eager decode")
    torch.testing.assert_close(logits[1], logits[0], atol=ATOL, rtol=RTOL, msg="CUDA graph vs static step")
    tokens = om.generate(prompt, mask, max_new_tokens=6, cuda_graph="never")
    assert torch.equal(om.generate(prompt, mask, max_new_tokens=6, cuda_graph="always", compile_step=compiled), tokens)


def _compiled_and_eager_steps(program, ids: torch.Tensor, mask: torch.Tensor, prompt: int, capacity: int, step_of):
    """Logits [B, steps, V] and the states of a static eager and a compiled decode of `ids` after a
    prefill of `prompt` tokens (`step_of(program, state)` makes the compiled step)."""
    logits, states = [], []
    for compiled in (False, True):
        state, _ = prefill_state(program, ids[:, :prompt], mask[:, :prompt].bool(), extra=capacity - prompt)
        state.start_static()
        run = step_of(program, state) if compiled else (lambda i, p, s=state: program(i, p, s))
        before = {n: (tuple(t.shape), t.data_ptr()) for n, t in state_tensors(state).items()}
        outs = []
        for t in range(prompt, ids.shape[1]):
            positions = state.positions(1)
            state.begin(1)
            outs.append(run(ids[:, t : t + 1], positions).clone())
            state.advance()
        assert {n: (tuple(t.shape), t.data_ptr()) for n, t in state_tensors(state).items()} == before
        logits.append(torch.cat(outs, 1))
        states.append(state)
    return logits, states


@pytest.mark.parametrize("plan", ["gla", "gla_norm", "softmax"])
def test_compiled_step_gives_the_eager_logits_tokens_and_state(plan):
    """compile_step: the one-token step compiled by Inductor (CPU) equals the eager static step, and
    generate's tokens equal the uncompiled ones (gla: recurrent states; softmax: KV caches)."""
    from rewrite.decode.compiled import CompiledStep

    _, om, ids = optimized("llama", plan)
    program = decode_program(om)
    prompt, mask = _ragged(ids)
    new = 8
    capacity = ids.shape[1] + new  # generate's capacity below: the KV-cache shapes, so one compilation
    logits, states = _compiled_and_eager_steps(program, ids, mask, 6, capacity, CompiledStep)
    torch.testing.assert_close(logits[1], logits[0], atol=ATOL, rtol=RTOL)
    eager, compiled = state_tensors(states[0]), state_tensors(states[1])
    assert eager.keys() == compiled.keys() and (states[0].valid is None) == plan.startswith("gla")
    for name in eager:  # the compiled step wrote the state in place, as the eager one
        torch.testing.assert_close(compiled[name], eager[name], atol=ATOL, rtol=RTOL, msg=name)
    tokens = om.generate(prompt, mask, max_new_tokens=new)
    assert torch.equal(om.generate(prompt, mask, max_new_tokens=new, compile_step=True), tokens)


@pytest.mark.parametrize("plan", ["gla", "windowed"])
def test_routed_static_and_compiled_steps_give_the_eager_logits_and_tokens(plan):
    """Routed blocks with decisions held from the prefill: the static step (what a CUDA graph captures)
    and the step compiled by Inductor (CPU) equal the eager decode, and so do generate's tokens."""
    from rewrite.decode.compiled import CompiledStep

    _, om, ids = routed(plan)
    program = decode_program(om)
    prompt, mask = _ragged(ids)
    state, _ = prefill_state(program, ids[:, :6], mask[:, :6].bool(), extra=ids.shape[1])
    _assert_mixed(state.skips)
    eager = torch.cat([decode_token(program, state, ids[:, t : t + 1]) for t in range(6, ids.shape[1])], 1)
    logits, states = _compiled_and_eager_steps(program, ids, mask, 6, ids.shape[1] + 6, CompiledStep)
    torch.testing.assert_close(logits[0], eager, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(logits[1], logits[0], atol=ATOL, rtol=RTOL)
    assert torch.equal(states[1].skips, state.skips)
    tokens = om.generate(prompt, mask, max_new_tokens=6)
    assert torch.equal(om.generate(prompt, mask, max_new_tokens=6, compile_step=True), tokens)


@pytest.mark.parametrize("plan", ["softmax", "windowed"])
def test_compiled_routed_step_with_the_kv_cache_attention_op_gives_the_sdpa_logits(monkeypatch, plan):
    """The split-KV op (the decode sites' default on CUDA; here on the CPU, its reference) inside the routed step
    compiled by Inductor as one graph (the op in its code): the logits of the eager decode with SDPA, over full and
    ring KV caches."""
    from rewrite.decode import sites
    from rewrite.decode.program import DecodeProgram

    _, om, ids = routed(plan)
    monkeypatch.setattr(sites, "KV_CACHE_ATTENTION_KERNEL", False)
    program = DecodeProgram(om.source, om.plan, dict(om.named_parameters()))
    state, _ = prefill_state(program, ids[:, :6], extra=4)
    _assert_mixed(state.skips)
    sdpa = torch.cat([decode_token(program, state, ids[:, t : t + 1]) for t in range(6, 10)], 1)
    monkeypatch.setattr(sites, "KV_CACHE_ATTENTION_KERNEL", True)
    monkeypatch.setattr(sites, "KV_CACHE_ATTENTION_DEVICES", ("cuda", "cpu"))
    code, logits, _ = _step_code_and_logits(DecodeProgram(om.source, om.plan, dict(om.named_parameters())), ids)
    assert "torch.ops.rewrite.kv_cache_attention" in code
    torch.testing.assert_close(logits, sdpa, atol=ATOL, rtol=RTOL)


def _step_code_and_logits(program, ids: torch.Tensor) -> tuple[str, torch.Tensor, dict[str, torch.Tensor]]:
    """(the `call` of the Inductor code of `program`'s compiled static step, logits [B, 4, V] of 4 steps,
    the state's tensors) after a prefill of 6 tokens of `ids`."""
    from torch._inductor.utils import run_and_get_code

    from rewrite.decode.compiled import CompiledStep

    state, _ = prefill_state(program, ids[:, :6], extra=4)
    state.start_static()
    step, outs, code = CompiledStep(program, state), [], ""
    for t in range(6, 10):
        positions = state.positions(1)
        state.begin(1)
        if t == 6:
            logits, codes = run_and_get_code(step, ids[:, t : t + 1], positions)
            code = "\n".join(codes)
        else:
            logits = step(ids[:, t : t + 1], positions)
        outs.append(logits.clone())
        state.advance()
    return code[code.index("def call("):], torch.cat(outs, 1), state_tensors(state)


def _kernels(call: str) -> list[str]:
    """The kernels an Inductor `call` (CPU) launches: its fused C++ kernels, extern kernels and ops."""
    starts = ("cpp_fused", "extern_kernels.", "torch.ops.")
    return [line.strip() for line in call.splitlines() if line.strip().startswith(starts)
            or " = torch.ops." in line]


def test_compiled_normalized_gla_step_writes_its_state_in_place_with_fewer_kernels(monkeypatch):
    """gla with elu1 and normalize, compiled by Inductor (CPU), batch 1: the step op updates each layer's held
    state itself (called on the state input, no clone, no copy back) and divides in the kernel (no column of
    ones for v, no division after it): fewer kernels per layer than the ones-column step that returns a new
    state (`mixers.common.FUSED_STEP_NORMALIZE`, `decode.steps.INPLACE_STATE` off), with the same logits and
    states."""
    import rewrite.decode.steps as decode_steps
    import rewrite.mixers.common as mixer_common
    from rewrite.decode.program import DecodeProgram

    _, om, ids = optimized("llama", "gla_norm")
    ids = ids[:1]
    layers = om.source.config.num_hidden_layers
    results = {}
    for fused in (True, False):
        monkeypatch.setattr(decode_steps, "INPLACE_STATE", fused)
        monkeypatch.setattr(mixer_common, "FUSED_STEP_NORMALIZE", fused)
        results[fused] = _step_code_and_logits(DecodeProgram(om.source, om.plan, dict(om.named_parameters())), ids)
    call, logits, states = results[True]
    inplace = [line for line in _kernels(call) if "linear_attention_step_.default(" in line]
    assert len(inplace) == layers and not re.search(r"clone|\.copy_\(|cpp_fused_copy_", call), call
    assert "linear_attention_step.default(" not in call
    # the copy and the division were kernels of their own; CPU Inductor sometimes fuses v's ones column into
    # a neighbouring kernel (GPU Inductor: its own kernel), so at least 2 per layer here, and no ones column
    before = results[False][0]
    assert "new_ones" in before and "new_ones" not in call
    assert len(_kernels(before)) - len(_kernels(call)) >= 2 * layers
    torch.testing.assert_close(logits, results[False][1], atol=ATOL, rtol=RTOL)
    for name, tensor in states.items():
        torch.testing.assert_close(tensor, results[False][2][name], atol=ATOL, rtol=RTOL, msg=name)


def test_in_place_and_fused_normalized_steps_give_the_ones_column_steps_logits(monkeypatch):
    """Eager decode of gla elu1 + normalize with the state written in place and the division in the kernel,
    the running key sums computed before the kernel or kept by it: the logits of the step that appends ones
    to v and returns a new state."""
    import rewrite.decode.steps as decode_steps
    import rewrite.mixers.common as mixer_common

    api = importlib.import_module("rewrite.kernels.linear_attention.api")
    _, om, ids = optimized("llama", "gla_norm")
    runs = []
    for fused, precomputed in ((False, "never"), (True, "never"), (True, "always")):
        monkeypatch.setattr(decode_steps, "INPLACE_STATE", fused)
        monkeypatch.setattr(mixer_common, "FUSED_STEP_NORMALIZE", fused)
        monkeypatch.setattr(api, "PRECOMPUTED_NORMALIZER", precomputed)
        runs.append(stepwise_logits(om, ids, prefill=5))
    torch.testing.assert_close(runs[1], runs[0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(runs[2], runs[0], atol=ATOL, rtol=RTOL)


def test_compile_step_errors_name_the_option_and_the_cause(monkeypatch):
    from rewrite.decode.compiled import CompiledStep
    from rewrite.decode.program import DecodeProgram
    from rewrite.decode.state import DecodeState

    _, om, ids = optimized("llama", "gla")
    with pytest.raises(ValueError, match=r"compile_step must be one of False, True, got 'yes'"):
        om.generate(ids, max_new_tokens=1, compile_step="yes")
    state, _ = prefill_state(decode_program(om), ids)
    with pytest.raises(RewriteError, match="static mode"):
        CompiledStep(decode_program(om), state)(ids[:, :1], state.positions(1))

    def steps(program: DecodeProgram) -> None:
        state, _ = prefill_state(program, ids[:, :6])
        state.start_static()
        step = CompiledStep(program, state)
        for t in range(6, 9):
            positions = state.positions(1)
            state.begin(1)
            step(ids[:, t : t + 1], positions)
            state.advance()

    recurrent = DecodeState.recurrent

    def reads_length(self, site):  # a site reading a per-step value: every step would recompile
        assert self.length >= 0
        return recurrent(self, site)

    monkeypatch.setattr(DecodeState, "recurrent", reads_length)
    with pytest.raises(RewriteError, match=r"would recompile between two steps(.|\n)*decode_state.length"):
        steps(DecodeProgram(om.source, om.plan, dict(om.named_parameters())))

    def breaks_the_graph(self, site):
        torch._dynamo.graph_break()
        return recurrent(self, site)

    monkeypatch.setattr(DecodeState, "recurrent", breaks_the_graph)
    with pytest.raises(RewriteError, match="could not compile the decode step of LlamaForCausalLM as one graph"):
        steps(DecodeProgram(om.source, om.plan, dict(om.named_parameters())))


def test_step_inductor_options_reach_inductor(monkeypatch):
    """STEP_INDUCTOR_OPTIONS go to torch.compile when a program first compiles its step: an option name
    Inductor does not know is refused by torch, CUDA graphs of Inductor's own are refused by us."""
    from rewrite.decode import program as program_module
    from rewrite.decode.program import DecodeProgram

    _, om, _ = optimized("llama", "gla")
    monkeypatch.setattr(program_module, "STEP_INDUCTOR_OPTIONS", {"not_an_inductor_option": True})
    with pytest.raises(RuntimeError, match="not_an_inductor_option"):
        DecodeProgram(om.source, om.plan, dict(om.named_parameters())).compiled_module()
    monkeypatch.setattr(program_module, "STEP_INDUCTOR_OPTIONS", {"triton.cudagraphs": True})
    with pytest.raises(ValueError, match="leave triton.cudagraphs off"):
        DecodeProgram(om.source, om.plan, dict(om.named_parameters())).compiled_module()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("plan", ["gla", "hybrid"])
def test_cuda_graph_of_the_compiled_step_gives_the_eager_logits_and_tokens(plan):
    from rewrite.decode.cuda_graph import GraphedStep

    model, inputs = TARGETS["llama"]()
    model = model.cuda()
    ids = inputs["input_ids"].cuda()
    om = rewrite.optimize(model, PLANS[plan], example_kwargs={"input_ids": ids})
    prompt, mask = _ragged(ids)
    program = decode_program(om)

    def graphed(program, state):
        step = GraphedStep(program, state, compiled=True)
        return lambda i, p: step(i, p)

    logits, _ = _compiled_and_eager_steps(program, ids, mask, 6, ids.shape[1] + 8, graphed)
    torch.testing.assert_close(logits[1], logits[0], atol=ATOL, rtol=RTOL)
    eager = om.generate(prompt, mask, max_new_tokens=8, cuda_graph="never")
    assert torch.equal(om.generate(prompt, mask, max_new_tokens=8, cuda_graph="always", compile_step=True), eager)


@pytest.mark.parametrize("path", ["reference", "triton"])
@pytest.mark.parametrize("plan", ["softmax", "windowed"])
def test_static_steps_with_the_kv_cache_attention_kernel_give_the_logits_of_sdpa(monkeypatch, path, plan):
    """sites.KV_CACHE_ATTENTION_KERNEL on: the routed static steps' attention over full KV caches (Llama) or ring
    caches (Mistral, a window of 4) runs the split-KV op (its CPU reference, or its Triton kernel in Triton's
    interpreter) and gives the logits of SDPA."""
    from rewrite.decode import sites
    from rewrite.kernels.testing import load_launchers

    model, om, ids = routed(plan)
    program = decode_program(om)
    layers = model.config.num_hidden_layers
    skip = torch.tensor([[j % 3 == b and j < 3 for j in range(layers)] for b in range(3)])
    monkeypatch.setattr(sites, "KV_CACHE_ATTENTION_KERNEL", False)  # the expected logits: SDPA
    with skip_controls(skip_mask=skip):
        expected, _, _ = _static_decode(program, ids, 4)
    calls, bounds = [], []
    if path == "triton":
        launchers = load_launchers("rewrite.kernels.kv_cache_attention.triton_decode")

        def kernel(q, keys, values, visible, scale, last_slot=None):
            calls.append(tuple(keys.shape))
            bounds.append(None if last_slot is None else int(last_slot))
            scale = q.shape[-1] ** -0.5 if scale is None else scale
            return launchers.kv_cache_attention_decode(q, keys, values, visible, scale, last_slot)
    else:
        op = sites.kv_cache_attention

        def kernel(q, keys, values, visible, scale, last_slot=None):
            calls.append(tuple(keys.shape))
            bounds.append(None if last_slot is None else int(last_slot))
            return op(q, keys, values, visible, scale, last_slot)
    monkeypatch.setattr(sites, "KV_CACHE_ATTENTION_KERNEL", True)
    monkeypatch.setattr(sites, "KV_CACHE_ATTENTION_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(sites, "kv_cache_attention", kernel)
    with skip_controls(skip_mask=skip):
        got, state, seen = _static_decode(program, ids, 4, watch=_AttentionCalls)
    steps = ids.shape[1] - 4
    slots = state.capacity if plan == "softmax" else model.config.sliding_window  # a ring holds the window
    assert [s.sdpa for s in seen] == [[]] * steps  # no step's attention is SDPA (the prefill's may be)
    assert len(calls) >= layers * steps and all(shape[2] == slots for shape in calls[-layers * steps:])
    # a full cache's step reads up to its query's slot (the capacity's unfilled tail unread); a ring has no bound
    last_steps = bounds[-layers * steps:]
    if plan == "softmax":
        assert last_steps == [4 + step for step in range(steps) for _ in range(layers)], last_steps
    else:
        assert last_steps == [None] * (layers * steps)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


def _visible_mask_per_site(self, end: int, queries: slice | None = None) -> torch.Tensor:
    """The full KV cache's visible mask as each site built it before it was made once per call: from the
    (for a row view, gathered) slot mask, a padded query seeing itself by its own term."""
    slots = self.slots if queries is None else self.slots[queries]
    key_slots = torch.arange(end, device=slots.device)
    visible = self.valid[:, None, None, :end] & (key_slots <= slots[:, None])
    return visible | (key_slots == slots[:, None])


def _window_mask_per_site(key_slots, valid, query_slots, window, padded):
    """The ring's visible mask as built before (the query's own term always added)."""
    near = (key_slots <= query_slots[:, None]) & (key_slots > query_slots[:, None] - window)
    return (valid[:, None, None, :] & near) | (key_slots == query_slots[:, None])


@functools.cache
def _unrouted(plan_key: str):
    """The model of `routed(plan_key)` optimized without layer skipping."""
    model, _, ids = routed(plan_key)
    return rewrite.optimize(model, [], example_kwargs={"input_ids": ids})


def _ragged_eager_and_static_decode(program, ids: torch.Tensor, skip: torch.Tensor | None, watch=None):
    """(logits [B, L, V], what `watch()` saw per call) of a left-padded prefill of 6 tokens (row 0 padded by 4),
    two eager steps, then two static steps (what a CUDA graph captures); `skip` held from the prefill."""
    _, mask = _ragged(ids)
    state = program.new_state(ids.shape[0], ids.shape[1])
    calls = [(0, 6), (6, 7), (7, 8), (8, 9), (9, 10)]
    outs, seen = [], []
    for start, stop in calls:
        if start == 8:
            state.start_static()
        valid = mask[:, start:stop].bool() if start == 0 else None
        positions = state.positions(stop - start, valid)
        state.begin(stop - start, valid)
        with (skip_controls(skip_mask=skip) if skip is not None and start == 0 else contextlib.nullcontext(),
              watch() if watch is not None else contextlib.nullcontext() as w):
            outs.append(program(ids[:, start:stop], positions, state))
        seen.append(w)
        state.advance()
        assert state._visible is None  # nothing made for a call outlives it
    return torch.cat(outs, 1), seen


def _ragged_case(plan: str, routing: str):
    """(original model, decode program, ids [3, 10], held skips or None) of `routed(plan)`, unrouted or routed with
    every block run by part of the batch."""
    model, om, ids = routed(plan)
    if routing == "unrouted":
        om = _unrouted(plan)
    n = len(model.model.layers)
    skip = torch.tensor([[j % 3 == b for j in range(n)] for b in range(3)]) if routing == "routed" else None
    return model, decode_program(om), ids, skip


def _assert_each_sequence_is_the_models(model, ids: torch.Tensor, skip: torch.Tensor | None, logits: torch.Tensor):
    """`logits` of `_ragged_eager_and_static_decode` equal the model's own, each sequence alone (row 0 left-padded by
    4 tokens), its skipped blocks made the identity."""
    held = skip if skip is not None else torch.zeros(3, len(model.model.layers), dtype=torch.bool)
    for b, start in enumerate([4, 0, 0]):
        reference = _skip_by_identity(model, ids[b : b + 1, start:], held[b : b + 1])
        torch.testing.assert_close(logits[b : b + 1, start:], reference, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("plan", ["softmax", "windowed"])
@pytest.mark.parametrize("routing", ["unrouted", "routed"])
def test_decode_masks_made_once_per_call_give_the_per_site_masks_logits_bit_for_bit(monkeypatch, plan, routing):
    """Full (Llama) and ring (Mistral, sliding window) KV caches, unrouted and routed (every block run by part of
    the batch): a padded prefill, eager and static steps give bit for bit the logits of masks built per site as
    before, and the model's own logits (each sequence alone, its skipped blocks made the identity)."""
    from rewrite.decode import sites
    from rewrite.decode.state import DecodeState

    model, program, ids, skip = _ragged_case(plan, routing)
    got, _ = _ragged_eager_and_static_decode(program, ids, skip)
    monkeypatch.setattr(DecodeState, "visible_mask", _visible_mask_per_site)
    monkeypatch.setattr(sites, "_window_mask", _window_mask_per_site)
    before, _ = _ragged_eager_and_static_decode(program, ids, skip)
    assert torch.equal(got, before)
    _assert_each_sequence_is_the_models(model, ids, skip, got)


@pytest.mark.parametrize("plan", ["softmax", "windowed"])
@pytest.mark.parametrize("routing", ["unrouted", "routed"])
def test_a_long_prompts_attention_in_blocks_of_queries_gives_the_whole_calls_logits(monkeypatch, plan, routing):
    """A prompt whose mask would pass `sites.PROMPT_MASK_ELEMENTS` attends in blocks of queries, each with its own
    mask (full caches and rings, unrouted and routed): the padded prefill and the steps after it give the logits
    of one SDPA call per site, and the model's own (each sequence alone, skipped blocks the identity)."""
    from rewrite.decode import sites

    model, program, ids, skip = _ragged_case(plan, routing)
    whole, _ = _ragged_eager_and_static_decode(program, ids, skip)
    blocks: list[int] = []
    block_of = sites._query_block
    monkeypatch.setattr(sites, "_query_block", lambda q, keys: blocks.append(block_of(q, keys)) or blocks[-1])
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    monkeypatch.setattr(sites, "PROMPT_MASK_ELEMENTS", 3 * 2 * (heads // kv_heads) * 16)  # 2 queries of 3 rows
    blocked, _ = _ragged_eager_and_static_decode(program, ids, skip)
    assert blocks and min(blocks) < 6  # the 6-token prefill ran in blocks
    torch.testing.assert_close(blocked, whole)
    _assert_each_sequence_is_the_models(model, ids, skip, blocked)


def _count_mask_builds(monkeypatch) -> collections.Counter:
    """A counter of the full KV caches' visible masks made from now on, by kind of state (the state itself, a
    row view); counted in Python around the makers (eager steps only)."""
    from rewrite.decode.state import DecodeState, RowView

    made: collections.Counter = collections.Counter()
    for cls in (DecodeState, RowView):
        def counted(state, end, *queries, make=cls.__dict__["_make_visible"]):
            made[type(state).__name__] += 1
            return make(state, end, *queries)

        monkeypatch.setattr(cls, "_make_visible", counted)
    return made


def test_a_calls_full_kv_cache_mask_is_made_once_and_a_row_view_takes_its_rows(monkeypatch):
    """Every call (padded prefill, eager and static steps) makes the state's visible mask once for all its full
    KV-cache sites; a routed block running part of the batch takes its rows of it: by an index_select of its view
    (a prompt, or any call with the one-launch row gather off), or, in a one-token step with the gather on, from
    the block's one gather (`DecodeState.row_view_reads`), so its view makes none."""
    made = _count_mask_builds(monkeypatch)
    seen: list[collections.Counter] = []

    @contextlib.contextmanager
    def watch():
        made.clear()
        yield
        seen.append(collections.Counter(made))

    _, om, ids = routed("softmax")
    _ragged_eager_and_static_decode(decode_program(_unrouted("softmax")), ids, None, watch=watch)
    assert seen == [collections.Counter(DecodeState=1)] * 5
    seen.clear()
    skip = torch.tensor([[j % 3 == b for j in range(4)] for b in range(3)])  # every block runs 2 of the 3 rows
    with module_switch(routing_runtime, "FUSED_ROW_GATHER", False):
        _ragged_eager_and_static_decode(decode_program(om), ids, skip, watch=watch)
    assert seen == [collections.Counter(DecodeState=1, RowView=4)] * 5
    seen.clear()
    with module_switch(routing_runtime, "FUSED_ROW_GATHER", True):
        _ragged_eager_and_static_decode(decode_program(om), ids, skip, watch=watch)
    assert seen == [collections.Counter(DecodeState=1, RowView=4)] + [collections.Counter(DecodeState=1)] * 4


def test_a_decode_programs_partly_run_blocks_write_their_rows_into_the_hidden_input_no_one_reads_after():
    """The decode program reads no routed block's hidden input after the block: a block running part of the batch
    writes its rows into it (its residual sum by add_rows_into_, else index_copy_; no copy of the whole hidden state);
    a later reader of it, or of a value it may be, keeps the copy."""
    import operator

    from rewrite.decode.program import DecodeProgram
    from rewrite.routing.graph import hidden_free_after, routed_calls

    _, om, ids = routed("softmax")
    program = decode_program(om)
    assert [c.block.writes_hidden for c in routed_calls(program.graph_module)] == [True] * 4
    skip = torch.tensor([[j % 3 == b for j in range(4)] for b in range(3)])  # every block runs 2 of the 3 rows
    _, seen = _ragged_eager_and_static_decode(program, ids, skip, watch=OpCounts)
    for counts in seen:
        in_place = counts.ops["aten.index_copy_.default"] + counts.ops["rewrite.add_rows_into_.default"]
        assert counts.ops["aten.index_copy.default"] == 0 and in_place >= 4
    fresh = DecodeProgram(om.source, om.plan, dict(om.named_parameters()))  # a program of its own to change
    graph = fresh.graph_module.graph
    calls = routed_calls(fresh.graph_module)
    hidden = calls[2].node.args[3]  # block 1's result, block 2's input
    output = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(output):
        graph.call_function(operator.add, (hidden, 0))  # read after block 2 (dead code counts: it is a reader)
    # blocks 2 and 3 would write into it (block 3's input is block 2's result, which is its input when no row runs)
    assert [hidden_free_after(c) for c in calls] == [True, True, False, False]
