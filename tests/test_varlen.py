"""Pass `varlen`: padded batches run padding-free and match the padded model on real tokens, with gradients."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import assert_grads_close, main_output, parameter_grads, reference_kwargs
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import rewrite
from examples.models import TARGETS
from rewrite.errors import PassError, PlanError
from rewrite.kernels import packed_bounds
from rewrite.verify import verify

FAMILIES = ["bert", "llama", "qwen2", "qwen3", "gpt2"]
ROPE = {"llama", "qwen2", "qwen3"}  # relative positions: the padded model's offsets do not change real tokens


def padded_batch(vocab: int, lengths: list[int], max_len: int, left: set[int] = frozenset(), seed: int = 0):
    """input_ids + attention_mask with the given real lengths; rows in `left` padded on the left."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (len(lengths), max_len), generator=g)
    mask = torch.zeros(len(lengths), max_len, dtype=torch.long)
    for row, n in enumerate(lengths):
        if row in left:
            mask[row, max_len - n:] = 1
        else:
            mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def restarted_positions(mask: torch.Tensor) -> torch.Tensor:
    """The positions the varlen module gives each real token (0, 1, ... per row)."""
    return (mask.cumsum(1) - 1).clamp(min=0)


def reference_output(model: nn.Module, name: str, batch: dict):
    """The padded model on the batch; models with absolute positions get the per-row positions explicitly."""
    kwargs = dict(batch)
    if name not in ROPE:
        kwargs["position_ids"] = restarted_positions(batch["attention_mask"])
    return model(**reference_kwargs(model, kwargs))


def assert_real_tokens_close(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor, atol: float = 1e-5) -> None:
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], atol=atol, rtol=1e-5)


@pytest.fixture(scope="module")
def optimized():
    """One optimized module per family, captured on a batch with left and right padding."""
    built = {}
    for name in FAMILIES:
        model, _ = TARGETS[name]()
        batch = padded_batch(128, [5, 9, 3], 9, left={2})
        built[name] = (model, rewrite.optimize(model, {"passes": ["varlen"]}, example_kwargs=batch))
    return built


@pytest.mark.parametrize("name", FAMILIES)
def test_outputs_match_padded_model_on_real_tokens(name, optimized):
    model, om = optimized[name]
    # another batch shape than the capture's: one long row among short ones, a one-token row, left padding
    batch = padded_batch(128, [1, 23, 4, 2, 7], 23, left={2, 4}, seed=1)
    with torch.no_grad():
        got = om(**batch)
        want = reference_output(model, name, batch)
    assert_real_tokens_close(main_output(got), main_output(want), batch["attention_mask"])
    summary = om.report.summary()
    assert "varlen: matched 2, changed 2" in summary


@pytest.mark.parametrize("name", ["bert", "llama", "gpt2"])
def test_gradients_match_padded_model(name, optimized):
    model, om = optimized[name]
    batch = padded_batch(128, [6, 2, 9], 9, left={1}, seed=2)
    mask = batch["attention_mask"]
    got = parameter_grads(om, main_output(om(**batch)), mask)
    want = parameter_grads(model, main_output(reference_output(model, name, batch)), mask)
    assert_grads_close(got, want)


def test_padded_positions_are_zero_and_pooler_matches_on_right_padding(optimized):
    model, om = optimized["bert"]
    batch = padded_batch(128, [4, 8, 6], 8, seed=3)
    with torch.no_grad():
        got, want = om(**batch), reference_output(model, "bert", batch)
    pads = ~batch["attention_mask"].bool()
    assert torch.equal(got.last_hidden_state[pads], torch.zeros_like(got.last_hidden_state[pads]))
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-5, rtol=1e-5)


def test_all_padding_row_gives_zeros_and_leaves_other_rows_alone(optimized):
    model, om = optimized["llama"]
    batch = padded_batch(128, [5, 0, 7], 7, seed=4)
    with torch.no_grad():
        got = om(**batch).logits
        want = reference_output(model, "llama", {k: v[[0, 2]] for k, v in batch.items()}).logits
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    assert_real_tokens_close(got[[0, 2]], want, batch["attention_mask"][[0, 2]])


def test_minilm_sentence_embeddings_match():
    model, batch = TARGETS["minilm"](batch=4, length=24)
    om = rewrite.optimize(model, {"passes": ["varlen"]}, example_kwargs=batch)
    with torch.no_grad():
        got, want = om(**batch), model(**batch)
    mask = batch["attention_mask"]
    assert_real_tokens_close(got.last_hidden_state, want.last_hidden_state, mask)

    def mean_pool(h):
        return (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)

    torch.testing.assert_close(mean_pool(got.last_hidden_state), mean_pool(want.last_hidden_state), atol=1e-5,
                               rtol=1e-5)


class PerSequenceSummary(nn.Module):
    """Mixes tokens through a mean over the sequence before attention: not token-wise."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(64, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.heads = heads

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids)
        x = x + x.mean(dim=1, keepdim=True)
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).split(c, dim=-1))
        m = attention_mask[:, None, None, :].bool()
        return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)


class BiasedMask(nn.Module):
    """Attention with an additive distance bias: not a key-padding mask."""

    def forward(self, x, attention_mask):
        b, t, _ = x.shape
        q = x.view(b, t, 2, -1).transpose(1, 2)
        pos = torch.arange(t, device=x.device)
        bias = -(pos[:, None] - pos[None, :]).abs().float()
        mask = bias + (1.0 - attention_mask[:, None, None, :].float()) * -1e9
        return nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)


def test_op_that_is_not_token_wise_is_reported_with_node_and_module():
    batch = padded_batch(64, [3, 5], 5)
    with pytest.raises(PassError, match=r"node 'mean' \(module '<root>'\).*reduces or selects over the tokens"):
        rewrite.optimize(PerSequenceSummary().eval(), {"passes": ["varlen"]}, example_kwargs=batch)


class TiledTokens(nn.Module):
    """Repeats the sequence before attention (`repeat(1, 2, 1)`): tokens of one row read another copy's."""

    def forward(self, x, attention_mask):
        x = x.repeat(1, 2, 1)[:, : x.shape[1]] + x
        b, t, _ = x.shape
        q = x.view(b, t, 2, -1).transpose(1, 2)
        return nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=attention_mask[:, None, None, :].bool())


def test_repeat_along_the_tokens_is_refused_saying_what_is_supported():
    batch = {"x": torch.randn(2, 5, 8), "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    with pytest.raises(PassError, match=r"node 'repeat'.*it tiles the tokens.*Supported before attention"):
        rewrite.optimize(TiledTokens(), {"passes": ["varlen"]}, example_kwargs=batch)


def test_mask_that_is_not_key_padding_is_refused():
    batch = {"x": torch.randn(2, 5, 8), "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    with pytest.raises(PassError, match="additive bias|bias values|not key padding|cannot prove the attention masks"):
        rewrite.optimize(BiasedMask(), {"passes": ["varlen"]}, example_kwargs=batch)


def test_plan_fields_are_checked():
    model, _ = TARGETS["bert"]()
    batch = padded_batch(128, [3, 5], 5)
    with pytest.raises(PlanError, match="varlen.mask_input"):
        rewrite.optimize(model, {"passes": [{"varlen": {"mask_input": "pad_mask"}}]}, example_kwargs=batch)
    with pytest.raises(PlanError, match="varlen.attention_backend"):
        rewrite.optimize(model, {"passes": [{"varlen": {"attention_backend": "fast"}}]}, example_kwargs=batch)


def split_by(x: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    return list(torch.split(x, lengths, dim=1))


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_packed_position_ids_never_pad_and_match_each_sequence_alone(name):
    model, _ = TARGETS[name]()
    lengths = [5, 3, 4]
    ids = torch.randint(1, 128, (1, sum(lengths)), generator=torch.Generator().manual_seed(5))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    om = rewrite.optimize(model, {"passes": ["varlen"]}, example_kwargs={"input_ids": ids, "position_ids": positions})
    assert "packed input: sequences from 'position_ids'" in om.report.summary()
    assert "repad_tokens" not in om.code and "unpad_layout" not in om.code
    lengths = [2, 7, 1, 6]
    ids = torch.randint(1, 128, (1, sum(lengths)), generator=torch.Generator().manual_seed(6))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        got = main_output(om(input_ids=ids, position_ids=positions))
        for piece, seq_ids in zip(split_by(got, lengths), split_by(ids, lengths)):
            want = main_output(model(**reference_kwargs(model, {"input_ids": seq_ids})))
            torch.testing.assert_close(piece, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="restart|start each sequence at 0"):
        om(input_ids=ids, position_ids=positions + 1)


def test_mixer_on_packed_position_ids_needs_a_pass_that_carries_them():
    """Llama given packed position_ids builds a block-diagonal mask: the mixer alone cannot carry it and is refused
    when `optimize` runs, naming the layer; followed by varlen, each packed sequence equals that sequence alone."""
    from rewrite.errors import PassError

    model, _ = TARGETS["llama"]()
    lengths = [5, 3, 4]
    ids = torch.randint(1, 128, (1, sum(lengths)), generator=torch.Generator().manual_seed(7))
    example = {"input_ids": ids, "position_ids": torch.cat([torch.arange(n) for n in lengths])[None]}
    with pytest.raises(PassError, match=r"layer 0 \(model\.layers\.0\.self_attn\).*packs several sequences.*"
                                        r"varlen, sequence_parallel after `mixer`"):
        rewrite.optimize(model, [{"mixer": {"kind": "linear"}}], example_kwargs=example)
    om = rewrite.optimize(model, [{"mixer": {"kind": "linear"}}, "varlen"], example_kwargs=example)
    alone = rewrite.optimize(model, [{"mixer": {"kind": "linear"}}], example_kwargs={"input_ids": ids[:, :5]})
    with torch.no_grad():
        got = main_output(om(**example))
        for piece, seq_ids in zip(split_by(got, lengths), split_by(ids, lengths)):
            torch.testing.assert_close(piece, main_output(alone(input_ids=seq_ids)), atol=1e-5, rtol=1e-5)


class CausalLM(nn.Module):
    """A small causal LM that takes `cu_seqlens` but does not use it (the varlen pass does)."""

    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, vocab)
        self.heads = heads

    def forward(self, input_ids, cu_seqlens=None):
        x = self.embed(input_ids)
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).split(c, dim=-1))
        h = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(x + h.transpose(1, 2).reshape(b, t, c))


def test_packed_cu_seqlens_input():
    torch.manual_seed(0)
    model = CausalLM().eval()
    ids = torch.randint(0, 64, (1, 12))
    om = rewrite.optimize(model, {"passes": ["varlen"]},
                          example_kwargs={"input_ids": ids, "cu_seqlens": torch.tensor([0, 5, 12], dtype=torch.int32)})
    lengths = [4, 1, 9]
    ids = torch.randint(0, 64, (1, 14))
    with torch.no_grad():
        got = om(input_ids=ids, cu_seqlens=torch.tensor([0, 4, 5, 14], dtype=torch.int32))
        for piece, seq_ids in zip(split_by(got, lengths), split_by(ids, lengths)):
            torch.testing.assert_close(piece, model(seq_ids), atol=1e-5, rtol=1e-5)


class CountRewriteOps(TorchDispatchMode):
    """Counts the `rewrite::` kernel ops dispatched inside it, by op name."""

    def __init__(self):
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "rewrite":
            self.calls[str(func)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_linear_mixers_run_in_one_call_per_layer(name):
    model, _ = TARGETS[name]()
    batch = padded_batch(128, [6, 9, 3], 9, left={0}, seed=7)
    padded = rewrite.optimize(model, {"passes": ["mixer"]}, example_kwargs=batch)
    packed = rewrite.optimize(model, {"passes": ["mixer", "varlen"]}, example_kwargs=batch)
    changed = packed.report.results[-1].changed
    assert len(changed) == model.config.num_hidden_layers
    assert all("mixer one call over the packed sequences" in line for line in changed)
    batch = padded_batch(128, [1, 5, 17, 2], 17, left={1}, seed=8)  # four sequences, one a single token
    mask = batch["attention_mask"]
    with torch.no_grad(), CountRewriteOps() as ops:
        got = main_output(packed(**batch))
    with torch.no_grad():
        want = main_output(padded(**batch, position_ids=restarted_positions(mask)))
    assert_real_tokens_close(got, want, mask)
    # gla (llama) and bidirectional (bert) each end in one linear-attention kernel call: one per layer, not per sequence
    assert ops.calls == {"rewrite.linear_attention.default": model.config.num_hidden_layers}


def _count_mixer_calls(monkeypatch: pytest.MonkeyPatch, kind: str) -> list[int]:
    """Patch mixer kind `kind` so that each call of its function appends its number of sequences to the list."""
    import dataclasses
    import functools

    from rewrite.mixers import KINDS

    calls: list[int] = []
    fn = KINDS[kind].fn

    @functools.wraps(fn)
    def counted(*args, **kwargs):
        cu_seqlens = kwargs.get("cu_seqlens")
        calls.append(1 if cu_seqlens is None else cu_seqlens.numel() - 1)
        return fn(*args, **kwargs)

    monkeypatch.setitem(KINDS, kind, dataclasses.replace(KINDS[kind], fn=counted))
    return calls


CAUSAL_MIXER_KINDS = ["linear", "retention", "gla", "gated_deltanet", "mamba2", "lawcat", "hybrid_swa", "sliding_window"]


@pytest.mark.parametrize("kind", CAUSAL_MIXER_KINDS)
def test_each_causal_mixer_packed_matches_the_padded_linearized_llama(kind, monkeypatch):
    model, _ = TARGETS["llama"]()
    mixer = {"mixer": {"kind": kind, "window": 4, "sinks": 1}}
    capture_batch = padded_batch(128, [6, 9, 3], 9, left={0}, seed=9)
    padded = rewrite.optimize(model, [mixer], example_kwargs=capture_batch)
    packed = rewrite.optimize(model, [mixer, "varlen"], example_kwargs=capture_batch)
    own = {name for name, _ in model.named_parameters()}
    g = torch.Generator().manual_seed(10)
    with torch.no_grad():  # move the mixer's new parameters off their neutral start, the same in both modules
        for name, p in padded.named_parameters():
            if name not in own:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    packed.load_state_dict(padded.state_dict())
    calls = _count_mixer_calls(monkeypatch, kind)
    batch = padded_batch(128, [1, 5, 17, 2], 17, left={1, 3}, seed=11)
    mask = batch["attention_mask"]
    with monkeypatch.context() as patch:  # the runtime built cu_seqlens: no kernel reads them back to check
        patch.setattr(packed_bounds, "read_bounds", _no_host_read)
        got = main_output(packed(**batch))
    assert calls == [4] * model.config.num_hidden_layers  # one call per layer over the 4 sequences
    want = main_output(padded(**batch, position_ids=restarted_positions(mask)))
    assert_real_tokens_close(got, want, mask)
    got_grads, want_grads = parameter_grads(packed, got, mask), parameter_grads(padded, want, mask)
    assert got_grads.keys() == want_grads.keys()
    assert any(name not in own for name in got_grads) == (kind not in ("linear", "gla", "sliding_window"))
    for name, grad in want_grads.items():
        assert grad is not None and got_grads[name] is not None, name
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=lambda m, k=name: f"{k}: {m}")


def _no_host_read(cu_seqlens):
    raise AssertionError(f"cu_seqlens {cu_seqlens} read back to the host")


def test_kernels_check_cu_seqlens_unless_the_caller_built_them(monkeypatch):
    from rewrite.kernels.linear_attention import linear_attention
    from rewrite.kernels.short_conv import short_conv

    q = torch.randn(1, 7, 2, 8)
    bad = torch.tensor([0, 5, 3, 7], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"linear_attention: cu_seqlens must rise from 0 to T = 7"):
        linear_attention(q, q, q, cu_seqlens=bad)
    with pytest.raises(ValueError, match=r"short_conv: cu_seqlens must rise from 0 to T = 7"):
        short_conv(q.flatten(2), torch.randn(16, 4), cu_seqlens=bad)
    good = torch.tensor([0, 3, 7], dtype=torch.int32)
    want, _ = linear_attention(q, q, q, cu_seqlens=good)
    monkeypatch.setattr(packed_bounds, "read_bounds", _no_host_read)
    with pytest.raises(AssertionError, match="read back"):
        linear_attention(q, q, q, cu_seqlens=good)
    with packed_bounds.trusted_cu_seqlens():
        got, _ = linear_attention(q, q, q, cu_seqlens=good)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_pack_lengths_fills_budgets_and_keeps_every_sequence():
    from rewrite.packing import pack_lengths

    g = torch.Generator().manual_seed(8)
    lengths = torch.randint(1, 200, (300,), generator=g).tolist()
    bins = pack_lengths(lengths, 512)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    lower_bound = -(-sum(lengths) // 512)
    assert len(bins) <= lower_bound + 2  # best fit decreasing is near the bound on such lengths
    with pytest.raises(ValueError, match="sequence 1 has 600 tokens"):
        pack_lengths([3, 600], 512)


def test_packed_collator_feeds_a_varlen_module():
    from rewrite.packing import PackedCollator, TokenBudgetSampler

    model, _ = TARGETS["llama"]()
    g = torch.Generator().manual_seed(9)
    examples = [{"input_ids": torch.randint(1, 128, (n,), generator=g), "labels": torch.randint(1, 128, (n,))}
                for n in (5, 9, 2, 7, 4)]
    sampler = TokenBudgetSampler([len(e["input_ids"]) for e in examples], 16, shuffle=True)
    collate = PackedCollator(pad_to_multiple_of=8)
    lengths = [4, 1, 9]
    first = collate([{"input_ids": torch.arange(1, n + 1), "labels": torch.arange(n)} for n in lengths])
    assert first["cu_seqlens"].tolist() == [0, 4, 5, 14, 16]
    assert first["position_ids"][0, :6].tolist() == [0, 1, 2, 3, 0, 0]
    assert first["labels"][0, [0, 4, 5]].tolist() == [-100, -100, -100]
    om = rewrite.optimize(model, {"passes": ["varlen"]},
                          example_kwargs={"input_ids": first["input_ids"], "position_ids": first["position_ids"]})
    for bin_ in sampler:
        batch = collate([examples[i] for i in bin_])
        with torch.no_grad():
            got = om(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
            bounds = batch["cu_seqlens"].tolist()
            for i, start, end in zip(bin_, bounds, bounds[1:]):
                want = model(input_ids=examples[i]["input_ids"][None], use_cache=False).logits[0]
                torch.testing.assert_close(got[0, start:end], want, atol=1e-5, rtol=1e-5)


def test_padding_free_example_runs_at_tiny_size():
    from examples.padding_free import main

    result = main(["--tiny"])
    assert result["padded_error"] < 1e-5
    assert result["static_error"] < 1e-5
    assert result["packed_error"] < 1e-5
    assert result["window_error"] < 1e-5
    assert result["bidirectional_window_error"] < 1e-5
    assert result["experts_error"] < 1e-5
    assert result["real_fraction"] < 0.5


class UnfusedEncoder(nn.Module):
    """Hand-written pre-norm encoder: unfused attention with masked_fill of a key-padding mask, learned positions."""

    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 4, layers: int = 2, max_len: int = 64):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(nn.ModuleDict({"norm": nn.LayerNorm(dim), "qkv": nn.Linear(dim, 3 * dim),
                                                   "proj": nn.Linear(dim, dim), "mlp": nn.Linear(dim, dim)})
                                    for _ in range(layers))
        self.heads = heads

    def forward(self, input_ids, attention_mask):
        b, t = input_ids.shape
        x = self.tok(input_ids) + self.pos(torch.arange(t, device=input_ids.device))
        hidden = ~attention_mask.bool()[:, None, None, :]
        for blk in self.blocks:
            h = blk["norm"](x)
            q, k, v = (z.reshape(b, t, self.heads, -1).permute(0, 2, 1, 3) for z in blk["qkv"](h).chunk(3, dim=-1))
            scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
            scores = scores.masked_fill(hidden, float("-inf"))
            a = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(b, t, -1)
            x = x + blk["proj"](a)
            x = x + torch.relu(blk["mlp"](x))
        return x


def test_hand_written_unfused_encoder_matches_with_gradients():
    torch.manual_seed(0)
    model = UnfusedEncoder().eval()
    om = rewrite.optimize(model, {"passes": ["varlen"]}, example_kwargs=padded_batch(64, [4, 7, 2], 7, left={1}))
    batch = padded_batch(64, [11, 1, 5, 8], 11, seed=10)
    mask = batch["attention_mask"]
    got = om(**batch)
    want = model(**batch)
    assert_real_tokens_close(got, want, mask)
    got_grads, want_grads = parameter_grads(om, got, mask), parameter_grads(model, want, mask)
    for key, g in want_grads.items():
        torch.testing.assert_close(got_grads[key], g, atol=1e-5, rtol=1e-4)


def torch_encoder_and_batch() -> tuple[nn.Module, rewrite.OptimizedModule, torch.Tensor, torch.Tensor]:
    """nn.TransformerEncoder, its varlen module, and a batch (x, key padding mask: True = padding)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    pad = torch.tensor([[0, 0, 0, 0, 0, 1, 1], [0] * 7, [1, 1, 0, 0, 0, 0, 0]]).bool()
    om = rewrite.optimize(model, {"passes": ["varlen"]}, example_inputs=(torch.randn(3, 7, 32),),
                          example_kwargs={"src_key_padding_mask": pad})
    x = torch.randn(4, 9, 32)
    pad = torch.zeros(4, 9, dtype=torch.bool)
    pad[0, 5:], pad[2, :3], pad[3, 1:] = True, True, True
    return model, om, x, pad


def test_torch_transformer_encoder_with_key_padding_mask():
    model, om, x, pad = torch_encoder_and_batch()
    assert "True = padding" in om.report.summary()
    got, want = om(x, src_key_padding_mask=pad), model(x, src_key_padding_mask=pad)
    assert_real_tokens_close(got, want, ~pad)
    grads = torch.autograd.grad((got * (~pad)[..., None]).sum(), list(model.parameters()))
    want_grads = torch.autograd.grad((want * (~pad)[..., None]).sum(), list(model.parameters()))
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def _other_family(name: str) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                 attn_implementation="sdpa")
    if name == "opt":  # positions counted from the mask with cumsum
        return transformers.OPTModel(transformers.OPTConfig(ffn_dim=128, word_embed_proj_dim=64, **small)).eval()
    if name == "phi3":
        return transformers.Phi3Model(transformers.Phi3Config(intermediate_size=128, num_key_value_heads=2,
                                                              pad_token_id=0, **small)).eval()
    return transformers.RobertaModel(transformers.RobertaConfig(intermediate_size=128, max_position_embeddings=64,
                                                                **small)).eval()


@pytest.mark.parametrize("name", ["opt", "phi3"])
def test_families_the_pass_was_not_written_around(name):
    model = _other_family(name)
    om = rewrite.optimize(model, {"passes": ["varlen"]}, example_kwargs=padded_batch(128, [4, 6, 2], 6, left={1}))
    batch = padded_batch(128, [3, 10, 1, 7], 10, left={0, 3}, seed=11)
    with torch.no_grad():
        got, want = om(**batch).last_hidden_state, model(**batch, use_cache=False).last_hidden_state
    assert_real_tokens_close(got, want, batch["attention_mask"])


def roberta_batch(pad: int, lengths: list[int], max_len: int, left: set[int] = frozenset(), seed: int = 0):
    """A padded batch whose padded positions hold the pad token, as a RoBERTa tokenizer pads."""
    batch = padded_batch(128, lengths, max_len, left=left, seed=seed)
    batch["input_ids"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, pad)
    return batch


@pytest.fixture(scope="module")
def roberta():
    """RoBERTa (positions: padding_idx + cumsum(input_ids != padding_idx)) and its varlen module."""
    model = _other_family("roberta")
    pad = model.config.pad_token_id
    om = rewrite.optimize(model, {"passes": ["varlen"]}, example_kwargs=roberta_batch(pad, [4, 6, 2], 6, left={1}))
    return model, om, pad


@pytest.mark.parametrize("left", [set(), {0, 3}], ids=["right", "left"])
def test_roberta_positions_counted_from_token_values_match_with_gradients(roberta, left):
    model, om, pad = roberta
    summary = om.report.summary()
    assert "cumsum (embeddings): cumsum per sequence" in summary
    assert "checked at run time: cumsum (embeddings): to(ne(input_ids, 1), torch.int32) is 0 at padding" in summary
    batch = roberta_batch(pad, [3, 10, 1, 7], 10, left=left, seed=11)
    batch["input_ids"][1, 4] = pad  # a real token that happens to be the pad token: both count it the same way
    mask = batch["attention_mask"]
    got, want = om(**batch).last_hidden_state, model(**batch, use_cache=False).last_hidden_state
    assert_real_tokens_close(got, want, mask)
    got_grads, want_grads = parameter_grads(om, got, mask), parameter_grads(model, want, mask)
    assert got_grads.keys() == want_grads.keys()
    for key, g in want_grads.items():
        if g is None:
            assert got_grads[key] is None or not got_grads[key].any(), key
            continue
        torch.testing.assert_close(got_grads[key], g, atol=1e-5, rtol=1e-4, msg=lambda m, k=key: f"{k}: {m}")


def test_roberta_checks_at_run_time_that_padding_holds_the_pad_token(roberta):
    model, om, pad = roberta
    batch = roberta_batch(pad, [3, 6, 5], 6, left={0}, seed=12)
    batch["input_ids"][1, :] = torch.randint(2, 128, (6,))  # a full row: no padding to check
    with torch.no_grad():
        bad = dict(batch, input_ids=batch["input_ids"].clone())
        bad["input_ids"][2, 5] = 7  # after the row's last real token: counts nowhere, so it is accepted
        assert_real_tokens_close(om(**bad).last_hidden_state, model(**bad, use_cache=False).last_hidden_state,
                                 bad["attention_mask"])
        bad["input_ids"][0, 1] = 7  # before row 0's real tokens: the padded model shifts every position after it
        with pytest.raises(ValueError, match=r"Row 0, position 1 is padding .*input_ids = 7.*pass position_ids"):
            om(**bad)


def test_roberta_verify_passes_on_real_tokens():
    model = _other_family("roberta")
    batch = roberta_batch(model.config.pad_token_id, [5, 2, 7], 7, left={1})
    om = rewrite.optimize(model, {"passes": ["varlen"]}, example_kwargs=batch, verify=True)
    assert om.verification.passed
    assert not any("position_ids" in note for note in om.verification.notes)  # counted per row by the model itself


class CountsHiddenValues(nn.Module):
    """Positions counted from a learned gate over the tokens: not an element-wise function of the inputs."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(64, dim)
        self.pos = nn.Embedding(64, dim)
        self.gate = nn.Linear(dim, 1)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.heads = heads

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids)
        x = x + self.pos((self.gate(x).squeeze(-1) > 0).long().cumsum(dim=1))
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).split(c, dim=-1))
        return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask[:, None, None, :].bool())


def test_cumsum_of_values_not_zero_at_padding_is_refused_saying_what_is_supported():
    batch = padded_batch(64, [3, 5], 5)
    with pytest.raises(PassError, match=r"node 'cumsum' \(module '<root>'\).*restarts per sequence only when what it "
                                        r"sums is 0 at padding.*\(squeeze.dim\) is not element-wise.*position_ids"):
        rewrite.optimize(CountsHiddenValues().eval(), {"passes": ["varlen"]}, example_kwargs=batch)


def test_plan_kernels_reference_is_used_for_attention():
    model, _ = TARGETS["bert"]()
    batch = padded_batch(128, [3, 5], 5)
    om = rewrite.optimize(model, {"passes": ["varlen"], "kernels": "reference"}, example_kwargs=batch)
    assert "backend = 'reference'" in om.code


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["kernel", "torch"])
def test_gpu_half_precision_bert_and_llama(backend):
    from rewrite.kernels.varlen_attention.torch_backend import torch_varlen_available

    if backend == "torch" and not torch_varlen_available(torch.empty(1, device="cuda", dtype=torch.float16)):
        pytest.skip("this PyTorch has no varlen_attn")
    for name in ("bert", "llama"):
        model, _ = TARGETS[name]()
        model = model.to("cuda", torch.float16)
        batch = {k: v.cuda() for k, v in padded_batch(128, [40, 3, 77, 1], 77, left={1}, seed=12).items()}
        om = rewrite.optimize(model, {"passes": [{"varlen": {"attention_backend": backend}}]}, example_kwargs=batch)
        with torch.no_grad():
            got = main_output(om(**batch)).float()
            want = main_output(reference_output(model, name, batch)).float()
        keep = batch["attention_mask"].bool()
        err = ((got[keep] - want[keep]).norm() / want[keep].norm()).item()
        assert err < 5e-3, f"{name} ({backend}): relative error {err:.2e}"


def test_saved_program_runs_padding_free_without_the_source_model(tmp_path, optimized):
    model, om = optimized["bert"]
    om.save(tmp_path / "bert_varlen")
    loaded = rewrite.load(tmp_path / "bert_varlen")
    batch = padded_batch(128, [2, 8, 5], 8, seed=13)
    with torch.no_grad():
        got, want = loaded(**batch).last_hidden_state, om(**batch).last_hidden_state
    assert_real_tokens_close(got, want, batch["attention_mask"])
    # the saved real-token description (a per-token output and the pooler's rows read at slot 0) comes back, so
    # verify compares the loaded module with the original on what it can: real tokens, rows whose slot 0 is real
    assert loaded.real_tokens == om.real_tokens and any(o.kind == "rows" for o in loaded.real_tokens.outputs.values())
    report = verify(model, loaded, kwargs=padded_batch(128, [2, 8, 5], 8, left={0}, seed=13))
    assert report.passed, report
    assert [o.compared.split(",")[0] for o in report.outputs] == [
        "real tokens", "rows whose slot 0 is a real token (read there from the repadded tensor)"]


def test_training_mode_with_attention_dropout_runs_per_sequence():
    model, _ = TARGETS["bert"]()
    model.train()
    batch = padded_batch(128, [3, 6, 2], 6, seed=14)
    om = rewrite.optimize(model, {"passes": ["varlen"]}, example_kwargs=batch)
    assert "dropout_p = 0.1" in om.code
    out = om(**batch).last_hidden_state
    assert torch.isfinite(out).all()
    grads = parameter_grads(om, out, batch["attention_mask"])
    assert all(g is not None and torch.isfinite(g).all() for name, g in grads.items() if "pooler" not in name)
    om.eval()  # the next call captures again in eval mode: no dropout, one varlen kernel call per layer
    with torch.no_grad():
        got = om(**batch).last_hidden_state
        want = reference_output(model.eval(), "bert", batch).last_hidden_state
    assert "dropout_p" not in om.code
    assert_real_tokens_close(got, want, batch["attention_mask"])


@pytest.mark.parametrize("name", ["bert", "llama"])
@pytest.mark.parametrize("left", [set(), {0, 2}], ids=["right", "left"])
def test_verify_compares_real_tokens_only(name, left):
    model, _ = TARGETS[name]()
    batch = padded_batch(128, [5, 9, 3], 9, left=left)
    om = rewrite.optimize(model, {"passes": ["varlen"]}, example_kwargs=batch, verify=True)
    report = om.verification
    assert report.passed
    assert report.outputs[0].compared == f"real tokens, {int(batch['attention_mask'].sum()) * report.outputs[0].shape[-1]} "\
                                         f"of {batch['input_ids'].numel() * report.outputs[0].shape[-1]} values"
    given_positions = any("the original was given position_ids" in note for note in report.notes)
    assert given_positions == bool(left)  # restarted positions equal the padded model's only on right padding
    if name == "bert":  # the pooler reads slot 0: compared on the rows where that slot is a real token
        first_real = batch["attention_mask"][:, 0].bool()
        hidden = report.outputs[1].shape[-1]
        assert report.outputs[1].compared == (f"rows whose slot 0 is a real token (read there from the repadded "
                                              f"tensor), {int(first_real.sum()) * hidden} of {3 * hidden} values")
        assert bool(first_real.all()) == (not left)


def test_verify_ignores_padded_positions_but_names_a_wrong_real_token(monkeypatch):
    from rewrite.errors import VerificationError
    from rewrite.varlen import runtime

    model, _ = TARGETS["llama"]()
    batch = padded_batch(128, [5, 9, 3], 9, left={2})
    repad = runtime.repad_tokens

    def garbage_at_padding(x, indices, batch_size, seq, *args, **kwargs):
        out = repad(x, indices, batch_size, seq, *args, **kwargs)
        return torch.where(out == 0, torch.full_like(out, 123.0), out)  # what an unpadded model never computes

    monkeypatch.setattr(runtime, "repad_tokens", garbage_at_padding)
    om = rewrite.optimize(model, {"passes": ["varlen"]}, example_kwargs=batch, verify=True)
    assert om.verification.passed and om(**batch).logits[0, 6].eq(123.0).all()

    def wrong_real_token(x, indices, batch_size, seq, *args, **kwargs):
        out = repad(x, indices, batch_size, seq, *args, **kwargs)
        return out.index_put((torch.tensor(2), torch.tensor(8)), out[2, 8] + 0.5)  # row 2's last real token

    monkeypatch.setattr(runtime, "repad_tokens", wrong_real_token)
    with pytest.raises(VerificationError) as info:
        rewrite.optimize(model, {"passes": ["varlen"]}, example_kwargs=batch, verify=True)
    message = str(info.value)
    assert "['logits']" in message and "FAILED" in message
    assert "128 of 2176 compared values out of tolerance, the first at index [2, 8, 0]" in message


def test_verify_names_the_node_after_a_broken_varlen_attention(monkeypatch):
    from rewrite.errors import VerificationError
    from rewrite.varlen import runtime

    model, _ = TARGETS["bert"]()
    attention = runtime.packed_attention

    def off_by_one_token(q, k, v, *args, **kwargs):
        o = attention(q, k, v, *args, **kwargs)
        return o.index_add(2, torch.tensor([7]), torch.ones_like(o[:, :, :1]))  # packed token 7: row 1, position 2

    monkeypatch.setattr(runtime, "packed_attention", off_by_one_token)
    with pytest.raises(VerificationError) as info:
        rewrite.optimize(model, {"passes": ["varlen"]}, example_kwargs=padded_batch(128, [5, 9, 3], 9), verify=True)
    message = str(info.value)
    assert "['last_hidden_state']" in message and "the first at index [1, " in message
    assert ("first divergence: node 'reshape' (aten.reshape, module encoder.layer.0.attention.self) diverges"
            in message)
    assert "added by the passes: off_by_one_token" in message


def test_compile_backend_runs_the_varlen_plan():
    model, _ = TARGETS["bert"]()
    batch = padded_batch(128, [3, 7, 5], 7, left={2}, seed=15)
    compiled = torch.compile(model, backend="rewrite", dynamic=True,
                             options={"plan": {"passes": ["varlen"]}, "inductor": False})
    with torch.no_grad():
        got = compiled(**batch).last_hidden_state
        want = reference_output(model, "bert", batch).last_hidden_state
    assert_real_tokens_close(got, want, batch["attention_mask"])


def test_compile_backend_with_inductor_names_the_dynamo_settings():
    torch._dynamo.reset()
    model, _ = TARGETS["bert"]()
    batch = padded_batch(128, [3, 7, 5], 7, left={2}, seed=15)
    compiled = torch.compile(model, backend="rewrite", dynamic=True, options={"plan": {"passes": ["varlen"]}})
    with pytest.raises(Exception, match=r"capture_dynamic_output_shape_ops = False and "
                                        r"torch._dynamo.config.capture_scalar_outputs = False.*fullgraph=True"):
        with torch.no_grad():
            compiled(**batch)
    torch._dynamo.reset()


@pytest.mark.slow
def test_compile_backend_with_inductor_runs_under_the_dynamo_settings():
    torch._dynamo.reset()
    model, _ = TARGETS["bert"]()
    batch = padded_batch(128, [3, 7, 5], 7, left={2}, seed=15)
    compiled = torch.compile(model, backend="rewrite", dynamic=True, options={"plan": {"passes": ["varlen"]}})
    with torch.no_grad(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True,
                                                     capture_scalar_outputs=True):
        got = compiled(**batch).last_hidden_state
        want = reference_output(model, "bert", batch).last_hidden_state
    assert_real_tokens_close(got, want, batch["attention_mask"])
    torch._dynamo.reset()
