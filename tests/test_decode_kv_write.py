"""`rewrite.decode.state.FUSED_KV_WRITE` ("kv_write" in `rewrite.decode.fusion_switches`): a decode program built with
it on writes each KV-cache site's new keys and values by one `rewrite::kv_cache_write_` call (full caches, ring caches,
the caches of layer-skip routed blocks) and decodes bitwise like the program without it (on the CPU the op runs the
casts and `index_copy_` itself; the Triton kernel's writes are tested in tests/kernel_ops/test_kv_cache_write.py)."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import OpCounts, decode_fusion, one_decode_step_ops, stepwise_program_logits
from test_decode_fusion import model_program

import rewrite
from rewrite.decode import decode_program, fusion_switches
from rewrite.decode import state as decode_state
from rewrite.routing import skip_controls

transformers = pytest.importorskip("transformers")

WRITE = "rewrite.kv_cache_write_.default"
INDEX_COPY = "aten.index_copy_.default"
LAYERS = 3


pytestmark = pytest.mark.usefixtures("no_grad")


def fused_writes(on: bool = True):
    return decode_fusion("kv_write", on)


def tiny(config_class: str, model_class: str, dtype: torch.dtype = torch.float32, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(
        vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa", **extra)
    return getattr(transformers, model_class)(config).to(dtype).eval()


def token_ids(batch: int = 4, length: int = 9) -> torch.Tensor:
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(1))


@functools.cache
def llama():
    """(tiny float32 Llama, its optimized module, token ids [4, 9]), shared by the tests that only read them; the
    tests run in an order in which each finds the program it asks for first in `decode_program`'s cache where it
    can (it keeps the last program built)."""
    model, ids = tiny("LlamaConfig", "LlamaForCausalLM"), token_ids()
    return model, rewrite.optimize(model, [], example_kwargs={"input_ids": ids}), ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_llama_writes_each_layers_cache_by_one_call_and_decodes_bitwise_like_the_two_index_copies(dtype):
    if dtype == torch.float32:
        _, om, ids = llama()
        with fused_writes(False):
            unfused = decode_program(om)
        with fused_writes():
            fused = decode_program(om)
    else:
        model, ids = tiny("LlamaConfig", "LlamaForCausalLM", dtype), token_ids()
        with fused_writes(False):
            unfused = model_program(model)
        with fused_writes():
            fused = model_program(model)
    assert fused is not unfused and fused.fused_kv_write and not unfused.fused_kv_write
    expected = stepwise_program_logits(unfused, ids, 5)
    with OpCounts() as counts:
        got = stepwise_program_logits(fused, ids, 5)
    assert torch.equal(got, expected)
    steps = 1 + ids.shape[1] - 5  # the prefill and four one-token steps
    assert counts.ops[WRITE] == LAYERS * steps and counts.ops[INDEX_COPY] == 0
    before, after = one_decode_step_ops(unfused, ids, 5), one_decode_step_ops(fused, ids, 5)
    assert (before.ops[INDEX_COPY], before.ops[WRITE]) == (2 * LAYERS, 0)
    assert (after.ops[INDEX_COPY], after.ops[WRITE]) == (0, LAYERS)
    assert sum(after.ops.values()) == sum(before.ops.values()) - LAYERS


def test_kv_writes_are_fused_by_default():
    _, om, ids = llama()
    assert decode_program(om).fused_kv_write and one_decode_step_ops(decode_program(om), ids, 5).ops[WRITE] == LAYERS


def test_compiled_step_writes_as_inductor_compiles_it_and_gives_the_eager_tokens():
    """compile_step=True with the switch on: the compiled step keeps the casts and index_copy_ (Inductor fuses them
    into the kernels making k / v), the eager step the op; both give the same tokens."""
    _, om, ids = llama()
    ids = ids[:2]
    with fused_writes():
        eager = om.generate(ids, max_new_tokens=2, eos_token_id=[])
        compiled = om.generate(ids, max_new_tokens=2, eos_token_id=[], compile_step=True)
    assert torch.equal(compiled, eager)


def test_ring_caches_of_sliding_window_layers_are_written_by_one_call():
    """Mistral with a window of 4: a prompt longer than the window (the ring's last 4 written), then steps that wrap
    the ring; the slots' bookkeeping keeps its own `index_copy_`."""
    model, ids = tiny("MistralConfig", "MistralForCausalLM", sliding_window=4), token_ids(length=11)
    with fused_writes(False):
        unfused = model_program(model)
    with fused_writes():
        fused = model_program(model)
    expected = stepwise_program_logits(unfused, ids, 6)
    with OpCounts() as counts:
        got = stepwise_program_logits(fused, ids, 6)
    assert torch.equal(got, expected)
    steps = 1 + ids.shape[1] - 6
    assert counts.ops[WRITE] == LAYERS * steps
    assert counts.ops[INDEX_COPY] == 2 * LAYERS * steps  # the ring's slot and validity, not keys or values


def spread_skips(batch: int) -> torch.Tensor:
    """Every block runs a different part of the batch (block 2 the whole of it)."""
    skip = torch.zeros(batch, LAYERS, dtype=torch.bool)
    skip[::2, 0] = True
    skip[1:3, 1] = True
    return skip


def test_layer_skip_routed_blocks_write_their_own_caches_by_one_call():
    model, ids = tiny("LlamaConfig", "LlamaForCausalLM"), token_ids()
    om = rewrite.optimize(model, ["attention_normalize", "layer_skip", "stateful"], example_kwargs={"input_ids": ids})
    with fused_writes(False):
        unfused = decode_program(om)
    with fused_writes():
        fused = decode_program(om)
    with skip_controls(skip_mask=spread_skips(ids.shape[0])):
        expected = stepwise_program_logits(unfused, ids, 5)
        with OpCounts() as counts:
            got = stepwise_program_logits(fused, ids, 5)
    assert torch.equal(got, expected)
    steps = 1 + ids.shape[1] - 5
    assert counts.ops[WRITE] == LAYERS * steps  # each block's cache holds its running rows: written as it is
    # no index_copy_ is left: the routed blocks (0 and 1) scatter their rows' residual sums by add_rows_into_
    assert counts.ops[INDEX_COPY] == 0 and counts.ops["rewrite.add_rows_into_.default"] == 2 * steps


def test_the_switch_is_read_when_the_program_is_built():
    """As the other decode fusions: a program built with it on writes by the op after the switch is off again (the
    benchmarks time such programs beside the default one on one state), and `decode_program` rebuilds its cached
    program when the switch changes."""
    _, om, ids = llama()
    with fused_writes(False):
        with fusion_switches.fusions_on(["kv_write"]):
            assert fusion_switches.current()[list(fusion_switches.SWITCHES).index("kv_write")]
            fused = decode_program(om)
        assert not decode_state.FUSED_KV_WRITE and decode_program(om) is not fused
        assert one_decode_step_ops(fused, ids, 5).ops[WRITE] == LAYERS  # the switch off now, the program built with it on
        unfused = decode_program(om)
    with fused_writes():
        assert one_decode_step_ops(unfused, ids, 5).ops[WRITE] == 0  # the switch on now, the program built with it off


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_cuda_graph_decode_with_fused_kv_writes_gives_the_unfused_tokens(family):
    """One launch a layer replayed from a CUDA graph (full caches; Mistral's ring caches wrap), bf16."""
    if family == "llama":
        model = tiny("LlamaConfig", "LlamaForCausalLM", torch.bfloat16)
    else:
        model = tiny("MistralConfig", "MistralForCausalLM", torch.bfloat16, sliding_window=4)
    model, ids = model.cuda(), token_ids().cuda()
    om = rewrite.optimize(model, [], example_kwargs={"input_ids": ids})
    with fused_writes(False):
        expected = om.generate(ids, max_new_tokens=6, eos_token_id=[], cuda_graph="never")
    with fused_writes():
        eager = om.generate(ids, max_new_tokens=6, eos_token_id=[], cuda_graph="never")
        graphed = om.generate(ids, max_new_tokens=6, eos_token_id=[], cuda_graph="always")
    assert torch.equal(eager, expected) and torch.equal(graphed, expected)


def test_generate_example_with_fused_kv_writes_gives_the_unfused_tokens(capsys):
    from examples import generate as example

    assert example.main(["--tiny", "--fusions", "kv_write"]) == 0
    assert "the fused program's tokens equal the unfused program's" in capsys.readouterr().out
    assert decode_state.FUSED_KV_WRITE  # the default put back
