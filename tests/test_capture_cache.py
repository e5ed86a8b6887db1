"""The capture cache: a model of a structure captured before gets that graph, bound to its own state; anything that
could change the trace (attributes, shapes, aliasing, hooks, state the trace creates) gets a fresh capture."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from conftest import split_example

from examples.models import TARGETS, HandwrittenLM
from rewrite.analysis.mask_probe import CAUSAL_KEY, EXACTLY_CAUSAL_KEY
from rewrite.capture import capture
from rewrite.capture_cache import CAPTURE_CACHE, model_key


@pytest.fixture(autouse=True)
def fresh_cache():
    CAPTURE_CACHE.clear()
    was = CAPTURE_CACHE.enabled
    CAPTURE_CACHE.enabled = True
    yield
    CAPTURE_CACHE.enabled = was
    CAPTURE_CACHE.clear()


def _call(captured, args: tuple, kwargs: dict) -> torch.Tensor:
    return captured.graph_module(*args, **{**captured.injected_kwargs, **kwargs})


def _hits() -> int:
    return CAPTURE_CACHE.hits


class Scaled(nn.Module):
    """A block whose trace depends on a Python attribute (a capture must not be shared across values of it)."""

    def __init__(self, scale: float, causal: bool):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.scale = scale
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x) * self.scale
        return h.cumsum(1) if self.causal else h.sum(1, keepdim=True).expand_as(h)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_a_second_model_of_the_structure_gets_the_graph_bound_to_its_own_weights(name):
    model_a, example = TARGETS[name]()
    args, kwargs = split_example(example)
    capture(model_a, args, kwargs)
    model_b, _ = TARGETS[name]()
    with torch.no_grad():
        for p in model_b.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    before = _hits()
    cached = capture(model_b, args, kwargs)
    assert _hits() == before + 1
    owned = {id(t) for t in [*model_b.parameters(), *model_b.buffers()]}
    assert all(id(p) in owned for p in cached.graph_module.parameters())
    fresh = capture(model_b, args, kwargs, cache=False)
    assert cached.graph_module.code == fresh.graph_module.code
    with torch.no_grad():
        expected = model_b(*args, **{**cached.injected_kwargs, **kwargs})
        got = _call(cached, args, kwargs)
    expected = expected if isinstance(expected, torch.Tensor) else pytree.tree_leaves(expected)[0]
    got = got if isinstance(got, torch.Tensor) else pytree.tree_leaves(got)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_python_attributes_the_code_reads_are_part_of_the_key():
    x = torch.randn(2, 5, 8)
    for scale, causal in [(1.0, True), (2.0, True), (1.0, False)]:
        model = Scaled(scale, causal)
        got = _call(capture(model, (x,), {}), (x,), {})
        torch.testing.assert_close(got, model(x))
    assert _hits() == 0 and len(CAPTURE_CACHE) == 3
    model = Scaled(2.0, True)
    torch.testing.assert_close(_call(capture(model, (x,), {}), (x,), {}), model(x))
    assert _hits() == 1


def test_shapes_dtypes_and_non_tensor_inputs_are_part_of_the_key():
    model = Scaled(1.0, True)
    capture(model, (torch.randn(2, 5, 8),), {})
    capture(model, (torch.randn(1, 5, 8),), {})  # a size-1 dim export specializes
    capture(model.double(), (torch.randn(2, 5, 8, dtype=torch.float64),), {})
    assert _hits() == 0
    capture(Scaled(1.0, True).double(), (torch.randn(2, 5, 8, dtype=torch.float64),), {})
    assert _hits() == 1


def test_weights_shared_between_layers_are_a_different_structure():
    original = HandwrittenLM()
    replaced = HandwrittenLM()
    replaced.blocks[0]["mlp"][2].weight = nn.Parameter(replaced.blocks[1]["mlp"][2].weight.detach().clone())
    shared = HandwrittenLM()
    shared.blocks[0]["mlp"][2].weight = shared.blocks[1]["mlp"][2].weight
    ids = torch.randint(0, 128, (2, 16))
    for model in (original, replaced, shared):
        captured = capture(model, (ids,), {})
        torch.testing.assert_close(_call(captured, (ids,), {}), model(ids))
    assert _hits() == 1  # a replaced weight keeps the structure; one weight in two places does not


def test_values_of_the_example_inputs_are_probed_again_on_a_hit():
    model, example = TARGETS["llama"]()
    args, kwargs = split_example(example)
    padded = {**kwargs, "attention_mask": torch.ones_like(kwargs["input_ids"])}
    padded["attention_mask"][0, :5] = 0  # left padding: causal, but not exactly
    unpadded = {**kwargs, "attention_mask": torch.ones_like(kwargs["input_ids"])}

    def mask_facts(captured):
        return [{k: v for k, v in n.meta.items() if k.startswith("rewrite_mask")}
                for n in captured.graph_module.graph.nodes if CAUSAL_KEY in n.meta]

    first = mask_facts(capture(model, args, padded))
    hit = mask_facts(capture(model, args, unpadded))
    assert _hits() == 1
    assert hit == mask_facts(capture(model, args, unpadded, cache=False))
    assert [facts[EXACTLY_CAUSAL_KEY] for facts in first] == [False]  # what the first example showed ...
    assert [facts[EXACTLY_CAUSAL_KEY] for facts in hit] == [True]  # ... is not carried over
    assert mask_facts(capture(model, args, padded)) == first


def test_models_the_key_cannot_describe_are_not_kept():
    x = torch.randn(2, 5, 8)
    hooked = Scaled(1.0, True)
    hooked.proj.register_forward_hook(lambda module, inputs, out: out * 2)
    assert model_key(hooked, [x], None) is None

    class Opaque:
        __slots__ = ("value",)

    odd = Scaled(1.0, True)
    odd.helper = Opaque()
    assert model_key(odd, [x], None) is None
    big = Scaled(1.0, True)
    big.table = torch.zeros(1 << 17)  # unregistered and too large to take by value
    assert model_key(big, [x], None) is None
    for model in (hooked, odd, big):
        captured = capture(model, (x,), {})
        torch.testing.assert_close(_call(captured, (x,), {}), model(x))
    assert len(CAPTURE_CACHE) == 0


def test_small_unregistered_tensors_join_the_key_by_value():
    x = torch.randn(2, 5, 8)

    class Offset(Scaled):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) + self.offset

    results = []
    for value in (1.0, 2.0, 1.0):
        model = Offset(1.0, True)
        model.offset = torch.full((8,), value)
        results.append(_call(capture(model, (x,), {}), (x,), {}))
        torch.testing.assert_close(results[-1], model(x))
    assert _hits() == 1


def test_a_trace_that_changes_the_model_is_not_kept():
    class Lazy(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not hasattr(self, "calls"):
                self.calls = 0
            return self.proj(x)

    capture(Lazy(), (torch.randn(2, 5, 8),), {})
    assert len(CAPTURE_CACHE) == 0


def test_the_cache_keeps_no_model_alive():
    model = HandwrittenLM()
    ids = torch.randint(0, 128, (2, 16))
    captured = capture(model, (ids,), {})
    assert len(CAPTURE_CACHE) == 1
    alive = weakref.ref(model)
    weight = weakref.ref(model.embed.weight)
    del model, captured
    gc.collect()
    assert alive() is None and weight() is None


def test_switched_off_it_neither_stores_nor_hits():
    x = torch.randn(2, 5, 8)
    CAPTURE_CACHE.enabled = False
    capture(Scaled(1.0, True), (x,), {})
    capture(Scaled(1.0, True), (x,), {})
    assert len(CAPTURE_CACHE) == 0 and _hits() == 0


def test_optimize_on_a_hit_rewrites_and_runs_like_a_fresh_capture():
    """A second model of one structure through the whole pipeline (padding-free attention, verified against the
    model): the rewritten graph and its outputs equal those of the same model optimized with the cache off."""
    import rewrite

    model_a, example = TARGETS["llama"]()
    args, kwargs = split_example(example)
    kwargs = {**kwargs, "attention_mask": torch.ones_like(kwargs["input_ids"])}
    kwargs["attention_mask"][0, :5] = 0
    rewrite.optimize(model_a, ["varlen"], args, example_kwargs=kwargs)
    model_b, _ = TARGETS["llama"]()
    with torch.no_grad():
        for p in model_b.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    before = _hits()
    cached = rewrite.optimize(model_b, ["varlen"], args, example_kwargs=kwargs, verify=True)
    assert _hits() == before + 1
    CAPTURE_CACHE.enabled = False
    fresh = rewrite.optimize(model_b, ["varlen"], args, example_kwargs=kwargs, verify=True)
    assert cached.code == fresh.code
    with torch.no_grad():
        torch.testing.assert_close(cached(*args, **kwargs).logits, fresh(*args, **kwargs).logits, rtol=0, atol=0)


def test_capture_reuse_example_runs_at_tiny_size(capsys):
    from examples import capture_reuse

    first, second = capture_reuse.main(["--target", "llama", "--batch", "2", "--length", "16"])
    out = capsys.readouterr().out
    assert "first checkpoint" in out and "(traced)" in out
    assert "second checkpoint" in out and "(reused the capture)" in out
    assert first.verification.passed and second.verification.passed
    assert first.code == second.code
    assert not any(p is q for p in first.parameters() for q in second.parameters())
