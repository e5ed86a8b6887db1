"""Hand-written attention that hides scores in place or with two fills in a row: the capture rewrites both into the
one out-of-place fill the analysis reads (`rewrite.score_masks`), the program computes the same values, and the
passes then work: padding-free runs equal each sequence run alone, a mixer replaces every layer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rewrite
from rewrite.analysis.attention_sites import find_attention_sites
from rewrite.analysis.mask_probe import window_constant
from rewrite.analysis.nodes import is_op
from rewrite.capture import capture
from rewrite.errors import PassError
from rewrite.score_masks import canonicalize_score_masks

aten = torch.ops.aten


class FillAttention(nn.Module):
    """nanoGPT-style causal attention: a causal buffer hidden with -inf, in place or not, then optionally the keys
    the padding mask marks (a second fill); `peek` reads the scores before the in-place fill too."""

    def __init__(self, dim: int = 32, heads: int = 4, in_place: bool = False, padding: bool = False,
                 peek: bool = False):
        super().__init__()
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.heads, self.in_place, self.padding, self.peek = heads, in_place, padding, peek
        self.register_buffer("causal", torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (y.view(b, t, self.heads, c // self.heads).transpose(1, 2) for y in self.qkv(x).split(c, 2))
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        extra = scores.mean() if self.peek else 0.0  # read before the in-place fill
        hide = self.causal[:, :, :t, :t] == 0
        if self.in_place:
            scores.masked_fill_(hide, float("-inf"))
        else:
            scores = scores.masked_fill(hide, float("-inf"))
        if self.padding:
            scores = scores.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
        y = (F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, t, c)
        return self.out(y) + extra


class FillNet(nn.Module):
    def __init__(self, **attention):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.blocks = nn.ModuleList([FillAttention(**attention) for _ in range(2)])
        self.head = nn.Linear(32, 50)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = x + block(x, mask)
        return self.head(x)


def batch(lengths: list[int], width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (len(lengths), width), generator=g)
    return {"ids": ids, "mask": (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()}


def fills(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if is_op(n, aten.masked_fill, aten.masked_fill_)]


@pytest.mark.parametrize("in_place,padding", [(True, False), (False, True), (True, True)])
def test_fills_become_one_out_of_place_fill_with_the_same_values(in_place, padding):
    torch.manual_seed(0)
    model = FillNet(in_place=in_place, padding=padding).eval()
    example = batch([7, 4], 7)
    captured = capture(model, (), example, cache=False)
    assert fills(captured.graph_module) == ["aten.masked_fill.Scalar"] * 2  # one per layer, none in place
    other = batch([9, 2, 5], 9, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(captured.graph_module(**other), model(**other), rtol=0, atol=0)


def test_scores_read_before_an_in_place_fill_are_left_as_captured():
    torch.manual_seed(0)
    model = FillNet(in_place=True, peek=True).eval()
    captured = capture(model, (), batch([7, 4], 7), cache=False)
    assert fills(captured.graph_module) == ["aten.masked_fill_.Scalar"] * 2
    assert canonicalize_score_masks(captured.graph_module) == 0
    with pytest.raises(PassError, match="the scores are built by ops the analysis does not recognise"):
        rewrite.optimize(model, [{"mixer": {}}], example_kwargs=batch([7, 4], 7))


def test_padding_free_and_mixer_on_chained_fills():
    """Causal then padding fills: varlen (verify on) equals each sequence run alone on its real tokens; a causal
    mixer replaces both layers and trains."""
    torch.manual_seed(0)
    model = FillNet(in_place=True, padding=True).eval()
    om = rewrite.optimize(model, ["varlen"], example_kwargs=batch([7, 4], 7), verify=True)
    assert om.verification.passed
    lengths = [9, 2, 5]
    with torch.no_grad():
        got = om(**batch(lengths, 9, seed=2))
        ids = batch(lengths, 9, seed=2)["ids"]
        for row, n in enumerate(lengths):
            alone = model(ids[row:row + 1, :n], torch.ones(1, n, dtype=torch.long))
            torch.testing.assert_close(got[row, :n], alone[0], atol=1e-5, rtol=1e-5)
    mixed = rewrite.optimize(model.train(), [{"mixer": {"kind": "gla"}}], example_kwargs=batch([7, 4], 7))
    assert mixed.report.results[0].changed and len(mixed.report.results[0].changed) == 2
    loss = mixed(**batch([7, 4], 7)).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in mixed.parameters() if p.requires_grad)


class TableAttention(nn.Module):
    """Scores hidden by `where(table[:t, :t], scores, lowest)`, the lowest value a constant tensor (GPT-Neo's form),
    the keep table a buffer: causal, a band of `band` keys, or an arbitrary pattern."""

    def __init__(self, table: torch.Tensor, dim: int = 32, heads: int = 4):
        super().__init__()
        self.qkv, self.heads = nn.Linear(dim, 3 * dim), heads
        self.register_buffer("table", table.view(1, 1, *table.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (y.view(b, t, self.heads, c // self.heads).transpose(1, 2) for y in self.qkv(x).split(c, 2))
        scores = q @ k.transpose(-2, -1)
        lowest = torch.tensor(torch.finfo(scores.dtype).min, dtype=scores.dtype)
        scores = torch.where(self.table[:, :, :t, :t], scores, lowest)
        return (F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, t, c)


def _tables(n: int = 16) -> dict[str, torch.Tensor]:
    rows = torch.arange(n)
    causal = rows[None, :] <= rows[:, None]
    pattern = causal.clone()
    pattern[9, 2] = False  # one hidden key inside the causal triangle: no band
    band = causal & (rows[:, None] - rows[None, :] < 5)
    return {"causal": causal, "band 5": band, "pattern": pattern, "hide future": ~causal, "hide outside band 5": ~band}


@pytest.mark.parametrize("name,window", [("causal", 0), ("band 5", 5), ("pattern", 16)])
def test_where_selected_scores_become_a_fill_and_a_table_s_window_is_read(name, window):
    """where(keep, scores, lowest) becomes one masked_fill computing the same values; the window a mask sliced from a
    constant table holds is read from the whole table (0 causal, W for a band of W, the table's size for any other
    pattern), also when the example (6 tokens) is shorter than the band shows."""
    torch.manual_seed(0)
    model = TableAttention(_tables()[name]).eval()
    x = torch.randn(2, 6, 32)
    gm = capture(model, (x,), cache=False).graph_module
    assert fills(gm) == ["aten.masked_fill.Scalar"] and not [n for n in gm.graph.nodes if is_op(n, aten.where)]
    other = torch.randn(3, 11, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm(other), model(other), rtol=0, atol=0)
    (site,) = find_attention_sites(gm)
    assert window_constant([site.mask]) == window


@pytest.mark.parametrize("name,window", [("hide future", 0), ("hide outside band 5", 5)])
def test_a_table_of_keys_to_hide_is_read_as_its_complement(name, window):
    """nanoGPT variants keep `triu(ones, 1)` and fill where it is set: the table marks the keys to hide. Its window
    is its complement's (0 for the strict upper triangle: no window a longer input would show)."""
    torch.manual_seed(0)
    model = FillNet().eval()
    for block in model.blocks:
        block.causal = _tables(64)[name].view(1, 1, 64, 64).float()
        block.forward = _hiding_forward(block)
    captured = capture(model, (), batch([7, 4], 7), cache=False)
    sites = find_attention_sites(captured.graph_module)
    assert len(sites) == 2 and {window_constant([s.mask]) for s in sites} == {window}


def _hiding_forward(block: FillAttention):
    def forward(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (y.view(b, t, block.heads, c // block.heads).transpose(1, 2) for y in block.qkv(x).split(c, 2))
        scores = (q @ k.transpose(-2, -1)).masked_fill(block.causal[:, :, :t, :t] == 1, float("-inf"))
        return block.out((F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, t, c))
    return forward


def test_a_square_padding_mask_input_is_no_table():
    """A batch of 4 rows of 4 tokens, right-padded to lengths 4, 3, 2, 1: its [4, 4] 0 / 1 padding mask is an input,
    not a table of the model, so it holds no window: the masks show none and a mixer replaces both layers."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(3, 60, (4, 4))
    mask = (torch.arange(4)[None, :] < torch.tensor([4, 3, 2, 1])[:, None]).long()
    gm = capture(model, (), {"input_ids": ids, "attention_mask": mask}, cache=False).graph_module
    assert [window_constant([s.mask]) for s in find_attention_sites(gm)] == [0, 0]
    mixed = rewrite.optimize(model, [{"mixer": {"kind": "gla"}}], example_kwargs={"input_ids": ids, "attention_mask": mask})
    assert len(mixed.report.results[0].changed) == 2
