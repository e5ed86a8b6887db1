"""The cost model's formulas against hand-computed numbers."""

import warnings

import pytest
import sympy
import torch
import torch.nn.functional as F
from torch import nn

from rewrite.analysis import BATCH, SEQ
from rewrite.capture import capture
from rewrite.cost_model import COSTS, NodeCost, estimate, register_cost
from rewrite.pipeline import run_pipeline
from rewrite.plan import Plan

B, L = BATCH, SEQ


def _cost(model, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = capture(model.eval(), args, kwargs).graph_module
    return gm, estimate(gm)


def _op_flops(report, gm, op_prefix):
    names = {n.name for n in gm.graph.nodes if str(n.target).startswith(op_prefix)}
    return sympy.expand(sum(c.flops for name, c in report.node_costs.items() if name in names))


def test_one_linear():
    gm, report = _cost(nn.Linear(8, 4), torch.randn(2, 16, 8))
    total = report.total
    assert sympy.expand(total.flops - 2 * B * L * 8 * 4) == 0
    # fp32: read x (8/token), weight 8x4, bias 4; write y (4/token)
    assert sympy.expand(total.bytes - 4 * (B * L * 8 + 32 + 4 + B * L * 4)) == 0
    # backward of the weight needs x
    assert sympy.expand(total.activations - 4 * B * L * 8) == 0
    assert report.evaluate(seq=100, batch=3)["total"]["flops"] == 2 * 3 * 100 * 8 * 4


def test_mlp_bf16_counts_dtype_and_elementwise():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).to(torch.bfloat16)
    gm, report = _cost(model, torch.randn(2, 5, 16, dtype=torch.bfloat16))
    t = report.total
    assert sympy.expand(t.flops - (2 * B * L * 16 * 32 + B * L * 32 + 2 * B * L * 32 * 8)) == 0
    weights = 16 * 32 + 32 + 32 * 8 + 8
    moved = (B * L * 16 + B * L * 32) + (B * L * 32 + B * L * 32) + (B * L * 32 + B * L * 8) + weights
    assert sympy.expand(t.bytes - 2 * moved) == 0
    # saved: x (for linear 1), relu's input, relu's output (for linear 2)
    assert sympy.expand(t.activations - 2 * (B * L * 16 + B * L * 32 + B * L * 32)) == 0


class Attn(nn.Module):
    def __init__(self, causal: bool):
        super().__init__()
        self.causal = causal
        self.q = nn.Linear(32, 32, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 4, 8).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, q, q, is_causal=self.causal)
        return out.transpose(1, 2).reshape(b, t, 32)


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_flops_halved_when_causal(causal):
    gm, report = _cost(Attn(causal), torch.randn(2, 12, 32))
    attn = _op_flops(report, gm, "aten.scaled_dot_product_attention")
    expected = 4 * B * 4 * L * L * 8 // (2 if causal else 1)
    assert sympy.expand(attn - expected) == 0
    # activations: x, q (once, though used three times), output, logsumexp (fp32, B*H*L)
    assert sympy.expand(report.total.activations - 4 * (3 * B * L * 32 + B * 4 * L)) == 0


def test_registered_cost_is_used():
    @torch.library.custom_op("rewrite_test::square_sum", mutates_args=())
    def square_sum(x: torch.Tensor) -> torch.Tensor:
        return (x * x).sum(-1)

    @square_sum.register_fake
    def _(x):
        return x.new_empty(x.shape[:-1])

    class M(nn.Module):
        def forward(self, x):
            return torch.ops.rewrite_test.square_sum(x)

    @register_cost(torch.ops.rewrite_test.square_sum)
    def _square_sum_cost(node, shapes):
        x = node.args[0].meta["val"]
        return NodeCost(flops=2 * shapes.numel(x), bytes=sympy.Integer(7))

    try:
        _, report = _cost(M(), torch.randn(2, 6, 10))
        assert sympy.expand(report.total.flops - 2 * B * L * 10) == 0
        assert report.total.bytes == 7
    finally:
        COSTS.pop(torch.ops.rewrite_test.square_sum, None)


@pytest.fixture(scope="module")
def tiny_llama():
    """(graph after attention_normalize, cost before it, cost after it)."""
    from examples.models import llama

    model, inputs = llama(batch=2, length=16)
    gm, before = _cost(model, **inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_pipeline(gm, Plan.from_data(["attention_normalize"]), lower_ops=False)
    return gm, before, estimate(gm)


def test_tiny_llama_blocks(tiny_llama):
    gm, _, report = tiny_llama
    blocks = [b for b in report.blocks if b.path]
    assert [b.path for b in blocks] == ["model.layers.0", "model.layers.1"]
    # hidden 64, q 64, k/v 32 (2 kv heads of 16), o 64, MLP 3 x 64x128
    per_layer_matmul = 2 * B * L * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128)
    lm_head = 2 * B * L * 64 * 128
    assert sympy.expand(_op_flops(report, gm, "aten.linear") - 2 * per_layer_matmul - lm_head) == 0
    # causal attention (a probed causal mask): 4 * B * H * L^2 * D / 2 with H=4, D=16
    assert sympy.expand(_op_flops(report, gm, "rewrite.attention") - 2 * 4 * B * 4 * L**2 * 16 // 2) == 0
    for block in blocks:
        assert sympy.Poly(block.cost.flops, B, L).coeff_monomial(B * L**2) == 4 * 4 * 16 // 2
    assert report.total.flops.free_symbols <= {B, L}
    assert report.total.bytes.free_symbols <= {B, L}
    values = report.evaluate(seq=1024, batch=1)
    assert values["total"]["flops"] > values["model.layers.0"]["flops"] > 0
    assert values["total"]["activations"] > 0


def test_attention_normalize_keeps_cost(tiny_llama):
    gm, before, after = tiny_llama
    assert any("rewrite.attention" in str(n.target) for n in gm.graph.nodes)
    assert sympy.expand(after.total.flops - before.total.flops) == 0
    assert sympy.expand(after.total.activations - before.total.activations) == 0
