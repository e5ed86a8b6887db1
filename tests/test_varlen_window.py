"""Pass `varlen` on sliding-window masks, causal (Mistral, Qwen2's windowed layers) and bidirectional (ModernBERT's
local layers), against the Hugging Face model.

The mask probe finds each site's window W (the last W keys, the query included), its lookahead A (the next A keys;
0 for a causal window) and whether they are counted between row slots (Hugging Face, over cache positions) or
between real tokens; such sites run `rewrite::sliding_window_attention` with cu_seqlens (and the lookahead). A
window the probe cannot tie to a constant of the mask graph stays refused.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_grads_close, parameter_grads
from test_varlen import padded_batch
from torch import nn

import rewrite
from rewrite.errors import PassError
from rewrite.kernels.sliding_window.reference import visible
from rewrite.varlen import runtime

transformers = pytest.importorskip("transformers")

VOCAB = 128


def build(factory):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return factory().eval()


def _decoder(cls, model_cls, **extra):
    return model_cls(cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, **extra))


def mistral(window: int):
    return _decoder(transformers.MistralConfig, transformers.MistralForCausalLM, sliding_window=window)


def qwen2_mixed(window: int = 4):
    """Layer 0 full causal attention, layers 1 and 2 a sliding window (max_window_layers=1)."""
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=256, use_sliding_window=True, sliding_window=window,
        max_window_layers=1))


def modernbert(local_attention: int = 8):
    """Layer 0 global attention, layers 1 and 2 local: each query sees keys at most local_attention / 2 slots away."""
    return transformers.ModernBertModel(transformers.ModernBertConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, vocab_size=VOCAB,
        global_attn_every_n_layers=3, local_attention=local_attention, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, cls_token_id=1, sep_token_id=2))


def padded(lengths: list[int], width: int, left: set[int] = frozenset(), seed: int = 0) -> dict[str, torch.Tensor]:
    return padded_batch(VOCAB, lengths, width, left=left, seed=seed)


def changed(om: rewrite.OptimizedModule) -> list[str]:
    return [c for r in om.report.results for c in r.changed]


def assert_real_close(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor) -> None:
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("kind", "width"), [("causal", 1), ("causal", 4), ("causal", 8), ("bidirectional", 1),
                                           ("bidirectional", 2), ("bidirectional", 4)])
def test_op_window_sees_what_hugging_face_sees(kind, width):
    """Causal: the op's window=W is the last W keys, the query included (HF's `kv_idx > q_idx - W` with causality).
    Bidirectional: ModernBERT's |q - k| <= w is the op's window w + 1 with lookahead w."""
    from transformers import masking_utils

    length = 12
    q, k = torch.arange(length)[:, None], torch.arange(length)[None, :]
    if kind == "causal":
        fn, window, lookahead = masking_utils.sliding_window_causal_mask_function(width), width, 0
    else:
        fn, window, lookahead = masking_utils.sliding_window_bidirectional_overlay(width), width + 1, width
    hf = fn(torch.tensor(0), torch.tensor(0), q, k).expand(length, length)
    assert torch.equal(visible(length, window, 0, torch.device("cpu"), lookahead=lookahead), hf)


def captured_per_window(factory, windows: tuple[int, ...]) -> dict[int, tuple]:
    """(model, its varlen module captured on a 6-token batch, shorter than the widest window) per window."""
    built = {}
    for window in windows:
        model = build(lambda w=window: factory(w))
        built[window] = (model, rewrite.optimize(model, ["varlen"], example_kwargs=padded([6, 4], 6)))
    return built


WINDOWED_OUTPUT = {"mistral": "logits", "modernbert": "last_hidden_state"}
"""The output each windowed family is compared on."""


@pytest.fixture(scope="module")
def mistral_modules():
    """Mistral with windows 4 and 8."""
    return captured_per_window(mistral, (4, 8))


@pytest.fixture(scope="module")
def modernbert_modules():
    """ModernBERT with local windows 4 and 8 (2 and 4 keys on each side)."""
    return captured_per_window(modernbert, (4, 8))


@pytest.fixture(params=list(WINDOWED_OUTPUT))
def windowed_family(request):
    """(family name, its modules per window), for the checks both window kinds share."""
    return request.param, request.getfixturevalue(f"{request.param}_modules")


def assert_padding_free(model, om, batch: dict[str, torch.Tensor], output: str) -> None:
    """The varlen module matches the model on real tokens and writes zeros at padding."""
    with torch.no_grad():
        got, want = getattr(om(**batch), output), getattr(model(**batch), output)
    assert_real_close(got, want, batch["attention_mask"])
    assert not got[~batch["attention_mask"].bool()].any()


@pytest.mark.parametrize("window", [4, 8])
@pytest.mark.parametrize("left", [set(), {0, 2, 4}], ids=["right", "left"])
def test_mistral_sliding_window_runs_padding_free(mistral_modules, window, left):
    model, om = mistral_modules[window]
    assert all(f"sliding-window ({window} keys)" in c for c in changed(om)) and len(changed(om)) == 2
    # rows longer and shorter than the window, a one-token row, left or right padding
    assert_padding_free(model, om, padded([2, 19, 5, 1, 11], 19, left=left, seed=1), "logits")


def test_sliding_window_gradients_match(windowed_family):
    family, modules = windowed_family
    model, om = modules[4]
    batch = padded([9, 3, 12], 12, left={1}, seed=2)
    mask, output = batch["attention_mask"], WINDOWED_OUTPUT[family]
    got = parameter_grads(om, getattr(om(**batch), output), mask)
    want = parameter_grads(model, getattr(model(**batch), output), mask)
    assert_grads_close(got, want)


def test_window_counted_between_slots_refuses_rows_with_holes_at_run_time(windowed_family):
    """HF counts the window between cache positions: on a row with padding between real tokens that is not the
    window over the packed tokens, so the module checks rows are contiguous."""
    _, om = windowed_family[1][4]
    batch = padded([7, 9], 9, seed=3)
    batch["attention_mask"][1, 3] = 0
    with pytest.raises(ValueError, match="row 1 has padding between real tokens"):
        om(**batch)


def gemma2_unsoftcapped():
    """Gemma 2 without logit softcapping (softcapped, it is refused): layer 0 sliding, layer 1 full."""
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=VOCAB, max_position_embeddings=256, sliding_window=4, attn_logit_softcapping=None,
        final_logit_softcapping=None))


def gemma3_text():
    """Gemma 3 text: local (sliding) layers 0 and 2, global layer 1."""
    return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=VOCAB, max_position_embeddings=256, sliding_window=4, sliding_window_pattern=2))


@pytest.mark.parametrize(("factory", "windowed"), [(qwen2_mixed, [False, True, True]),
                                                   (gemma2_unsoftcapped, [True, False]),
                                                   (gemma3_text, [True, False, True])],
                         ids=["qwen2", "gemma2-no-softcap", "gemma3"])
def test_per_layer_windows_full_causal_and_sliding(factory, windowed):
    model = build(factory)
    om = rewrite.optimize(model, ["varlen"], example_kwargs=padded([6, 4], 6))
    lines = changed(om)
    assert len(lines) == len(windowed)
    for layer, (line, window) in enumerate(zip(lines, windowed)):
        assert f"model.layers.{layer}.self_attn" in line
        assert line.endswith("varlen causal sliding-window (4 keys) attention" if window else "varlen causal attention")
    batch = padded([11, 3, 8], 11, left={2}, seed=4)
    with torch.no_grad():
        got, want = om(**batch).logits, model(**batch).logits
    assert_real_close(got, want, batch["attention_mask"])


WINDOWED_LAYERS = {"mistral": [True, True], "modernbert": [False, True, True]}
"""Which layers of each windowed family's test model have a window (ModernBERT's layer 0 is global)."""


def test_packed_position_ids_keep_the_window_within_each_sequence(windowed_family):
    """Packed sequences (position_ids restarting at 0) attend within their own sequence and window, as running
    them one by one does; ModernBERT builds its local mask over the whole row, not from position_ids."""
    family, modules = windowed_family
    model, _ = modules[4]
    lengths = [3, 9, 6]
    ids = torch.randint(3, VOCAB, (1, sum(lengths)), generator=torch.Generator().manual_seed(5))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        om = rewrite.optimize(model, ["varlen"], example_kwargs={"input_ids": ids, "position_ids": pos})
    assert ["sliding-window" in c for c in changed(om)] == WINDOWED_LAYERS[family]
    lengths = [10, 2, 7, 1, 5]
    ids = torch.randint(3, VOCAB, (1, sum(lengths)), generator=torch.Generator().manual_seed(6))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    output = WINDOWED_OUTPUT[family]
    with torch.no_grad():
        got = getattr(om(input_ids=ids, position_ids=pos), output)
        want = torch.cat([getattr(model(input_ids=part), output) for part in ids.split(lengths, 1)], 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("before", "after", "report"), [
    (2, 0, "varlen causal sliding-window (3 keys) attention"),
    (3, 1, "varlen bidirectional sliding-window (3 keys before, 1 after) attention"),
])
def test_window_counted_between_real_tokens_runs_on_rows_with_holes(before, after, report):
    """Counted between real tokens, a window is token-wise once packed: rows need not be contiguous."""
    model = build(lambda: TokenBand(before, after))
    om = rewrite.optimize(model, ["varlen"], example_kwargs=token_band_batch([5, 3], 6))
    assert changed(om)[0].endswith(report)
    assert runtime.contiguous_rows.__name__ not in om.code
    batch = token_band_batch([7, 9, 2], 9, seed=7)
    batch["attention_mask"][1, 2] = 0
    batch["attention_mask"][1, 5] = 0
    with torch.no_grad():
        got, want = om(**batch), model(**batch)
    assert_real_close(got, want, batch["attention_mask"])


@pytest.mark.parametrize("local", [4, 8])
@pytest.mark.parametrize("left", [set(), {0, 2, 4}], ids=["right", "left"])
def test_modernbert_local_window_runs_padding_free(modernbert_modules, local, left):
    model, om = modernbert_modules[local]
    half = local // 2
    assert changed(om) == [
        "scaled_dot_product_attention (layers.0.attn): varlen bidirectional attention",
        *(f"scaled_dot_product_attention_{i} (layers.{i}.attn): varlen bidirectional sliding-window ({half} keys "
          f"before, {half} after) attention" for i in (1, 2))]
    # rows longer and shorter than the window (local + 1 keys), a one-token row, left or right padding
    assert_padding_free(model, om, padded([2, 19, 5, 1, 11], 19, left=left, seed=1), "last_hidden_state")


def test_modernbert_verify_compares_real_tokens():
    model = build(lambda: modernbert(4))
    om = rewrite.optimize(model, ["varlen"], example_kwargs=padded([9, 4, 7], 9, left={1}), verify=True)
    assert om.verification.passed


def test_packed_window_attention_with_lookahead_agrees_with_per_sequence_sdpa():
    """The op path, the reference backend and the per-sequence SDPA path (taken under attention dropout, here at
    p = 0) apply the same window and lookahead within each sequence."""
    g = torch.Generator().manual_seed(8)
    q = torch.randn(1, 4, 17, 8, generator=g)
    k, v = torch.randn(1, 2, 17, 8, generator=g), torch.randn(1, 2, 17, 8, generator=g)
    cu = torch.tensor([0, 1, 7, 17], dtype=torch.int32)
    kernel = runtime.packed_window_attention(q, k, v, cu, 10, window=3, scale=None, lookahead=2)
    reference = runtime.packed_window_attention(q, k, v, cu, 10, window=3, scale=None, lookahead=2,
                                                backend="reference")
    sdpa = runtime._attention_per_sequence(q, k, v, cu, False, None, 0.0, window=3, lookahead=2)
    torch.testing.assert_close(kernel, reference)
    torch.testing.assert_close(kernel, sdpa, atol=1e-6, rtol=1e-5)


class TokenBand(nn.Module):
    """A window of `before` keys before each query and `after` keys after it, counted between real tokens (positions
    = cumsum(mask) - 1); with `hidden_reach` the bound is a tensor the probe cannot read as a constant."""

    def __init__(self, before: int = 3, after: int = 1, dim: int = 32, heads: int = 4, hidden_reach: bool = False):
        super().__init__()
        self.before, self.after, self.heads, self.hidden_reach = before, after, heads, hidden_reach
        self.register_buffer("reach", torch.tensor(before))
        self.embed = nn.Embedding(64, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids)
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).split(c, dim=-1))
        pos = attention_mask.cumsum(1) - 1
        distance = pos[:, :, None] - pos[:, None, :]  # query - key
        if self.hidden_reach:
            band = distance.abs() <= self.reach
        else:
            band = (distance >= -self.after) & (distance <= self.before)
        mask = band & attention_mask.bool()[:, None, :]
        o = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        return self.out(o.transpose(1, 2).reshape(b, t, c))


def token_band_batch(lengths: list[int], width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    batch = padded(lengths, width, seed=seed)
    batch["input_ids"] %= 64
    return batch


def test_bidirectional_window_the_probe_cannot_prove_is_refused_naming_the_site():
    """|distance| <= a tensor buffer: the probe sees a window of 3 on each side, but the mask graph's only
    window-like constant is the 1 of cumsum(mask) - 1, so nothing says the window is the same on longer rows."""
    with pytest.raises(PassError, match="bidirectional sliding window \\(3 keys before the query, 3 after\\) on "
                                        "the probe, but the window-like constant of its graph is 1") as info:
        rewrite.optimize(build(lambda: TokenBand(hidden_reach=True)), ["varlen"],
                         example_kwargs=token_band_batch([5, 3], 6))
    assert info.value.node == "scaled_dot_product_attention"
    assert info.value.module_path == "<root>"


def test_verify_compares_real_tokens_of_a_windowed_model():
    model = build(lambda: mistral(4))
    om = rewrite.optimize(model, ["varlen"], example_kwargs=padded([9, 4, 7], 9, left={1}), verify=True)
    assert om.verification.passed
