"""Eager linear-attention calls run the ops' implementations without the custom ops (`rewrite.kernels.eager_direct`):
the same outputs and gradients bit for bit as through the ops, and the ops stay wherever a compiler, tracer, tensor
subclass or mode needs them."""

import pytest
import torch
import torch.nn.functional as F

from rewrite.kernels import eager_direct, linear_attention
from rewrite.kernels.linear_attention import op as la_op
from rewrite.kernels.testing import rewrite_ops_called

OPS = ("linear_attention_op", "linear_attention_saving_op", "linear_attention_backward_op",
       "linear_attention_backward_saved_op")

CASES = {
    "vector-packed-h0": dict(decay="vector", heads=4, kv_heads=2, packed=True, initial_state=True),
    "scalar-gqa": dict(decay="scalar", heads=4, kv_heads=1, packed=False, initial_state=False),
    "key-gate": dict(decay="key gate", heads=2, kv_heads=2, packed=False, initial_state=True),
    "none": dict(decay="none", heads=2, kv_heads=2, packed=False, initial_state=False),
}


@pytest.fixture
def direct_on_cpu(monkeypatch):
    """Eager calls on the CPU run direct too (they do only on CUDA by default)."""
    monkeypatch.setattr(eager_direct, "DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(la_op, "SAVE_STATES", True)


def _inputs(decay, heads, kv_heads, packed, initial_state, length=37, dk=8, dv=6):
    batch = 1 if packed else 2
    q = torch.randn(batch, length, heads, dk, dtype=torch.float64)
    k = F.normalize(torch.randn(batch, length, kv_heads, dk, dtype=torch.float64), dim=-1)
    v = torch.randn(batch, length, kv_heads, dv, dtype=torch.float64)
    g = {"vector": F.logsigmoid(torch.randn(batch, length, kv_heads, dk, dtype=torch.float64) + 3),
         "scalar": F.logsigmoid(torch.randn(batch, length, kv_heads, dtype=torch.float64) + 3)}.get(decay)
    cu = torch.tensor([0, 5, 6, length]) if packed else None
    n = 3 if packed else batch
    h0 = torch.randn(n, kv_heads, dk, dv, dtype=torch.float64) if initial_state else None
    kw = {"key_gate_normalizer": 8.0} if decay == "key gate" else {"decay": decay}
    return {"q": q, "k": k, "v": v, "g": g, "initial_state": h0}, cu, kw


def _call(leaves, cu, kw):
    return linear_attention(leaves["q"], leaves["k"], leaves["v"], leaves["g"], initial_state=leaves["initial_state"],
                            cu_seqlens=cu, output_final_state=True, **kw)


def _fwd_bwd(x, cu, kw, used=("o", "final")):
    leaves = {n: t.clone().requires_grad_() for n, t in x.items() if t is not None}
    o, final = _call({**x, **leaves}, cu, kw)
    torch.manual_seed(7)
    do, dht = torch.randn_like(o), torch.randn_like(final)
    loss = sum((t * w).sum() for name, t, w in (("o", o, do), ("final", final, dht)) if name in used)
    return [o, final, *torch.autograd.grad(loss, list(leaves.values()))]


def _refuse_ops(monkeypatch):
    def refused(*args, **kwargs):
        raise AssertionError("a custom op ran on the direct path")

    for name in OPS:
        monkeypatch.setattr(la_op, name, refused)


@pytest.mark.parametrize("used", [("o", "final"), ("o",), ("final",)], ids="+".join)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_direct_call_gives_the_ops_results_bit_for_bit(case, used, direct_on_cpu, monkeypatch):
    """Forward, final state and every gradient (inputs, gates or gated keys, initial state) of an eager call equal
    those through the ops exactly, with none of the ops called; no-grad calls too."""
    torch.manual_seed(0)
    x, cu, kw = _inputs(**case)
    monkeypatch.setattr(la_op, "EAGER_DIRECT", False)
    through_ops = _fwd_bwd(x, cu, kw, used)
    with torch.no_grad():
        ops_inference = _call(x, cu, kw)
    monkeypatch.setattr(la_op, "EAGER_DIRECT", True)
    _refuse_ops(monkeypatch)
    direct = _fwd_bwd(x, cu, kw, used)
    with torch.no_grad():
        direct_inference = _call(x, cu, kw)
    assert len(direct) == len(through_ops)
    for got, want in zip(direct + list(direct_inference), through_ops + list(ops_inference)):
        assert torch.equal(got, want)


def test_compilers_tracers_and_modes_keep_the_ops(direct_on_cpu):
    """torch.compile's graph, make_fx's graph and a dispatch mode see the ops; FakeTensors run their fakes; under
    autocast, a function mode and functorch transforms eager calls are not direct."""
    torch.manual_seed(1)
    x, cu, kw = _inputs(**CASES["vector-packed-h0"])
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    assert eager_direct.runs_direct(*leaves.values(), cu)
    assert rewrite_ops_called(lambda: _call(leaves, cu, kw)[0].sum().backward()) == {
        "rewrite::linear_attention_saving", "rewrite::linear_attention_backward_saved"}

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: _call(dict(zip(x, a)), cu, kw)[0], backend=backend, fullgraph=True)
    compiled(*leaves.values())
    assert any("linear_attention_saving" in str(n.target) for gm in graphs for n in gm.graph.nodes)

    from torch.fx.experimental.proxy_tensor import make_fx

    traced = make_fx(lambda *a: _call(dict(zip(x, a)), cu, kw)[0])(*x.values())
    assert any("rewrite.linear_attention" in str(n.target) for n in traced.graph.nodes)

    from torch._subclasses.fake_tensor import FakeTensorMode

    dense, _, dense_kw = _inputs(**CASES["key-gate"])  # no cu_seqlens: the API reads packed bounds on the host
    with FakeTensorMode() as mode:
        fakes = {n: None if t is None else mode.from_tensor(t.requires_grad_()) for n, t in dense.items()}
        o, final = _call(fakes, None, dense_kw)
    assert o.shape == dense["q"].shape[:-1] + (dense["v"].shape[-1],)
    assert final.shape == dense["initial_state"].shape

    with torch.autocast("cpu"):
        assert not eager_direct.runs_direct(x["q"])
    seen = []
    torch.func.vmap(lambda t: seen.append(eager_direct.runs_direct(t)) or t)(x["q"])
    assert seen == [False]
    assert not eager_direct.runs_direct(torch.nn.Parameter(x["q"]))  # a subclass
    assert eager_direct.runs_direct(x["q"]) and not eager_direct.runs_direct(x["q"], x["q"].to("meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", ["vector-packed-h0", "scalar-gqa", "key-gate"])
def test_cuda_direct_call_gives_the_ops_results_bit_for_bit(case, monkeypatch):
    """On CUDA (the default direct device): the Triton kernels run direct and through the ops give the same bits,
    bfloat16 at a length of several chunks."""
    torch.manual_seed(2)
    x, cu, kw = _inputs(**CASES[case], length=300, dk=64, dv=64)
    x = {n: None if t is None else t.to("cuda", torch.bfloat16 if n != "initial_state" else torch.float32)
         for n, t in x.items()}
    cu = None if cu is None else cu.cuda()
    assert eager_direct.runs_direct(x["q"], cu)
    monkeypatch.setattr(la_op, "EAGER_DIRECT", False)
    through_ops = _fwd_bwd(x, cu, kw)
    monkeypatch.setattr(la_op, "EAGER_DIRECT", True)
    _refuse_ops(monkeypatch)
    for got, want in zip(_fwd_bwd(x, cu, kw), through_ops, strict=True):
        assert torch.equal(got, want)
