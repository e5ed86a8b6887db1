"""`torch.compile(model, backend="rewrite")`: same passes as `rewrite.optimize`, outputs and gradients as eager."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.fx as fx

import rewrite
from examples import models
from rewrite import compile_backend
from rewrite.analysis import analyze
from rewrite.compile_backend import CompileReport
from rewrite.dynamo_ir import state_name_from_source
from rewrite.passes import PASSES
from rewrite.passes.base import GraphPass, PassContext, PassResult

pytestmark = pytest.mark.filterwarnings("ignore:pass .* matched nothing")
NORMALIZE = {"passes": ["attention_normalize"]}
TOL = {"atol": 1e-5, "rtol": 1e-5}

# name -> (factory, number of attention sites)
CASES: dict[str, tuple[Callable[..., models.Target], int]] = {
    "llama": (models.llama, 2),
    "llama_eager": (lambda **kw: models.llama(attn="eager", **kw), 2),
    "gpt2": (models.gpt2, 2),
    "bert": (models.bert, 2),
    "multihead_attention": (models.multihead_attention, 1),
    "handwritten": (models.handwritten, 2),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _call(model: torch.nn.Module, example: Any) -> tuple[tuple, dict[str, Any]]:
    args, kwargs = (example, {}) if isinstance(example, tuple) else ((), dict(example))
    if getattr(model, "config", None) is not None:
        kwargs["use_cache"] = False
    return args, kwargs


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list):
        return out[0]
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


def _loss(y: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """A random projection of the outputs at real (not padding) positions.

    Padding queries see no key; eager softmax and SDPA give such rows different gradients (the pass
    changes that, not the backend: `rewrite.optimize` does the same), so they are left out.
    """
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(y.shape, generator=g)
    mask = kwargs.get("attention_mask")
    if mask is not None:
        weight = weight * mask.reshape(*mask.shape, *[1] * (y.dim() - mask.dim()))
    return (y * weight).sum() / y.numel()


def _forward_backward(module: Callable[..., Any], model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
    model.zero_grad(set_to_none=True)
    out = _first_tensor(module(*args, **kwargs))
    _loss(out, kwargs).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def _compile(model: torch.nn.Module, plan: Any, reports: list[CompileReport], inductor: bool = False):
    options = {"plan": plan, "inductor": inductor, "on_report": reports.append}
    return torch.compile(model, backend="rewrite", options=options)


def _shorter(args: tuple, kwargs: dict, length: int) -> tuple[tuple, dict]:
    cut = lambda v: v[:, :length].contiguous() if isinstance(v, torch.Tensor) else v  # noqa: E731
    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def _assert_matches_eager(compiled, model, args, kwargs) -> None:
    out, grads = _forward_backward(compiled, model, args, kwargs)
    ref, ref_grads = _forward_backward(model, model, args, kwargs)
    torch.testing.assert_close(out, ref, **TOL)
    assert grads.keys() == ref_grads.keys() and grads
    for name in ref_grads:
        torch.testing.assert_close(
            grads[name], ref_grads[name], **TOL, msg=lambda m, n=name: f"grad of {n}: {m}"
        )


@pytest.mark.parametrize("name", list(CASES))
def test_attention_normalize_matches_eager_and_rewrites_every_site(name: str):
    factory, n_sites = CASES[name]
    model, example = factory()
    args, kwargs = _call(model, example)
    reports: list[CompileReport] = []
    compiled = _compile(model, NORMALIZE, reports)
    _assert_matches_eager(compiled, model, args, kwargs)

    assert len(reports) == 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]
    result = reports[0].pipeline.results[0]
    assert result.name == "attention_normalize"
    assert (result.matched, len(result.changed)) == (n_sites, n_sites), result.messages
    assert len(reports[0].pipeline.lowered) == n_sites
    assert "softmax" not in reports[0].code
    assert reports[0].state_names and all("[" not in s and "'" not in s for s in reports[0].state_names)

    args2, kwargs2 = _shorter(args, kwargs, 11)  # a second shape: Dynamo recompiles with symbolic sizes
    _assert_matches_eager(compiled, model, args2, kwargs2)
    assert len(reports) == 2
    assert reports[1].pipeline.results[0].matched == n_sites
    assert compile_backend.last_reports[-1] is reports[1]


def test_dynamic_true_keeps_sizes_symbolic():
    """`dynamic=True`: the first graph is already symbolic (and BERT's dropout p an unspecialized float)."""
    model, example = models.bert()
    args, kwargs = _call(model, example)
    reports: list[CompileReport] = []
    options = {"plan": NORMALIZE, "inductor": False, "on_report": reports.append}
    compiled = torch.compile(model, backend="rewrite", dynamic=True, options=options)
    _assert_matches_eager(compiled, model, args, kwargs)
    _assert_matches_eager(compiled, model, *_shorter(args, kwargs, 7))
    assert len(reports) == 1 and reports[0].pipeline.results[0].matched == 2
    sdpa = [
        n
        for n in reports[0].graph_module.graph.nodes
        if n.target is torch.ops.aten.scaled_dot_product_attention.default
    ]
    assert len(sdpa) == 2 and all(isinstance(n.args[0].meta["val"].shape[2], torch.SymInt) for n in sdpa)


@pytest.mark.parametrize("name", ["llama", "handwritten"])
def test_empty_plan_matches_eager(name: str):
    model, example = CASES[name][0]()
    args, kwargs = _call(model, example)
    reports: list[CompileReport] = []
    _assert_matches_eager(_compile(model, None, reports), model, args, kwargs)
    assert reports[0].pipeline.results == [] and reports[0].pipeline.lowered == []


def _site_facts(gm: fx.GraphModule) -> list[str]:
    return [s.summary() for s in analyze(gm).sites]


@pytest.mark.parametrize("name", ["llama", "handwritten"])
def test_same_ir_as_optimize(name: str):
    """The backend's normalized graph shows the passes the same sites, with the same facts, as export's."""
    model, example = CASES[name][0]()
    args, kwargs = _call(model, example)
    om = rewrite.optimize(model, {"passes": [], "debug": True}, args, example_kwargs=kwargs)
    exported = om.report.stage("captured").graph
    reports: list[CompileReport] = []
    compiled = _compile(model, {"passes": [], "debug": True}, reports)
    with torch.no_grad():
        compiled(*args, **kwargs)
    dynamo = reports[0].pipeline.stage("captured").graph
    assert _site_facts(fx.GraphModule(reports[0].graph_module, dynamo)) == _site_facts(
        fx.GraphModule(om, exported)
    )
    assert {n.meta.get("state_name") for n in dynamo.nodes if n.op == "placeholder"} - {None} <= {
        name for name, _ in model.named_parameters()
    } | {name for name, _ in model.named_buffers()}


@dataclass
class _GainOptions:
    init: float = 1.0


class _Gain(GraphPass):
    """Test pass: scale every attention output by a new scalar parameter `<attention module>.gain`."""

    name = "test_gain"
    summary = "scale attention outputs by a learned gain"
    Options = _GainOptions

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(self.name)
        for site in ctx.analysis().sites:
            target = ctx.add_parameter(site.module_path, "gain", torch.full((), self.options.init))
            with gm.graph.inserting_after(site.node):
                gain = gm.graph.get_attr(target)
            with gm.graph.inserting_after(gain):
                scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (site.node, gain))
            site.node.replace_all_uses_with(scaled, delete_user_cb=lambda user, s=scaled: user is not s)
            result.matched += 1
            result.added_parameters.append(target)
        return result


@pytest.mark.parametrize("inductor", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_pass_added_parameters_train(monkeypatch, inductor: bool):
    monkeypatch.setitem(PASSES, "test_gain", _Gain)
    model, (x,) = models.handwritten()
    reports: list[CompileReport] = []
    compiled = _compile(
        model, ["attention_normalize", {"test_gain": {"init": 1.0}}], reports, inductor=inductor
    )
    _assert_matches_eager(compiled, model, (x,), {})
    added = reports[0].added_parameters
    assert sorted(added) == ["blocks.0.attn.gain", "blocks.1.attn.gain"]
    assert all(p.grad is not None and p.grad.abs() > 0 for p in added.values())


def test_added_parameters_are_reused_across_recompiles(monkeypatch):
    monkeypatch.setitem(PASSES, "test_gain", _Gain)
    model, (x,) = models.handwritten()
    reports: list[CompileReport] = []
    store: dict[str, torch.nn.Parameter] = {}
    options = {"plan": ["test_gain"], "inductor": False, "on_report": reports.append, "parameters": store}
    compiled = torch.compile(model, backend="rewrite", options=options)
    compiled(x)
    compiled(x[:, :9].contiguous())  # a new shape: Dynamo recompiles, the pass runs again
    assert len(reports) == 2 and sorted(store) == ["blocks.0.attn.gain", "blocks.1.attn.gain"]
    assert all(reports[1].added_parameters[name] is param for name, param in store.items())


def test_bad_plan_raises_plan_error_naming_the_field():
    model = torch.nn.Linear(4, 4)
    plan = {"passes": [{"attention_normalize": {"unfusedd": True}}]}
    compiled = torch.compile(model, backend="rewrite", options={"plan": plan, "inductor": False})
    with pytest.raises(Exception) as info:
        compiled(torch.randn(2, 4))
    inner = getattr(info.value, "inner_exception", None) or info.value.__cause__ or info.value
    assert isinstance(inner, rewrite.PlanError)
    assert inner.field == "passes[0].attention_normalize.unfusedd"


class _VmappedRows(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.vmap(lambda row: row.softmax(-1) * 2)(self.proj(x))


def test_functorch_transform_in_the_graph_is_refused_naming_the_module():
    """torch.vmap (also inside associative_scan, which Hugging Face's Mamba runs under torch.compile) reaches the
    backend as level markers around batched tensors; the retrace into ATen lost them and left fake tensors in the
    graph as constants, which failed on the first call deep inside FakeTensorMode. Now a RewriteError says so."""
    model = torch.nn.Sequential(_VmappedRows())
    compiled = torch.compile(model, backend="rewrite", options={"plan": NORMALIZE, "inductor": False})
    with pytest.raises(Exception) as info:
        compiled(torch.randn(2, 3, 8))
    inner = getattr(info.value, "inner_exception", None) or info.value.__cause__ or info.value
    assert isinstance(inner, rewrite.RewriteError)
    assert "functorch transform (torch.vmap" in str(inner) and "at module '0'" in str(inner)


def test_unknown_backend_option_raises_plan_error():
    compiled = torch.compile(torch.nn.Linear(4, 4), backend="rewrite", options={"inductr": False})
    with pytest.raises(Exception) as info:
        compiled(torch.randn(2, 4))
    assert isinstance(info.value.inner_exception, rewrite.PlanError)
    assert info.value.inner_exception.field == "options.inductr"


@pytest.mark.parametrize(
    "source, name",
    [
        (
            "L['self']._modules['model']._modules['layers']._modules['0']._parameters['weight']",
            "model.layers.0.weight",
        ),
        ("L['self']._modules['rotary_emb']._buffers['inv_freq']", "rotary_emb.inv_freq"),
        ("L['self']._parameters['bias']", "bias"),
        ("G['net']._modules['fc']._parameters['weight']", "net.fc.weight"),
        ("L['kwargs']['input_ids']", None),
        ("L['x'].size()[1]", None),
    ],
)
def test_state_name_from_dynamo_source(source: str, name: str | None):
    assert state_name_from_source(source) == name


def test_entry_point_resolves_without_importing_rewrite():
    code = textwrap.dedent(
        """
        import sys, torch
        assert "rewrite" in torch._dynamo.list_backends(exclude_tags=())
        assert "rewrite" not in sys.modules
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        x = torch.randn(3, 4)
        out = torch.compile(model, backend="rewrite", options={"inductor": False})(x)
        torch.testing.assert_close(out, model(x))
        print("ok", "rewrite.compile_backend" in sys.modules)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok True"


def test_example_runs():
    from examples import compile_backend as example

    report = example.main(["--length", "12"])
    assert report.pipeline.results[0].matched == 2
