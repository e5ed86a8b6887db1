"""Errors say what is wrong and what to do; `verify` names the first node where a rewrite goes wrong."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import split_example

import rewrite
from examples.models import handwritten, llama
from rewrite.analysis.nodes import is_op, module_path
from rewrite.errors import CaptureError, RewriteError, VerificationError
from rewrite.passes import PASSES
from rewrite.passes.base import GraphPass, PassResult
from rewrite.verify import verify

aten = torch.ops.aten


class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if h.sum() > 0:
            return h * 2
        return h - 1


class Box:
    """Not a pytree: torch.export cannot flatten it."""

    def __init__(self, value: torch.Tensor):
        self.value = value


class ReturnsBox(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> Box:
        return Box(x * 2)


def test_data_dependent_control_flow_is_explained() -> None:
    with pytest.raises(CaptureError) as info:
        rewrite.optimize(DataDependent(), None, torch.randn(2, 4))
    message = str(info.value)
    assert "data-dependent" in message
    assert "what to do" in message and "torch.cond" in message
    assert "if h.sum() > 0" in message  # points at the user's line
    assert len(message.splitlines()) < 15
    assert "Traceback" not in message


def test_unsupported_output_type_is_explained() -> None:
    with pytest.raises(CaptureError) as info:
        rewrite.optimize(ReturnsBox(), None, torch.randn(2, 4))
    message = str(info.value)
    assert "Box" in message and "pytree" in message
    assert "what to do" in message
    assert len(message.splitlines()) < 15


class KeywordsThroughKwargs(torch.nn.Module):
    """A forward that takes a flag only through **kwargs, as Hugging Face models take output_hidden_states."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.fc(x) * (2 if kwargs.get("double") else 1)


def test_keyword_through_var_kwargs_is_named() -> None:
    with pytest.raises(CaptureError, match=r"keyword argument\(s\) double reach its forward only through \*\*kwargs"):
        rewrite.optimize(KeywordsThroughKwargs(), None, (torch.randn(2, 4),), example_kwargs={"double": True})


def test_inputs_without_tensors() -> None:
    with pytest.raises(CaptureError, match="hold no tensor"):
        rewrite.optimize(DataDependent(), None, (3, "x"))


def test_optimize_needs_a_module() -> None:
    with pytest.raises(RewriteError, match="takes an nn.Module, got function"):
        rewrite.optimize(lambda x: x, None, torch.randn(2))


def _gelus(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    return [n for n in graph.nodes if is_op(n, aten.gelu.default)]


def test_verify_passes_and_prints_a_table() -> None:
    model, example = handwritten()
    om = rewrite.optimize(model, ["attention_normalize"], example, verify=True)
    report = om.verification
    assert report.passed and report.divergence is None
    (check,) = report.outputs
    assert check.shape == (2, 16, 128) and check.max_abs < 1e-4
    text = str(report)
    assert "PASSED" in text and "max abs" in text and "2x16x128" in text


def test_verify_names_the_node_a_manual_edit_broke() -> None:
    model, example = handwritten()
    om = rewrite.optimize(model, None, example)
    broken = _gelus(om.graph)[1]  # the second block's MLP activation
    broken.target = aten.relu.default
    broken.args = broken.args[:1]
    broken.kwargs = {}
    om.program.recompile()
    report = verify(model, om, example)
    assert not report.passed
    assert report.divergence is not None and report.divergence.beyond_tolerance
    assert report.divergence.node == broken.name
    assert report.divergence.module_path == module_path(broken) == "blocks.1.mlp.1"
    assert report.divergence.new_op == "aten.relu"
    assert broken.name in str(report) and "FAILED" in str(report)
    with pytest.raises(VerificationError, match=broken.name):
        report.raise_if_failed()


class ScaleOneProjection(GraphPass):
    """A buggy pass: multiplies the output of one q projection by 1.01 (inserts a node after it)."""

    name = "buggy_scale"
    summary = "test-only buggy pass"

    @dataclass
    class Options:
        pass

    def run(self, gm, ctx) -> PassResult:
        result = PassResult(self.name)
        site = ctx.analysis().sites[-1]
        target = site.q_projection.node
        with gm.graph.inserting_after(target):
            scaled = gm.graph.call_function(aten.mul.Tensor, (target, 1.01))
        target.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
        scaled.meta = dict(target.meta)
        result.matched = 1
        result.changed.append(target.name)
        return result


def test_verify_through_optimize_names_the_node_a_pass_broke(monkeypatch) -> None:
    monkeypatch.setitem(PASSES, "buggy_scale", ScaleOneProjection)
    model, example = llama()
    args, kwargs = split_example(example)
    with pytest.raises(VerificationError) as info:
        rewrite.optimize(model, ["buggy_scale"], args, example_kwargs=kwargs, verify=True)
    message = str(info.value)
    assert "FAILED" in message and "['logits']" in message
    assert "first divergence" in message
    assert "model.layers.1.self_attn" in message  # the last site's layer
    assert "added by the passes: mul" in message  # the divergence reads the node the pass inserted


def test_verify_reports_shape_mismatch() -> None:
    model, example = handwritten()
    om = rewrite.optimize(model, None, example)
    output = next(n for n in om.graph.nodes if n.op == "output")
    (result,) = output.args[0] if isinstance(output.args[0], tuple | list) else (output.args[0],)
    with om.graph.inserting_before(output):
        sliced = om.graph.call_function(aten.slice.Tensor, (result, 1, 0, 4))
    output.args = (sliced,) if not isinstance(output.args[0], list | tuple) else ([sliced],)
    om.program.recompile()
    report = verify(model, om, example)
    assert not report.passed
    assert "shape (2, 4, 128), expected (2, 16, 128)" in str(report)
