"""`rewrite.routing.runtime.FUSED_ROW_GATHER`: a partly run routed block gathers its hidden state and its inputs by
one `rewrite::gather_rows` call, and gives what the per-tensor gathers give (decode programs, training);
`FUSED_ROW_SCATTER`: in a decode program it writes its residual sum into its rows by one `rewrite::add_rows_into_`
call, giving what the add and `index_copy_` give."""

from __future__ import annotations

import pytest
import torch
from conftest import OpCounts, module_switch, one_decode_step_ops, stepwise_program_logits
from torch.fx.experimental.proxy_tensor import make_fx

import rewrite
import rewrite.routing.runtime as routing_runtime
from rewrite.decode import decode_program
from rewrite.routing import skip_controls
from rewrite.routing.runtime import InputRule, RoutedBlock

transformers = pytest.importorskip("transformers")

LAYERS = 3


def tiny_llama() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=LAYERS,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval(), torch.randint(0, 96, (4, 9))


def spread_skips(batch: int) -> torch.Tensor:
    """Every block runs a different part of the batch (block 2 the whole of it)."""
    skip = torch.zeros(batch, LAYERS, dtype=torch.bool)
    skip[::2, 0] = True
    skip[1:3, 1] = True
    return skip


def routed_llama_program() -> tuple[object, torch.Tensor]:
    """The decode program of the tiny Llama with every block routed, and its token ids."""
    model, ids = tiny_llama()
    om = rewrite.optimize(model, ["attention_normalize", "layer_skip", "stateful"], example_kwargs={"input_ids": ids})
    return decode_program(om), ids


def test_decode_program_with_one_gather_launch_a_block_decodes_like_the_per_tensor_gathers():
    program, ids = routed_llama_program()
    with torch.no_grad(), skip_controls(skip_mask=spread_skips(ids.shape[0])):
        with module_switch(routing_runtime, "FUSED_ROW_GATHER", False):
            expected = stepwise_program_logits(program, ids, 5)
        with module_switch(routing_runtime, "FUSED_ROW_GATHER", True), OpCounts() as counts:
            got = stepwise_program_logits(program, ids, 5)
    assert torch.equal(got, expected)
    steps = 1 + ids.shape[1] - 5  # the prefill and four one-token steps
    # blocks 0 and 1 run part of the batch: one call each a step; block 2 runs all rows (no gather)
    assert counts.ops["rewrite.gather_rows.default"] == 2 * steps


def test_decode_program_with_the_fused_scatter_decodes_like_the_add_and_the_index_copy():
    program, ids = routed_llama_program()
    with torch.no_grad(), skip_controls(skip_mask=spread_skips(ids.shape[0])):
        with module_switch(routing_runtime, "FUSED_ROW_SCATTER", False), OpCounts() as unfused:
            expected = stepwise_program_logits(program, ids, 5)
        with module_switch(routing_runtime, "FUSED_ROW_SCATTER", True), OpCounts() as fused:
            got = stepwise_program_logits(program, ids, 5)
    assert torch.equal(got, expected)
    partly_run = 2 * (1 + ids.shape[1] - 5)  # blocks 0 and 1, at the prefill and four one-token steps
    assert unfused.ops["rewrite.add_rows_into_.default"] == 0
    assert fused.ops["rewrite.add_rows_into_.default"] == partly_run
    assert fused.ops["aten.index_copy_.default"] == unfused.ops["aten.index_copy_.default"] - partly_run
    assert fused.ops["aten.add.Tensor"] == unfused.ops["aten.add.Tensor"] - partly_run


def test_the_fused_scatter_follows_a_rewritten_body():
    """A block writing into its hidden input scatters its residual sum by one call; once its body is rewritten to
    end in something else, by `index_copy_`, with the new body's values."""
    hidden, weight = torch.randn(5, 2, 6), torch.randn(6)
    body = make_fx(lambda h, w: h + h * w)(hidden, weight)
    block = RoutedBlock(body, [InputRule("keep")], layer="layers.0", batch_dim=0, gatherable=True)
    block.writes_hidden = True
    rows = torch.tensor([3, 0])
    order, skip = torch.tensor([3, 0, 1, 2, 4]), torch.ones(5)
    expected = hidden.clone()
    expected[rows] = hidden[rows] + hidden[rows] * weight
    with torch.no_grad(), OpCounts() as counts:
        got = block(skip, order, 2, hidden.clone(), weight)
    assert torch.equal(got, expected) and counts.ops["rewrite.add_rows_into_.default"] == 1
    total = next(n for n in body.graph.nodes if n.target is torch.ops.aten.add.Tensor)
    total.target = torch.ops.aten.sub.Tensor
    body.recompile()
    expected[rows] = hidden[rows] - hidden[rows] * weight
    with torch.no_grad(), OpCounts() as counts:
        got = block(skip, order, 2, hidden.clone(), weight)
    assert torch.equal(got, expected)
    assert counts.ops["rewrite.add_rows_into_.default"] == 0 and counts.ops["aten.index_copy_.default"] == 1


@pytest.mark.parametrize("fused", [False, True])
def test_a_decode_step_gathers_the_views_visible_mask_in_the_blocks_launch(fused):
    """A one-token step of a partly run block: with the switch on, the block's decode-state view takes its rows of
    the step's visible mask from the block's one gather (no index_select left); off, each is one index_select."""
    program, ids = routed_llama_program()
    with torch.no_grad(), skip_controls(skip_mask=spread_skips(ids.shape[0])):
        with module_switch(routing_runtime, "FUSED_ROW_GATHER", fused):
            counts = one_decode_step_ops(program, ids, 8)
    gathers, selects = counts.ops["rewrite.gather_rows.default"], counts.ops["aten.index_select.default"]
    # blocks 0 and 1 run part of the batch; each gathers hidden, cos, sin, its mask input and the visible mask
    assert (gathers, selects) == ((2, 0) if fused else (0, 10))


def test_training_under_autograd_keeps_the_per_tensor_gathers():
    """The op has no backward: with gradients on, a partly run block gathers as before and gradients flow."""
    model, ids = tiny_llama()
    om = rewrite.optimize(model, ["layer_skip"], example_kwargs={"input_ids": ids})
    om.train()
    with skip_controls(skip_mask=spread_skips(ids.shape[0]), mode="hard"), OpCounts() as counts:
        with module_switch(routing_runtime, "FUSED_ROW_GATHER", True):
            logits = om(input_ids=ids).logits
    logits.float().pow(2).mean().backward()
    assert counts.ops["rewrite.gather_rows.default"] == 0 and counts.ops["aten.index_select.default"] > 0
    assert model.model.layers[0].mlp.down_proj.weight.grad is not None
