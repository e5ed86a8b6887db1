"""Fused gated MLP activations in decode programs (`rewrite.decode.fuse_gated_mlp`): with the switch on, every
layer's `act(gate) * up` (SiLU: Llama, Qwen3, Mistral, Phi-3's chunked gate_up_proj; tanh GELU: Gemma, Gemma3)
is one `rewrite::gated_activation` call, no activation stays, and a prefill plus decode steps give the unfused
program's logits bitwise (on the CPU the op runs PyTorch's activation and mul themselves; the Triton kernel's
rounding is tested in tests/kernel_ops/test_gated_activation.py) and the model's in float32; GPT-NeoX's plain
GELU MLP and near misses are left alone; routed bodies fuse too; the compiled step compiles the product unfused."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from conftest import built_without_and_with, decode_fusion, stepwise_program_logits
from test_decode_fusion import greedy, model_program
from test_decode_norm_fusion import gemma3
from test_decode_rotary_fusion import FAMILIES as ROTARY_FAMILIES
from test_decode_rotary_fusion import LAYERS, token_ids
from torch import nn

import rewrite
from rewrite.analysis.nodes import is_op
from rewrite.capture import capture
from rewrite.decode import decode_program
from rewrite.decode.fuse_gated_mlp import fuse_gated_activations, gated_activations
from rewrite.decode.fusion_switches import fusions_on
from rewrite.routing import skip_controls
from rewrite.routing.graph import routed_calls

transformers = pytest.importorskip("transformers")

aten = torch.ops.aten
FUSED_OP = torch.ops.rewrite.gated_activation.default

FAMILIES = {  # name -> (tiny model, the activation its MLP uses)
    **{name: (ROTARY_FAMILIES[name], "silu") for name in ("llama", "qwen3", "mistral", "phi3")},
    "gemma": (ROTARY_FAMILIES["gemma"], "gelu_tanh"),
    "gemma3": (lambda: gemma3()[0], "gelu_tanh"),
}


pytestmark = pytest.mark.usefixtures("no_grad")


def fusing_gated(on: bool = True):
    return decode_fusion("gated_activation", on)


@functools.cache
def model_and_ids(family: str, dtype: torch.dtype = torch.float32):
    """(model, token ids [2, 9]), built once per test session."""
    builder = FAMILIES[family][0] if family in FAMILIES else ROTARY_FAMILIES[family]
    return builder().to(dtype), token_ids()


@functools.cache
def optimized(family: str, dtype: torch.dtype = torch.float32):
    """(model, optimized module, token ids [2, 9]), built once per test session."""
    model, ids = model_and_ids(family, dtype)
    return model, rewrite.optimize(model, [], example_kwargs={"input_ids": ids}), ids


def calls(gm: fx.GraphModule, *targets) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if is_op(n, *targets)]


def programs(om):
    """(unfused program, fused program) of `om`."""
    return built_without_and_with("gated_activation", decode_program, om)


def model_programs(model):
    """(unfused program, fused program) of `model` optimized by the empty plan (`model_program`)."""
    return built_without_and_with("gated_activation", model_program, model)


# Qwen3's, Mistral's and Gemma3's MLPs are Llama's and Gemma's code (`down(act(gate(x)) * up(x))`, SiLU and tanh GELU):
# Llama and Gemma cover that code path, in float32 and bfloat16; Phi-3 its chunked gate_up_proj.
@pytest.mark.parametrize(
    "family,dtype",
    [*((f, torch.float32) for f in ("llama", "phi3", "gemma")), ("llama", torch.bfloat16), ("gemma", torch.bfloat16)],
    ids=str,
)
def test_every_layers_gated_activation_is_one_call_and_decodes_bitwise_like_the_unfused_program(
    family, dtype
):
    model, ids = model_and_ids(family, dtype)
    plain, fused = model_programs(model)
    kind = FAMILIES[family][1]
    activation = aten.silu if kind == "silu" else aten.gelu
    assert plain.fused_gated_activations == 0 and len(calls(plain.graph_module, activation)) == LAYERS
    assert fused.fused_gated_activations == LAYERS
    fused_calls = calls(fused.graph_module, FUSED_OP)
    assert len(fused_calls) == LAYERS and all(call.args[2] == kind for call in fused_calls)
    assert calls(fused.graph_module, aten.silu, aten.gelu) == []
    if family == "phi3":  # the two halves of gate_up_proj's output, read in place
        assert all(call.args[0].args[0] is call.args[1].args[0] for call in fused_calls)
    got = stepwise_program_logits(fused, ids, 5)
    assert got.dtype == dtype
    assert torch.equal(got, stepwise_program_logits(plain, ids, 5))
    if dtype == torch.float32:
        torch.testing.assert_close(got, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt_neox", "phi"])
def test_non_gated_mlps_are_left_alone(family):
    """GPT-NeoX's `gelu(dense_h_to_4h(x))` and Phi's tanh GELU written out: nothing fused, the same graph."""
    model, _ = model_and_ids(family)
    plain, fused = model_programs(model)
    assert fused.fused_gated_activations == 0 and fused.code == plain.code


def test_compiled_step_compiles_the_activations_unfused():
    _, om, ids = optimized("llama")
    with fusing_gated(True):
        program = decode_program(om)
        assert "gated_activation" in program.graph_module.code
        assert "gated_activation" not in program.compile_source.code and "silu" in program.compile_source.code
        eager = om.generate(ids, max_new_tokens=2, eos_token_id=[])
        compiled = om.generate(ids, max_new_tokens=2, eos_token_id=[], compile_step=True)
    assert torch.equal(compiled, eager)


def test_generate_with_fused_activations_gives_the_full_forwards_tokens():
    model, om, ids = optimized("llama")
    with fusing_gated(True):
        tokens = om.generate(ids, max_new_tokens=3, eos_token_id=[])
        assert decode_program(om).fused_gated_activations == LAYERS
    with fusing_gated(False):
        assert (
            decode_program(om).fused_gated_activations == 0
        )  # the switch is part of the program's cache key
    assert torch.equal(tokens, greedy(model, ids, 3))


def test_with_every_other_fusion_on_the_tokens_are_the_unfused_programs():
    """Sibling projections (gate and up from one matmul), norms and rotary fused as well."""
    model, om, ids = optimized("llama")
    with fusions_on(["projections", "norms", "rotary", "gated_activation"]):
        program = decode_program(om)
        assert program.fused_gated_activations == LAYERS
        tokens = om.generate(ids, max_new_tokens=3, eos_token_id=[])
    assert torch.equal(tokens, greedy(model, ids, 3))


def test_routed_blocks_fuse_their_activations_and_decode_like_the_unfused_program():
    """A layer-skip program: each routed block's body fuses its MLP's activation, the compiled step's source keeps
    every body unfused, and with sequences skipping different blocks the logits equal the unfused program's."""
    model, _, ids = optimized("llama")
    om = rewrite.optimize(
        model, ["attention_normalize", "layer_skip", "stateful"], example_kwargs={"input_ids": ids}
    )
    skip = torch.zeros(ids.shape[0], LAYERS, dtype=torch.bool)
    skip[0, 0] = skip[1, 1] = True
    plain, fused = programs(om)
    assert fused.fused_gated_activations == LAYERS
    bodies = [call.block.body for call in routed_calls(fused.graph_module)]
    assert len(bodies) == LAYERS and all(len(calls(body, FUSED_OP)) == 1 for body in bodies)
    assert all("gated_activation" not in call.block.body.code for call in routed_calls(fused.compile_source))
    with skip_controls(skip_mask=skip):
        got = stepwise_program_logits(fused, ids, 5)
        expected = stepwise_program_logits(plain, ids, 5)
    assert torch.equal(got, expected)


class NearMissMLP(nn.Module):
    """A gated product written a little differently from the fused forms; `form` says how."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.form == "relu":
            return F.relu(gate) * up
        if self.form == "exact_gelu":
            return F.gelu(gate) * up
        if self.form == "broadcast":
            return F.silu(gate) * up[..., :1]
        if self.form == "activation_read_twice":
            act = F.silu(gate)
            return act * up + act
        if self.form == "squared":
            act = F.silu(gate)
            return act * act
        if self.form == "up_first":
            return up * F.gelu(gate, approximate="tanh")
        assert self.form == "silu"
        return F.silu(gate) * up


@pytest.mark.parametrize(
    "form", ["relu", "exact_gelu", "broadcast", "activation_read_twice", "squared", "up_first", "silu"]
)
def test_near_misses_are_left_alone(form):
    """Captured as the decode program is: only act(gate) * up of one shape, the activation read once, is fused."""
    example = (torch.randn(2, 3, 16), torch.randn(2, 3, 16))
    gm = capture(NearMissMLP(form).eval(), example).graph_module
    expected, code = gm(*example), gm.code
    fused = fuse_gated_activations(gm)
    assert torch.equal(gm(*example), expected)
    if form in ("silu", "up_first"):  # the controls: either factor order fuses
        assert (
            fused == 1 and len(calls(gm, FUSED_OP)) == 1 and calls(gm, aten.silu, aten.gelu, aten.mul) == []
        )
    else:
        assert fused == 0 and gated_activations(gm) == [] and gm.code == code
