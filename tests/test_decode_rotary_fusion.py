"""Fused rotary position embeddings in decode programs (`rewrite.decode.fuse_rotary`): with the switch on, the
query and key rotations of every layer become one `rewrite::rotary_embedding_pair` call (partial rotary too),
no rotate-half neg / cat stays, and a prefill plus decode steps give the unfused program's logits bitwise (on
the CPU the op runs the decomposed expression itself; the Triton kernel's rounding is tested in
tests/kernel_ops/test_rotary.py); GPT-J's interleaved rotation is left alone; the compiled step compiles the rotations unfused."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.fx as fx
from conftest import decode_fusion, stepwise_program_logits
from test_decode_fusion import greedy, model_program

import rewrite
from examples.models import TARGETS
from rewrite.analysis.nodes import is_op
from rewrite.decode import decode_program
from rewrite.decode.fuse_rotary import fuse_rotary_embeddings, rotations

transformers = pytest.importorskip("transformers")

aten = torch.ops.aten
LAYERS = 2


pytestmark = pytest.mark.usefixtures("no_grad")


def fusing_rotary(on: bool = True):
    return decode_fusion("rotary", on)


def tiny(model_class: str, config_class: str, **config) -> torch.nn.Module:
    """A tiny random-weight Hugging Face causal LM (2 layers, width 64, 4 heads, vocab 128)."""
    torch.manual_seed(0)
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                 vocab_size=128, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(transformers, model_class)(getattr(transformers, config_class)(**{**sizes, **config})).eval()


FAMILIES = {  # name -> tiny model; Phi (half the head rotated) and GPT-NeoX (a quarter) are partial rotary
    "llama": lambda: TARGETS["llama"]()[0],
    "qwen3": lambda: TARGETS["qwen3"]()[0],
    "mistral": lambda: TARGETS["mistral"]()[0],
    "gemma": lambda: tiny("GemmaForCausalLM", "GemmaConfig", num_key_value_heads=2, head_dim=16),
    "phi3": lambda: tiny("Phi3ForCausalLM", "Phi3Config", num_key_value_heads=2),
    "phi": lambda: tiny("PhiForCausalLM", "PhiConfig", num_key_value_heads=2),
    "gpt_neox": lambda: tiny("GPTNeoXForCausalLM", "GPTNeoXConfig"),
}


def token_ids(length: int = 9) -> torch.Tensor:
    return torch.randint(3, 128, (2, length), generator=torch.Generator().manual_seed(0))


@functools.cache
def model_and_ids(family: str, dtype: torch.dtype = torch.float32):
    """(model, token ids [2, 9]), built once per test session."""
    return FAMILIES[family]().to(dtype), token_ids()


@functools.cache
def optimized(family: str, dtype: torch.dtype = torch.float32):
    """(model, optimized module, token ids [2, 9]), built once per test session."""
    model, ids = model_and_ids(family, dtype)
    return model, rewrite.optimize(model, [], example_kwargs={"input_ids": ids}), ids


def calls(gm: fx.GraphModule, *targets) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if is_op(n, *targets)]


def rotate_half_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The `neg` nodes of the graph, and the `cat`s that read one (rotate_half leaves both)."""
    negs = calls(gm, aten.neg)
    return negs + [user for n in negs for user in n.users if is_op(user, aten.cat)]


# Qwen3's, Mistral's and Gemma's apply_rotary_pos_emb are Llama's code (`q * cos + rotate_half(q) * sin` over the whole
# head): Llama covers that path in float32 and bfloat16; Phi-3 the slice-and-concatenate form rotating the whole head,
# Phi (half the head, sliced by the attention) and GPT-NeoX (a quarter, sliced in the function) partial rotary.
@pytest.mark.parametrize("family,dtype", [*((f, torch.float32) for f in ("llama", "phi3", "phi", "gpt_neox")),
                                          ("llama", torch.bfloat16), ("phi", torch.bfloat16)], ids=str)
def test_rotations_fuse_to_one_call_per_layer_and_decode_bitwise_like_the_unfused_program(family, dtype):
    model, ids = model_and_ids(family, dtype)
    with fusing_rotary(False):
        plain = model_program(model)
    with fusing_rotary(True):
        fused = model_program(model)
    assert plain.fused_rotations == 0 and len(rotate_half_nodes(plain.graph_module)) == 2 * 2 * LAYERS
    assert fused.fused_rotations == LAYERS  # query and key of a layer in one call
    assert len(calls(fused.graph_module, torch.ops.rewrite.rotary_embedding_pair)) == LAYERS
    assert calls(fused.graph_module, torch.ops.rewrite.rotary_embedding) == []
    assert rotate_half_nodes(fused.graph_module) == []
    if family in ("phi", "gpt_neox"):  # the pass-through part is still concatenated after the rotation
        pairs = calls(fused.graph_module, torch.ops.rewrite.rotary_embedding_pair)
        head = pairs[0].args[0].meta["val"].shape[-1]
        assert is_op(pairs[0].args[0], aten.slice) and head < model.config.hidden_size // 4
    got = stepwise_program_logits(fused, ids, 5)
    assert got.dtype == dtype
    assert torch.equal(got, stepwise_program_logits(plain, ids, 5))
    if dtype == torch.float32:
        torch.testing.assert_close(got, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_compiled_step_compiles_the_rotations_unfused():
    """compile_step=True with the switch on: Inductor gets the rotations as the model wrote them (it fuses them
    itself), the eager program keeps its fused calls, and the compiled step gives the eager program's tokens."""
    _, om, ids = optimized("llama")
    with fusing_rotary(True):
        program = decode_program(om)
        assert "rotary_embedding" in program.graph_module.code
        assert "rotary_embedding" not in program.compile_source.code and "neg" in program.compile_source.code
        eager = om.generate(ids, max_new_tokens=2, eos_token_id=[])
        compiled = om.generate(ids, max_new_tokens=2, eos_token_id=[], compile_step=True)
    assert torch.equal(compiled, eager)


def test_generate_with_fused_rotations_gives_the_full_forwards_tokens():
    model, om, ids = optimized("llama")
    with fusing_rotary(True):
        tokens = om.generate(ids, max_new_tokens=3, eos_token_id=[])
        assert decode_program(om).fused_rotations == LAYERS
    with fusing_rotary(False):
        assert decode_program(om).fused_rotations == 0  # the switch is part of the program's cache key
    assert torch.equal(tokens, greedy(model, ids, 3))


def test_interleaved_rotation_of_gptj_is_left_alone():
    torch.manual_seed(0)
    config = transformers.GPTJConfig(n_embd=64, n_layer=LAYERS, n_head=4, rotary_dim=8, vocab_size=128,
                                     n_positions=256, bos_token_id=1, eos_token_id=2)
    model = transformers.GPTJForCausalLM(config).eval()
    with fusing_rotary(True):
        program = model_program(model)
    assert program.fused_rotations == 0 and rotations(program.graph_module) == []
    assert calls(program.graph_module, torch.ops.rewrite.rotary_embedding_pair) == []


class Function(torch.nn.Module):
    """A module calling `fn` (for export)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def test_rotations_with_other_readers_or_angles_are_fused_alone_or_left():
    """A rotation whose `x * cos` is read elsewhere is left; rotations by other cos / sin are fused one by one."""

    def rotate(x, cos, sin):
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def f(q, k, v, cos, sin, cos2, sin2):
        leaked = v * cos
        kept = leaked + torch.cat((-v[..., 4:], v[..., :4]), dim=-1) * sin
        return rotate(q, cos, sin), rotate(k, cos2, sin2), kept, leaked

    shapes = [(1, 2, 3, 8)] * 3 + [(1, 1, 3, 8)] * 4
    example = tuple(torch.randn(s) for s in shapes)
    gm = torch.export.export(Function(f), example).module()
    assert len(rotations(gm)) == 2
    want = gm(*example)
    assert fuse_rotary_embeddings(gm) == 2
    assert len(calls(gm, torch.ops.rewrite.rotary_embedding)) == 2
    for got, expected in zip(gm(*example), want, strict=True):
        assert torch.equal(got, expected)
