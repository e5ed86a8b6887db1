"""Fused sibling projections in decode programs (`rewrite.decode.fuse_projections`): with the switch on,
q / k / v and gate / up become one projection each in the step graph, and decoding gives the unfused
program's logits and tokens and the full forward's; projections that differ in dtype or in-features,
or already fused ones, are left alone; the concatenated weights follow the model's weights."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.fx as fx
from conftest import decode_fusion, stepwise_program_logits
from torch import nn

import rewrite
from examples.models import TARGETS
from rewrite.decode import decode_program
from rewrite.decode.compiled import CompiledStep
from rewrite.decode.fuse_projections import (
    BUFFER_PREFIX,
    fuse_sibling_projections,
    linear_nodes,
    sibling_groups,
)
from rewrite.decode.program import DecodeProgram
from rewrite.errors import RewriteError
from rewrite.plan import Plan

transformers = pytest.importorskip("transformers")

ATOL, RTOL = 1e-5, 1e-5


pytestmark = pytest.mark.usefixtures("no_grad")


def fusing(on: bool = True):
    return decode_fusion("projections", on)


def phi3(batch: int = 2, length: int = 16):
    """Hugging Face Phi-3 (q / k / v in one `qkv_proj`, gate / up in one `gate_up_proj`), tiny."""
    torch.manual_seed(0)
    config = transformers.Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.Phi3ForCausalLM(config).eval()
    return model, {"input_ids": torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(0))}


class SiblingsLM(nn.Module):
    """A causal LM whose siblings mix the cases: q with a bias next to k / v without (linear), gate and up
    as `addmm` / `mm` by [in, out] weights, and two projections of the residual stream that read other
    tensors (half of it: other in-features; a float64 copy: other dtype)."""

    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.w_gate = nn.Parameter(torch.randn(dim, 2 * dim) / dim**0.5)
        self.b_gate = nn.Parameter(torch.randn(2 * dim) * 0.1)
        self.w_up = nn.Parameter(torch.randn(dim, 2 * dim) / dim**0.5)
        self.w_down = nn.Parameter(torch.randn(2 * dim, dim) / dim**0.5)
        self.narrow = nn.Linear(dim // 2, dim)
        self.wide = nn.Linear(dim, dim).double()
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        x = self.embed(ids)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (self.q(x), self.k(x), self.v(x)))
        o = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = x + o.transpose(1, 2).reshape(b, t, -1)
        flat = h.reshape(b * t, -1)
        gated = nn.functional.silu(torch.addmm(self.b_gate, flat, self.w_gate)) * torch.mm(flat, self.w_up)
        h = h + torch.mm(gated, self.w_down).view(b, t, -1)
        h = h + self.narrow(h[..., : h.shape[-1] // 2]) + self.wide(h.double()).float()
        return self.head(h)


def siblings(batch: int = 2, length: int = 12):
    torch.manual_seed(0)
    return SiblingsLM().eval(), {"ids": torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(1))}


BUILDERS = {"llama": TARGETS["llama"], "qwen2": TARGETS["qwen2"], "phi3": phi3, "siblings": siblings}
PLANS = {"softmax": [], "gla": [{"mixer": {"kind": "gla"}}]}


def build(family: str, plan: str):
    """(original model, optimized module, token ids [2, L]) built afresh."""
    model, inputs = BUILDERS[family]()
    ids = inputs["input_ids"] if "input_ids" in inputs else inputs["ids"]
    if family == "siblings":
        return model, rewrite.optimize(model, PLANS[plan], (ids,)), ids
    return model, rewrite.optimize(model, PLANS[plan], example_kwargs={"input_ids": ids}), ids


@functools.cache
def built(family: str, plan: str):
    return build(family, plan)


def full_logits(module, ids: torch.Tensor) -> torch.Tensor:
    base = getattr(module, "source", None) or module
    out = module(input_ids=ids) if hasattr(base, "config") else module(ids)
    return out.logits if hasattr(out, "logits") else out


def stepwise(program: DecodeProgram, ids: torch.Tensor, prefill: int = 5) -> torch.Tensor:
    """Logits of a prefill of `prefill` tokens, then one decode step per remaining token."""
    return stepwise_program_logits(program, ids, prefill)


def model_program(model: nn.Module) -> DecodeProgram:
    """The decode program of `model` under the fusion switches now: what `decode_program(rewrite.optimize(model, [],
    ...))` builds (the same source, empty plan and parameters), without capturing the model's forward first."""
    return DecodeProgram(model, Plan.from_data([]), dict(model.named_parameters()))


def greedy(module, ids: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy continuation by re-running the full forward on the whole sequence at every step."""
    for _ in range(new):
        ids = torch.cat([ids, full_logits(module, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def fused_weight_nodes(program: DecodeProgram) -> list[fx.Node]:
    return [n for n in program.graph_module.graph.nodes
            if n.op == "get_attr" and str(n.target).startswith(BUFFER_PREFIX) and str(n.target).endswith("_weight")]


def llama_groups(model) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(concatenated weight, concatenated bias or None) of q / k / v and gate / up of every layer, in graph order,
    from the model's modules."""
    out = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
        bias = torch.cat([p.bias for p in qkv]) if attn.q_proj.bias is not None else None
        out.append((torch.cat([p.weight for p in qkv]), bias))
        out.append((torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), None))
    return out


CASES = [  # (family, plan, linear nodes unfused, fused)
    ("llama", "softmax", 15, 9), ("llama", "gla", 15, 9), ("qwen2", "softmax", 15, 9), ("phi3", "softmax", 9, 9),
    ("siblings", "softmax", 9, 6),
]


@pytest.mark.parametrize("family,plan,before,after", CASES)
def test_fused_step_graph_has_fewer_projections_and_decodes_like_the_unfused_program(family, plan, before, after):
    model, om, ids = built(family, plan)
    # each program generates right after it is built, while `decode_program` still holds it
    with fusing(False):
        plain = decode_program(om)
        plain_tokens = om.generate(ids, max_new_tokens=4, eos_token_id=[])
    with fusing(True):
        fused = decode_program(om)
        tokens = om.generate(ids, max_new_tokens=4, eos_token_id=[])
    assert plain.fused is None and fused.fused is not None
    assert len(linear_nodes(plain.graph_module)) == before
    assert len(linear_nodes(fused.graph_module)) == after
    groups = fused.fused.groups
    weights = fused_weight_nodes(fused)
    assert len(weights) == len(groups)  # one concatenated weight per group, read by one projection
    assert all(len(w.users) == 1 for w in weights)
    buffers = dict(fused.graph_module.named_buffers())
    if family in ("llama", "qwen2"):
        expected = llama_groups(model)
        assert len(groups) == len(expected) == 4 and [len(g) for g in groups] == [3, 2, 3, 2]
        for i, (weight, bias) in enumerate(expected):
            assert torch.equal(buffers[f"{BUFFER_PREFIX}_{i}_weight"], weight)
            assert (f"{BUFFER_PREFIX}_{i}_bias" in buffers) == (bias is not None)
            if bias is not None:
                assert torch.equal(buffers[f"{BUFFER_PREFIX}_{i}_bias"], bias)
    if family == "phi3":  # q / k / v and gate / up are one projection each already: left as they are
        assert groups == [] and BUFFER_PREFIX not in fused.code and fused.code == plain.code
    if family == "siblings":  # q / k / v (only q has a bias) and gate / up; `narrow` and `wide` alone
        assert [len(g) for g in groups] == [3, 2]
        zeros = torch.zeros(32)
        assert torch.equal(buffers[f"{BUFFER_PREFIX}_0_weight"], torch.cat([model.q.weight, model.k.weight,
                                                                            model.v.weight]))
        assert torch.equal(buffers[f"{BUFFER_PREFIX}_0_bias"], torch.cat([model.q.bias, zeros, zeros]))
        assert torch.equal(buffers[f"{BUFFER_PREFIX}_1_weight"], torch.cat([model.w_gate, model.w_up], dim=1))
        assert torch.equal(buffers[f"{BUFFER_PREFIX}_1_bias"], torch.cat([model.b_gate, torch.zeros(64)]))
        kept = {str(n.args[1].target) for n in linear_nodes(fused.graph_module) if n.args[1].op == "get_attr"}
        assert {"narrow.weight", "wide.weight", "head.weight", "w_down"} <= kept

    reference = full_logits(model if plan == "softmax" else om, ids)  # the original itself for softmax
    got = stepwise(fused, ids)
    torch.testing.assert_close(got, stepwise(plain, ids), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got, reference, atol=ATOL, rtol=RTOL)
    assert torch.equal(tokens, plain_tokens)
    assert torch.equal(tokens, greedy(model if plan == "softmax" else om, ids, 4))


def test_sibling_projections_of_another_dtype_or_in_features_are_left_alone():
    """On one input, only projections by weights of the same in-features and dtype are grouped."""

    class Weights(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.randn(4, 8))
            self.b = nn.Parameter(torch.randn(4, 8, dtype=torch.float64))  # other dtype
            self.c = nn.Parameter(torch.randn(4, 6))  # other in-features
            self.d = nn.Parameter(torch.randn(5, 8))

    graph = fx.Graph()
    x = graph.placeholder("x")
    outs = [graph.call_function(torch.ops.aten.linear.default, (x, graph.get_attr(name))) for name in "abcd"]
    graph.output(tuple(outs))
    gm = fx.GraphModule(Weights(), graph)
    groups = sibling_groups(gm)
    assert [[p.node.name for p in g] for g in groups] == [[outs[0].name, outs[3].name]]

    graph = fx.Graph()
    x = graph.placeholder("x")
    outs = [graph.call_function(torch.ops.aten.linear.default, (x, graph.get_attr(name))) for name in "abc"]
    graph.output(tuple(outs))
    gm = fx.GraphModule(Weights(), graph)
    code = gm.code
    assert sibling_groups(gm) == [] and fuse_sibling_projections(gm).groups == [] and gm.code == code


def test_compiled_fused_step_gives_the_unfused_logits_and_tokens():
    """The fused program compiled by Inductor (static step): the unfused eager program's logits and tokens."""
    _, om, ids = built("llama", "gla")
    with fusing(True):  # the program the llama-gla case built last
        fused = decode_program(om)
        compiled_tokens = om.generate(ids, max_new_tokens=4, eos_token_id=[], compile_step=True)
    with fusing(False):
        plain = decode_program(om)
        assert torch.equal(compiled_tokens, om.generate(ids, max_new_tokens=4, eos_token_id=[]))
    outs = {}
    for name, program in (("plain", plain), ("fused", fused)):
        state = program.new_state(2, 12)
        state.begin(6)
        program(ids[:, :6], torch.arange(6).expand(2, -1), state)
        state.advance()
        state.start_static()
        step = CompiledStep(program, state) if name == "fused" else (lambda i, p, s=state, pr=program: pr(i, p, s))
        logits = []
        for t in range(6, 10):
            state.begin(1)
            logits.append(step(ids[:, t : t + 1], torch.full((2, 1), t)).clone())
            state.advance()
        outs[name] = torch.cat(logits, 1)
    torch.testing.assert_close(outs["fused"], outs["plain"], atol=ATOL, rtol=RTOL)


def test_fused_weights_follow_the_models_weights():
    """Weights changed in place (version counter), given new storage (`.data =`), or written through `.data`
    (seen at the next state's first call): the fused program gives the unfused program's logits; a weight of
    another shape is refused."""
    model, om, ids = build("llama", "gla")
    with fusing(False):
        plain = decode_program(om)
    with fusing(True):
        fused = decode_program(om)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[1].mlp
    states = {}
    for name, program in (("plain", plain), ("fused", fused)):
        states[name] = program.new_state(2, 12)
        states[name].begin(6)
        program(ids[:, :6], torch.arange(6).expand(2, -1), states[name])
        states[name].advance()

    def step(t: int) -> dict[str, torch.Tensor]:
        out = {}
        for name, program in (("plain", plain), ("fused", fused)):
            states[name].begin(1)
            out[name] = program(ids[:, t : t + 1], torch.full((2, 1), t), states[name])
            states[name].advance()
        torch.testing.assert_close(out["fused"], out["plain"], atol=ATOL, rtol=RTOL)
        return out

    before = step(6)
    attn.k_proj.weight.mul_(3.0)  # in place: load_state_dict, optimizer steps and copy_ do the same
    mlp.up_proj.weight.add_(0.05)
    changed = step(7)
    assert not torch.allclose(changed["fused"], before["fused"], atol=1e-2)
    attn.q_proj.weight.data = torch.randn_like(attn.q_proj.weight) * 0.2  # other storage
    step(8)

    attn.v_proj.weight.data.mul_(2.0)  # bypasses the version counter: seen from the next state's first call
    torch.testing.assert_close(stepwise(fused, ids), stepwise(plain, ids), atol=ATOL, rtol=RTOL)
    with fusing(True):
        tokens = om.generate(ids, max_new_tokens=3, eos_token_id=[])
    with fusing(False):
        assert torch.equal(tokens, om.generate(ids, max_new_tokens=3, eos_token_id=[]))

    mlp.gate_proj.weight.data = torch.randn(mlp.gate_proj.weight.shape[0] + 1, mlp.gate_proj.weight.shape[1])
    with pytest.raises(RewriteError, match="decode program must be built again"):
        stepwise(fused, ids)
