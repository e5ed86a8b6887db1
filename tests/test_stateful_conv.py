"""Stateful decode of causal depthwise convs over the tokens (short-conv layers): each conv keeps its last K-1
inputs in the decode state, so token-by-token logits equal the full forward's, ragged prompts generate each
prompt's own tokens, and a conv of another form is refused naming its module."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import stepwise_program_logits
from torch import nn

import rewrite
from rewrite.decode import decode_program
from rewrite.errors import PassError

pytestmark = pytest.mark.usefixtures("no_grad")
VOCAB = 50


class ConvDecoder(nn.Module):
    """Embedding -> depthwise conv over the tokens -> causal softmax attention -> logits."""

    def __init__(self, kernel: int, causal: bool = True, depthwise: bool = True):
        super().__init__()
        self.causal = causal
        self.embed = nn.Embedding(VOCAB, 16)
        self.conv = nn.Conv1d(16, 16, kernel, groups=16 if depthwise else 1,
                              padding=kernel - 1 if causal else kernel // 2)
        self.qkv = nn.Linear(16, 48)
        self.out = nn.Linear(16, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        batch, seq = input_ids.shape
        x = self.embed(input_ids)
        y = self.conv(x.transpose(1, 2))
        x = x + (y[..., :seq] if self.causal else y).transpose(1, 2)
        q, k, v = self.qkv(x).view(batch, seq, 3, 2, 8).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(x + o.transpose(1, 2).reshape(batch, seq, 16))


def built(kernel: int, **form) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(kernel)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    return ConvDecoder(kernel, **form).eval(), ids


def greedy_reference(model: nn.Module, ids: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy continuation by running the full forward on the whole sequence at every step."""
    for _ in range(new):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("kernel", [2, 4])
def test_conv_state_decodes_token_by_token_like_the_full_forward(kernel):
    """A prefill shorter than the conv's reach (2 tokens), then one step per token: the logits equal the full
    forward's; a CUDA-graph-style static step (fixed one-token buffers) too; ragged prompts generate each prompt's
    own greedy tokens, as the full forward picks them."""
    model, ids = built(kernel)
    om = rewrite.optimize(model, ["stateful"], (ids,))
    held = "its last input" if kernel == 2 else f"its last {kernel - 1} inputs"
    assert f"layer 0 (conv): can decode with a conv state ({held})" in om.report.results[0].messages
    program = decode_program(om)
    assert "stateful_conv" in program.code
    torch.testing.assert_close(stepwise_program_logits(program, ids, 2), model(ids), atol=1e-5, rtol=1e-5)

    state = program.new_state(2, ids.shape[1])
    positions = torch.arange(ids.shape[1]).expand(2, -1)
    state.begin(4)
    outs = [program(ids[:, :4], positions[:, :4], state)]
    state.advance()
    state.start_static()
    for t in range(4, ids.shape[1]):
        state.begin(1)
        outs.append(program(ids[:, t:t + 1], positions[:, t:t + 1], state))
        state.advance()
    torch.testing.assert_close(torch.cat(outs, dim=1), model(ids), atol=1e-5, rtol=1e-5)

    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # row 0's prompt is 3 tokens shorter, left-padded
    batched = om.generate(ids, mask, max_new_tokens=4)
    for row, start in ((0, 3), (1, 0)):
        alone = om.generate(ids[row:row + 1, start:], max_new_tokens=4)
        assert torch.equal(batched[row, start:], alone[0])
        assert torch.equal(alone, greedy_reference(model, ids[row:row + 1, start:], 4))


@pytest.mark.parametrize(("form", "why"), [({"causal": False}, "kernel 3"), ({"depthwise": False}, "kernel 3")],
                         ids=["centred", "dense"])
def test_other_convs_over_the_tokens_are_refused_naming_the_module(form, why):
    model, ids = built(3, **form)
    with pytest.raises(PassError, match=rf"convolution over the tokens \({why}\).*causal depthwise conv") as info:
        rewrite.optimize(model, ["stateful"], (ids,))
    assert info.value.pass_name == "stateful" and info.value.module_path == "conv"


class TokenShift(nn.Module):
    """Each token mixed with the one before it (an RWKV-style token shift): no state the decode program carries."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.5 * F.pad(x[:, :-1], (0, 0, 1, 0))


class ShiftDecoder(ConvDecoder):
    def __init__(self):
        super().__init__(2)
        self.shift = TokenShift()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        batch, seq = input_ids.shape
        x = self.shift(self.embed(input_ids))
        q, k, v = self.qkv(x).view(batch, seq, 3, 2, 8).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(x + o.transpose(1, 2).reshape(batch, seq, 16))


def test_a_token_mixer_the_state_does_not_carry_is_refused_at_generate_naming_its_module():
    """A token shift decodes wrongly token by token (the step would see zeros before its token): generate's step
    check finds the first value that differs between a whole prompt and prefill + one step, and names it."""
    torch.manual_seed(0)
    model = ShiftDecoder().eval()
    ids = torch.randint(0, VOCAB, (2, 6))
    om = rewrite.optimize(model, ["stateful"], (ids,))  # the plan's check sees only the attention
    with pytest.raises(PassError, match=r"ShiftDecoder cannot decode token by token: the value of \w+ \(shift\)") as info:
        om.generate(ids, max_new_tokens=2)
    assert info.value.pass_name == "stateful" and info.value.module_path == "shift"
    # in bfloat16 rounding could also flip a discrete choice between the two runs: the same finding, as a warning
    model = model.to(torch.bfloat16)
    om = rewrite.optimize(model, ["stateful"], (ids,))
    with pytest.warns(RuntimeWarning, match=r"ShiftDecoder may not decode token by token: the value of \w+ \(shift\)"):
        om.generate(ids, max_new_tokens=2)


def test_verify_checks_the_decode_step_when_the_plan_decodes():
    """optimize(verify=True) with `stateful` builds the decode program: a conv the state carries passes the step
    check (a note says so); a token shift is refused there, at optimize, naming its module."""
    model, ids = built(3)
    om = rewrite.optimize(model, ["stateful"], (ids,), verify=True)
    assert "decode: a prompt's last token decoded as one step after a prefill of the others gives the values of the " \
           "whole prompt" in om.verification.notes
    torch.manual_seed(0)
    with pytest.raises(PassError, match=r"ShiftDecoder cannot decode token by token: the value of \w+ \(shift\)"):
        rewrite.optimize(ShiftDecoder().eval(), ["stateful"], (ids,), verify=True)


def test_routed_blocks_carry_their_convs_for_the_sequences_that_run_them():
    """LFM2 with every block routed and decisions held per sequence: a conv inside a routed block keeps the last
    inputs of the rows that run it; token-by-token logits equal the forward program's under the same decisions."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.Lfm2ForCausalLM(transformers.Lfm2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, layer_types=["conv", "full_attention", "conv", "full_attention"], conv_L_cache=3)).eval()
    ids = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(3))
    om = rewrite.optimize(model, [{"layer_skip": {}}], example_kwargs={"input_ids": ids})
    program = decode_program(om)
    assert "layer 2 (model.layers.2.conv): conv state (its last 2 inputs)" in program.report.results[-1].changed
    skip = torch.tensor([[False, True, True, False], [True, False, False, True], [False, False, True, True]])
    with rewrite.routing.skip_controls(skip_mask=skip):
        stepped = stepwise_program_logits(program, ids, 3)
        whole = om(input_ids=ids).logits
    torch.testing.assert_close(stepped, whole, atol=1e-5, rtol=1e-5)


def test_generate_example_decodes_lfm2_with_its_conv_state(capsys):
    """The generate example on LFM2 (layer 1's attention linearized, layer 0's short conv kept): ragged prompts give
    each row's one-by-one tokens."""
    pytest.importorskip("transformers")
    from examples import generate as example

    assert example.main(["--tiny", "--target", "lfm2", "--layers", "1", "--fusions", "none"]) == 0
    out = capsys.readouterr().out
    assert "layer 0 (model.layers.0.conv): can decode with a conv state (its last 2 inputs)" in out
    assert "every row matches its one-by-one generation" in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lfm2_decodes_its_conv_state_on_the_gpu_graphed_and_eager():
    """LFM2 on the GPU (float32): token-by-token logits of the decode program equal HF's full forward; ragged
    prompts generate the same tokens eager and replayed from a CUDA graph, each prompt's greedy continuation."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.Lfm2ForCausalLM(transformers.Lfm2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, layer_types=["conv", "full_attention", "conv", "conv"], conv_L_cache=3)).eval().cuda()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5)).cuda()
    om = rewrite.optimize(model, ["stateful"], example_kwargs={"input_ids": ids})
    program = decode_program(om)
    state = program.new_state(2, ids.shape[1])
    positions = torch.arange(ids.shape[1], device="cuda").expand(2, -1)
    outs = []
    for start, stop in [(0, 1), *((t, t + 1) for t in range(1, ids.shape[1]))]:
        state.begin(stop - start)
        outs.append(program(ids[:, start:stop], positions[:, start:stop], state))
        state.advance()
    torch.testing.assert_close(torch.cat(outs, dim=1), model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)

    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    eager = om.generate(ids, mask, max_new_tokens=6, cuda_graph="never")
    assert torch.equal(om.generate(ids, mask, max_new_tokens=6, cuda_graph="always"), eager)
    for row, start in ((0, 0), (1, 4)):
        want = greedy_reference(lambda x: model(input_ids=x).logits, ids[row:row + 1, start:], 6)
        assert torch.equal(eager[row, start:], want[0])
