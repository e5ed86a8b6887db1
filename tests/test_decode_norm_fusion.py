"""Fused RMSNorms in decode programs (`rewrite.decode.fuse_norms`): with the switch on, every Hugging Face
RMSNorm of the step graph (2 per layer and the final one; Gemma3's 4 per layer; the q / k norms of Qwen3,
Gemma3 and OLMo2) is one `rewrite::rms_norm_cast` call with the family's cast order, or one
`rewrite::add_rms_norm_cast` call where the norm reads a residual add, and the program gives the unfused
program's logits (float32: within 1e-5; on the CPU they are in fact equal, bfloat16 too);
LayerNorms and near-miss norms are left as they are; the compiled step compiles the norms unfused."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.fx as fx
from conftest import built_without_and_with, decode_fusion, module_switch, stepwise_program_logits
from test_decode_fusion import model_program, phi3
from test_unfamiliar_families import olmo2
from torch import nn

import rewrite
from examples.models import TARGETS
from rewrite.capture import capture
from rewrite.decode import decode_program, fuse_rotary
from rewrite.decode.fuse_norms import fuse_rms_norms, fused_residual_adds, rms_norm_matches
from rewrite.routing import skip_controls
from rewrite.routing.graph import routed_calls

transformers = pytest.importorskip("transformers")

aten = torch.ops.aten
FUSED_OP = torch.ops.rewrite.rms_norm_cast.default
FUSED_ADD_OP = torch.ops.rewrite.add_rms_norm_cast.default
ATOL, RTOL = 1e-5, 1e-5


pytestmark = pytest.mark.usefixtures("no_grad")


def fusing_norms(on: bool = True):
    return decode_fusion("norms", on)


def gemma3(batch: int = 2, length: int = 16):
    """Hugging Face Gemma3 text decoder (4 norms per layer, q / k norms over the head dim, offset weights), tiny."""
    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                           vocab_size=128, max_position_embeddings=256, sliding_window=8)
    ids = torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(0))
    return transformers.Gemma3ForCausalLM(config).eval(), {"input_ids": ids}


def olmo2_target(batch: int = 2, length: int = 16):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = olmo2().eval()
    return model, {"input_ids": torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(0))}


BUILDERS = {"llama": TARGETS["llama"], "qwen3": TARGETS["qwen3"], "phi3": phi3,
            "gemma3": gemma3, "olmo2": olmo2_target, "gpt2": TARGETS["gpt2"]}


@functools.cache
def model_and_ids(family: str, dtype: torch.dtype = torch.float32):
    """(model, token ids [2, 16]); norm weights drawn around their neutral value, so that a wrong weight, offset or
    cast order shows in the logits."""
    model, inputs = BUILDERS[family]()
    model = model.to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.2
                        + (0.0 if family == "gemma3" else 1.0))
    return model, inputs["input_ids"]


@functools.cache
def built(family: str, dtype: torch.dtype = torch.float32):
    """(model, optimized module, token ids [2, 16]) of `model_and_ids`."""
    model, ids = model_and_ids(family, dtype)
    return model, rewrite.optimize(model, [], example_kwargs={"input_ids": ids}), ids


def programs(om):
    """(unfused program, fused program) of `om`."""
    return built_without_and_with("norms", decode_program, om)


def model_programs(family: str, dtype: torch.dtype = torch.float32):
    """(model, unfused program, fused program, token ids) of `model_and_ids(family, dtype)`: float32 Llama's of its
    optimized module (`built`), shared with the compiled-step test (`decode_program` keeps the fused one, built
    last), the others' built from the model by the empty plan (`model_program`)."""
    if (family, dtype) == ("llama", torch.float32):
        model, om, ids = built(family, dtype)
        return model, *programs(om), ids
    model, ids = model_and_ids(family, dtype)
    with fusing_norms(False):
        plain = model_program(model)
    with fusing_norms(True):
        fused = model_program(model)
    return model, plain, fused, ids


def calls(program) -> list[fx.Node]:
    """The fused norm calls of the program, with or without their residual add."""
    return [n for n in program.graph_module.graph.nodes if n.op == "call_function" and n.target in (FUSED_OP,
                                                                                                   FUSED_ADD_OP)]


def norm_arguments(call: fx.Node) -> tuple:
    """(weight, eps, weight offset, rounds normed rows first, out dtype) of a fused norm call."""
    return call.args[-5:]


def norm_value(call: fx.Node) -> torch.Tensor:
    """The example value of the norm a fused call computes."""
    val = call.meta["val"]
    return val[1] if call.target is FUSED_ADD_OP else val


def count(program, target) -> int:
    return sum(1 for n in program.graph_module.graph.nodes if n.op == "call_function" and n.target is target)


# Norms that read a residual add, in these 2-layer models: Llama / Qwen3 / Phi-3 (pre-norms) every norm but the
# first layer's input norm (it reads the embedding), 2 * 2 + 1 - 1 = 4, the q / k norms read projections; Gemma3
# the pre-feedforward norms, layer 1's input norm and the final norm, 4 (its post-norms read a block's output, layer
# 0's input norm the scaled embedding); OLMo2 (post-norms only) the final norm alone.
CASES = [  # (family, dtype, norms, norms with their residual add, (weight offset, rounds normed rows first))
    ("llama", torch.float32, 5, 4, (0.0, True)),
    ("llama", torch.bfloat16, 5, 4, (0.0, True)),
    ("qwen3", torch.float32, 2 * 4 + 1, 4, (0.0, True)),
    ("phi3", torch.float32, 5, 4, (0.0, True)),
    ("gemma3", torch.float32, 2 * 6 + 1, 4, (1.0, False)),
    ("gemma3", torch.bfloat16, 2 * 6 + 1, 4, (1.0, False)),
    ("olmo2", torch.bfloat16, 2 * 4 + 1, 1, (0.0, False)),
]


def feeds_a_norm(add: fx.Node) -> bool:
    """Whether an `aten.add` node is read by a fused norm call as its input."""
    return any(u.op == "call_function" and u.target is FUSED_OP and u.args[0] is add for u in add.users)


@pytest.mark.parametrize("family,dtype,norms,adds,variant", CASES,
                         ids=[f"{c[0]}-{str(c[1])[6:]}" for c in CASES])
def test_every_norm_becomes_one_call_and_decodes_like_the_unfused_program(family, dtype, norms, adds, variant):
    model, plain, fused, ids = model_programs(family, dtype)
    assert plain.fused_norms == 0 and fused.fused_norms == norms
    assert count(plain, aten.rsqrt.default) == norms
    assert count(fused, aten.rsqrt.default) == 0 and count(fused, aten.pow.Tensor_Scalar) == 0
    found = calls(fused)
    assert len(found) == norms
    assert fused_residual_adds(fused.graph_module) == count(fused, FUSED_ADD_OP) == adds
    offset_adds = norms if variant[0] else 0  # Gemma's `1.0 + weight.float()`
    assert count(plain, aten.add.Tensor) - count(fused, aten.add.Tensor) == norms + offset_adds + adds  # + eps
    assert not any(feeds_a_norm(n) for n in fused.graph_module.graph.nodes if n.target is aten.add.Tensor)
    assert {tuple(norm_arguments(n)[2:4]) for n in found} == {variant}
    assert all(norm_arguments(n)[4] == dtype and norm_value(n).dtype == dtype for n in found)
    state = dict(fused.graph_module.named_parameters())
    weights = [str(norm_arguments(n)[0].target) for n in found]
    assert len(set(weights)) == norms and all("norm" in w and w in state for w in weights)

    got = stepwise_program_logits(fused, ids, 5)
    expected = stepwise_program_logits(plain, ids, 5)
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(got, model(input_ids=ids, use_cache=False).logits, atol=ATOL, rtol=RTOL)
    else:  # the CPU implementation of the op is the decomposed norm itself
        assert torch.equal(got, expected)


def test_layer_norms_are_left_alone():
    """GPT-2's LayerNorms: nothing fused, the same graph."""
    _, plain, fused, ids = model_programs("gpt2")
    assert fused.fused_norms == 0 and fused.code == plain.code
    torch.testing.assert_close(stepwise_program_logits(fused, ids, 5), stepwise_program_logits(plain, ids, 5))


class NearMissNorm(nn.Module):
    """An RMSNorm written a little differently from every Hugging Face family's; `form` says how."""

    def __init__(self, form: str, dim: int = 16):
        super().__init__()
        self.form = form
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "no_float_cast":
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        xf = x.to(torch.float32)
        if self.form == "eps_clamped":
            return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).clamp_min(1e-6))).to(x.dtype)
        variance = xf.pow(2).mean(-1, keepdim=True)
        normed = xf * torch.rsqrt(variance + 1e-6)
        if self.form == "normed_read_twice":
            return self.weight * normed.to(x.dtype) + normed.to(x.dtype)
        if self.form == "variance_read_twice":
            return self.weight * normed.to(x.dtype) + variance
        if self.form == "weight_cast_to_x":  # T5-style: the weight's dtype decides the cast
            return (self.weight.to(x.dtype) * normed).to(torch.float16)
        if self.form == "non_state_weight":
            return x.new_ones(x.shape[-1]) * normed.to(x.dtype)
        assert self.form == "llama"
        return self.weight * normed.to(x.dtype)


@pytest.mark.parametrize("form", ["no_float_cast", "eps_clamped", "normed_read_twice", "variance_read_twice",
                                  "weight_cast_to_x", "non_state_weight", "llama"])
def test_near_miss_norms_are_left_alone(form):
    """Captured as the decode program is: only the exact Hugging Face chain is fused."""
    gm = capture(NearMissNorm(form).eval(), (torch.randn(2, 3, 16),)).graph_module
    x = torch.randn(2, 5, 16)
    expected, code = gm(x), gm.code
    fused = fuse_rms_norms(gm)
    torch.testing.assert_close(gm(x), expected, atol=ATOL, rtol=RTOL)
    if form == "llama":  # the control: the same capture path does fuse the exact chain
        assert fused == 1 and "rms_norm_cast" in gm.code and "rsqrt" not in gm.code
    else:
        assert fused == 0 and rms_norm_matches(gm) == [] and gm.code == code


def test_compiled_step_compiles_the_norms_unfused():
    """`compile_step=True` (Inductor, fullgraph) with the switch on: Inductor gets the norms as the model wrote
    them (it fuses them with their neighbours itself), the eager program keeps its fused calls, and the tokens
    are the unfused program's."""
    _, om, ids = built("llama")
    with fusing_norms(True):
        program = decode_program(om)
        assert program.fused_norms == 5 and "rms_norm_cast" in program.graph_module.code
        assert "add_rms_norm_cast" not in program.compile_source.code
        assert "rms_norm_cast" not in program.compile_source.code and "rsqrt" in program.compile_source.code
        compiled = om.generate(ids, max_new_tokens=3, eos_token_id=[], compile_step=True)
    with fusing_norms(False):
        assert torch.equal(compiled, om.generate(ids, max_new_tokens=3, eos_token_id=[]))


def test_norm_weights_kept_in_float32_give_the_promoted_dtype():
    """A Llama-style norm on bfloat16 activations with a float32 weight returns float32, as the model does."""
    module = NearMissNorm("llama").eval()
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    gm = capture(module, (x,)).graph_module
    expected = gm(x)
    assert fuse_rms_norms(gm) == 1
    (call,) = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is FUSED_OP]
    assert call.args[3:] == (0.0, True, torch.float32)
    got = gm(x)
    assert got.dtype == expected.dtype == torch.float32 and torch.equal(got, expected)


def test_routed_blocks_fuse_their_norms_and_rotations_and_decode_like_the_unfused_program():
    """A layer-skip program: the norms and rotations inside each routed block's body are fused too (the body takes
    the norm weights as inputs), the compiled step's source keeps every body unfused, and with sequences skipping
    different blocks the fused program's logits equal the unfused program's."""
    model, _, ids = built("llama")
    om = rewrite.optimize(model, ["attention_normalize", "layer_skip", "stateful"], example_kwargs={"input_ids": ids})
    layers = model.config.num_hidden_layers
    skip = torch.zeros(ids.shape[0], layers, dtype=torch.bool)
    skip[0, 0] = skip[1, 1] = True  # each block runs part of the batch
    with fusing_norms(False), module_switch(fuse_rotary, "FUSE_ROTARY", False):
        plain = decode_program(om)
    with fusing_norms(True), module_switch(fuse_rotary, "FUSE_ROTARY", True):
        fused = decode_program(om)
    assert fused.fused_norms == 2 * layers + 1 and fused.fused_rotations == layers
    # in each body (one layer) the post-attention norm reads the body's residual add; the input norms read the body
    # input and the final norm a routed block's output
    body_adds = [fused_residual_adds(call.block.body) for call in routed_calls(fused.graph_module)]
    assert body_adds == [1] * layers and fused_residual_adds(fused.graph_module) == 0
    bodies = [call.block.body.code for call in routed_calls(fused.graph_module)]
    assert len(bodies) == layers
    assert all("rms_norm_cast" in code and "rotary_embedding_pair" in code and "rsqrt" not in code for code in bodies)
    compiled_bodies = [call.block.body.code for call in routed_calls(fused.compile_source)]
    assert all("rms_norm_cast" not in code and "rotary_embedding" not in code for code in compiled_bodies)
    with skip_controls(skip_mask=skip):
        got = stepwise_program_logits(fused, ids, 5)
        expected = stepwise_program_logits(plain, ids, 5)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
