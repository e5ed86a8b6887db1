"""Mask facts probed on example inputs: a causal-looking band (sliding-window) mask is not the plain
causal mask, so neither `attention_normalize` nor the `mixer` pass may drop it; the plain causal mask
of an unpadded Hugging Face batch is dropped, and no [L, L] tensor is left in the linearized graph."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import rewrite
from examples.models import TARGETS
from rewrite.analysis import analyze
from rewrite.analysis.nodes import tensor_meta
from rewrite.capture import capture


class BandAttention(nn.Module):
    """Causal attention over the last `width` keys, its mask built from the length alone."""

    def __init__(self, dim: int = 32, heads: int = 2, width: int = 3):
        super().__init__()
        self.heads, self.width = heads, width
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).split(c, -1))
        i = torch.arange(t)
        keep = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - self.width)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return o.transpose(1, 2).reshape(b, t, c)


def test_band_mask_hides_the_future_but_is_not_the_causal_mask() -> None:
    x = torch.randn(2, 8, 32)
    (site,) = analyze(capture(BandAttention(), (x,)).graph_module).sites
    assert site.mask_is_causal is True and site.mask_shape_only
    assert not site.mask_exactly_causal


def test_attention_normalize_keeps_a_band_mask() -> None:
    torch.manual_seed(0)
    model = BandAttention().eval()
    x = torch.randn(2, 8, 32)
    om = rewrite.optimize(model, ["attention_normalize"], (x,))
    y = torch.randn(3, 11, 32)
    torch.testing.assert_close(om(y), model(y), atol=1e-6, rtol=1e-6)


def _square_seq_tensors(gm: fx.GraphModule) -> list[str]:
    """Nodes whose value ends in two equal symbolic dims (an [L, L] mask)."""
    out = []
    for node in gm.graph.nodes:
        val = tensor_meta(node)
        if val is None or val.dim() < 2:
            continue
        a, b = val.shape[-2], val.shape[-1]
        if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt) and str(a) == str(b):
            out.append(node.name)
    return out


def test_mixer_drops_the_plain_causal_mask_of_an_unpadded_batch() -> None:
    model, inputs = TARGETS["llama"]()
    ids = inputs["input_ids"]
    plain = rewrite.optimize(model, [{"mixer": {"kind": "gla"}}], example_kwargs={"input_ids": ids})
    assert _square_seq_tensors(plain.program) == []
    # with a padding mask the mask is read (it carries the padding) and the two agree on an unpadded batch
    padded = rewrite.optimize(model, [{"mixer": {"kind": "gla"}}],
                              example_kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    other = torch.randint(0, 100, (3, 13))
    want = padded(input_ids=other, attention_mask=torch.ones_like(other))
    got = plain(input_ids=other)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)


def test_sequence_causal_tells_a_window_from_padding_and_packed_sequences() -> None:
    """Causal with key padding (either side) and a packed row's block-diagonal causal mask keep every earlier key of
    the query's own sequence; a band of 3 shown on 8 tokens does not, bool or additive (-1e4 hides, as the mixers
    read it)."""
    from rewrite.analysis.mask_probe import sequence_causal

    n = 8
    i = torch.arange(n)
    causal = i[None, :] <= i[:, None]
    real = torch.tensor([[1] * 8, [1] * 5 + [0] * 3, [0] * 3 + [1] * 5]).bool()
    padded = causal & real[:, None, None, :]
    doc = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    packed = causal & (doc[None, :] == doc[:, None])
    band = causal & (i[None, :] > i[:, None] - 3)
    assert sequence_causal(causal) and sequence_causal(padded) and sequence_causal(packed[None, None])
    assert not sequence_causal(band)
    assert not sequence_causal(packed & (i[None, :] > i[:, None] - 2))  # a window of 2 inside a 3-token sequence
    additive = torch.where(band, 0.0, -1e4)
    assert sequence_causal(torch.where(padded, 0.0, -1e4)) and not sequence_causal(additive)
    hole = packed.clone()
    hole[6, 5] = False  # one earlier key of the query's sequence hidden
    assert not sequence_causal(hole)


class ChunkedAttention(nn.Module):
    """Chunked local attention (as Llama 4's local layers): each query sees the keys of its own chunk of `chunk`
    tokens up to itself; `divide` builds the mask with `pos // chunk` in the graph, otherwise from a precomputed
    chunk index buffer sliced to the length (a shape-only mask with no divisor in the graph)."""

    def __init__(self, dim: int = 32, heads: int = 2, chunk: int = 4, divide: bool = True):
        super().__init__()
        self.heads, self.chunk, self.divide = heads, chunk, divide
        self.qkv = nn.Linear(dim, 3 * dim)
        self.register_buffer("chunk_of", torch.arange(64) // chunk, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).split(c, -1))
        i = torch.arange(t)
        which = i // self.chunk if self.divide else self.chunk_of[:t]
        keep = (i[None, :] <= i[:, None]) & (which[None, :] == which[:, None])
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return o.transpose(1, 2).reshape(b, t, c)


class PackedAttention(nn.Module):
    """Causal attention within the sequences `sequence_ids` packs into each row (an input: the example's own packing)."""

    def __init__(self, dim: int = 32, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor, sequence_ids: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).split(c, -1))
        i = torch.arange(t)
        keep = (i[None, :] <= i[:, None]) & (sequence_ids[:, None, :, None] == sequence_ids[:, None, None, :])
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return o.transpose(1, 2).reshape(b, t, c)


def test_chunked_masks_are_told_from_packed_sequences() -> None:
    """A block-diagonal causal mask whose blocks are the model's chunks (a divisor of positions in its graph, or a
    mask read from shapes alone) is chunked local attention, refused naming the chunk size; one whose blocks come
    from the example (sequence ids, even of equal lengths at multiples of 4) is packed sequences. An example too
    short to cross a chunk keeps the mask (not taken for the causal mask) and is refused as chunked too."""
    from rewrite.errors import PassError

    x = torch.randn(2, 10, 32)
    for divide in (True, False):
        with pytest.raises(PassError, match=r"chunked local attention: each query sees only keys in its own chunk "
                                            r"of 4 tokens"):
            rewrite.optimize(ChunkedAttention(divide=divide), [{"mixer": {"kind": "gla"}}], (x,))
    with pytest.raises(PassError, match=r"cuts positions into chunks of 4 tokens"):
        rewrite.optimize(ChunkedAttention(), [{"mixer": {"kind": "gla"}}], (x[:, :4],))
    model = ChunkedAttention()
    om = rewrite.optimize(model, ["attention_normalize"], (x[:, :4],))
    assert "mask kept" in om.report.results[0].changed[0]
    with torch.no_grad():
        torch.testing.assert_close(om(x), model(x))
    ids = (torch.arange(8) // 4)[None].expand(2, 8)  # two packed sequences of 4 tokens each
    with pytest.raises(PassError, match=r"packs several sequences into one row"):
        rewrite.optimize(PackedAttention(), [{"mixer": {"kind": "gla"}}], (x[:, :8], ids))
