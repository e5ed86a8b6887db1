"""The varlen pass runs a causal depthwise conv over the tokens (a short-conv layer) per sequence of the packed
batch, matching the padded module on every real token; a conv of another form that feeds attention is refused,
naming the module and the form it supports."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rewrite
from rewrite.errors import PassError


class ConvThenAttention(nn.Module):
    """Embedding -> depthwise conv over the tokens -> softmax attention over real tokens -> logits."""

    def __init__(self, kernel: int, causal: bool = True, depthwise: bool = True):
        super().__init__()
        self.causal = causal
        self.embed = nn.Embedding(50, 16)
        self.conv = nn.Conv1d(16, 16, kernel, groups=16 if depthwise else 1,
                              padding=kernel - 1 if causal else kernel // 2)
        self.qkv = nn.Linear(16, 48)
        self.out = nn.Linear(16, 50)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch, seq = input_ids.shape
        x = self.embed(input_ids) * attention_mask[:, -seq:, None]  # the slice LFM2 takes of its mask
        y = self.conv(x.transpose(1, 2))
        x = (y[..., :seq] if self.causal else y).transpose(1, 2)
        q, k, v = self.qkv(x).view(batch, seq, 3, 2, 8).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask[:, None, None, :].bool())
        return self.out(o.transpose(1, 2).reshape(batch, seq, 16))


def padded(lengths: list[int], width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (len(lengths), width), generator=g)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("kernel", [2, 4, 8])
def test_causal_depthwise_conv_runs_per_sequence_like_the_padded_module(kernel):
    torch.manual_seed(kernel)
    model = ConvThenAttention(kernel).eval()
    om = rewrite.optimize(model, ["varlen"], example_kwargs=padded([9, 4, 1], 9))
    assert "causal convs per sequence: conv" in om.report.results[0].messages
    for lengths, width in (([9, 4, 1], 9), ([3, 17], 17), ([2, 2, 12, 7], 12)):  # short sequences: the conv's reach
        batch = padded(lengths, width, seed=width)
        with torch.no_grad():
            want, got = model(**batch), om(**batch)
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
        assert torch.all(got[~real] == 0)


@pytest.mark.parametrize(("make", "why"), [
    (lambda: ConvThenAttention(3, causal=False), "kernel 3"),
    (lambda: ConvThenAttention(9), "kernel 9"),
    (lambda: ConvThenAttention(3, depthwise=False), "kernel 3"),
], ids=["centred", "kernel-9", "dense"])
def test_other_convs_over_the_tokens_are_refused_naming_the_module(make, why):
    with pytest.raises(PassError, match=rf"a convolution over the tokens \({why}, module conv.*causal depthwise "
                                        r"conv1d \(weight \[C, 1, K\] with K from 2 to 8") as info:
        rewrite.optimize(make().eval(), ["varlen"], example_kwargs=padded([9, 4], 9))
    assert info.value.module_path == "conv"
