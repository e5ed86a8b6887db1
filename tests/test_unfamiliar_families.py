"""Families the passes were not designed around: each either rewrites correctly (checked against the
Hugging Face model itself) or is refused with an error that names the module and the reason.

Covers interleaved rotary embeddings read from a position table (GPT-J) or built by
repeat_interleave (Cohere), partial rotary (GPT-NeoX, Phi), multi-query attention (Falcon, Gemma), ALiBi (BLOOM), relative position bias (MPNet), logit softcapping
(Gemma 2), a KV cache built inside the forward (XLM), where-selected scores and a window kept in a buffer (GPT-Neo), sliding-window masks wider than the example (Mistral's causal window and ModernBERT's
bidirectional local window run padding-free), and a model with no attention at all.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import stepwise_program_logits
from torch import nn

import rewrite
from rewrite.decode import decode_program
from rewrite.errors import PassError
from rewrite.verify import verify

transformers = pytest.importorskip("transformers")

VOCAB = 128


def _decoder_config(cls, **extra):
    return cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
               max_position_embeddings=256, **extra)


def gptj():
    return transformers.GPTJForCausalLM(transformers.GPTJConfig(
        n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=256, rotary_dim=8, bos_token_id=1,
        eos_token_id=2))


def cohere():
    return transformers.CohereForCausalLM(_decoder_config(transformers.CohereConfig, num_key_value_heads=2,
                                                          bos_token_id=1, eos_token_id=2, pad_token_id=0))


def gpt_neox():
    return transformers.GPTNeoXForCausalLM(_decoder_config(transformers.GPTNeoXConfig, rotary_pct=0.25,
                                                           bos_token_id=1, eos_token_id=2))


def gemma():
    return transformers.GemmaForCausalLM(_decoder_config(transformers.GemmaConfig, num_key_value_heads=1,
                                                         head_dim=16))


def falcon():
    return transformers.FalconForCausalLM(transformers.FalconConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB, multi_query=True,
        new_decoder_architecture=False, bos_token_id=1, eos_token_id=2))


def phi():
    return transformers.PhiForCausalLM(_decoder_config(transformers.PhiConfig, partial_rotary_factor=0.5,
                                                       bos_token_id=1, eos_token_id=2))


def olmo2():
    return transformers.Olmo2ForCausalLM(_decoder_config(transformers.Olmo2Config, num_key_value_heads=2,
                                                         bos_token_id=1, eos_token_id=2, pad_token_id=0))


DECODERS = {"gptj": gptj, "cohere": cohere, "gpt_neox": gpt_neox, "gemma": gemma, "falcon": falcon, "phi": phi,
            "olmo2": olmo2}
"""Decoders with RoPE variants the passes were not written around (interleaved, partial, parallel
blocks, multi-query, QK-norm after the projections)."""


def qwen2_moe():
    """Builds its sliding-window mask next to the full one even where no layer reads it."""
    return transformers.Qwen2MoeForCausalLM(_decoder_config(
        transformers.Qwen2MoeConfig, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=32, bos_token_id=1, eos_token_id=2,
        pad_token_id=0))


def deepseek_v3():
    """Multi-head latent attention (keys assembled in place from a latent and a shared rotary part) and
    experts behind group-limited routing."""
    return transformers.DeepseekV3ForCausalLM(_decoder_config(
        transformers.DeepseekV3Config, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, first_k_dense_replace=1, n_group=1, topk_group=1, bos_token_id=1, eos_token_id=2,
        pad_token_id=0))


def mixtral():
    return transformers.MixtralForCausalLM(_decoder_config(
        transformers.MixtralConfig, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        bos_token_id=1, eos_token_id=2, pad_token_id=0))


def qwen3_moe():
    return transformers.Qwen3MoeForCausalLM(_decoder_config(
        transformers.Qwen3MoeConfig, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, head_dim=16, bos_token_id=1, eos_token_id=2, pad_token_id=0))


MIXTURES = {"qwen2_moe": qwen2_moe, "deepseek_v3": deepseek_v3, "mixtral": mixtral, "qwen3_moe": qwen3_moe}
"""Mixture-of-experts decoders (their experts sort the tokens by expert: token-wise as a module, not op by op)."""


@pytest.mark.parametrize("name", MIXTURES)
def test_mixture_of_experts_decoders_run_padding_free(name):
    model = build(MIXTURES[name])
    om = rewrite.optimize(model, ["varlen"], example_kwargs=right_padded([8, 5], 8))
    assert any("shown token-wise by running them" in m and ".mlp" in m for m in om.report.results[-1].messages)
    batch = right_padded([12, 7, 3], 12)
    with torch.no_grad():
        want, got = model(**batch).logits, om(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MIXTURES)
def test_mixture_of_experts_decoders_generate_like_hugging_face(name):
    """Hugging Face stops at the model's eos id (DeepSeek's greedy continuation here reaches it); so must
    om.generate without being told."""
    model = build(MIXTURES[name])
    prompt = right_padded([9], 9)["input_ids"]
    om = rewrite.optimize(model, ["stateful"], example_kwargs={"input_ids": prompt})
    want = model.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(om.generate(prompt, max_new_tokens=12), want)


def jetmoe():
    """Mixture of attention heads: each token's query heads come from its top-k experts, and the attention output
    is transposed back and viewed per expert, a view only SDPA's output layout ([B, T, H, D] in memory) allows."""
    return transformers.JetMoeForCausalLM(_decoder_config(
        transformers.JetMoeConfig, num_key_value_heads=2, kv_channels=16, num_local_experts=4, num_experts_per_tok=2,
        bos_token_id=1, eos_token_id=2, pad_token_id=0))


def test_fused_decode_ops_keep_the_layout_model_code_views():
    """JetMoe views the attention output where only SDPA's layout allows it: the decode program's fused rotary and
    its cached attention over a padded prompt lay their results out as PyTorch's own ops do, so a ragged batch
    generates each prompt's Hugging Face tokens (a view error before)."""
    model = build(jetmoe)
    prompt = right_padded([9], 9)["input_ids"]
    om = rewrite.optimize(model, ["stateful"], example_kwargs={"input_ids": prompt})
    ids = torch.cat([prompt, torch.cat([torch.zeros(1, 4, dtype=torch.long), prompt[:, :5]], 1)])
    mask = (ids != 0).long()
    mask[0] = 1
    tokens = om.generate(ids, mask, max_new_tokens=6, eos_token_id=[])
    for row, start in ((0, 0), (1, 4)):
        want = model.generate(ids[row:row + 1, start:], max_new_tokens=6, do_sample=False, eos_token_id=None)
        assert torch.equal(tokens[row, start:], want[0])


def bloom():
    return transformers.BloomForCausalLM(transformers.BloomConfig(hidden_size=64, n_layer=2, n_head=4,
                                                                  vocab_size=VOCAB))


def mpnet():
    return transformers.MPNetModel(transformers.MPNetConfig(hidden_size=64, intermediate_size=128,
                                                            num_hidden_layers=2, num_attention_heads=4,
                                                            vocab_size=VOCAB))


def gpt_oss():
    """Learned attention sinks: one extra logit per head concatenated to the scores, dropped after the softmax."""
    return transformers.GptOssForCausalLM(_decoder_config(
        transformers.GptOssConfig, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
        sliding_window=4, layer_types=["sliding_attention", "full_attention"]))


def falcon_alibi():
    """ALiBi folded into the attention mask that SDPA receives."""
    return transformers.FalconForCausalLM(transformers.FalconConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB, alibi=True, bos_token_id=1,
        eos_token_id=2))


def mpt():
    """ALiBi added to the scores of an unfused attention."""
    return transformers.MptForCausalLM(transformers.MptConfig(d_model=64, n_layers=2, n_heads=4, vocab_size=VOCAB,
                                                              max_seq_len=256))


def deberta_v2():
    """Disentangled relative position bias (content-to-position and position-to-content terms)."""
    return transformers.DebertaV2Model(transformers.DebertaV2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
        relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=16, position_biased_input=False))


def deberta_v2_absolute():
    """No relative attention: plain scaled dot product, but as a bmm over batch and heads merged."""
    return transformers.DebertaV2Model(transformers.DebertaV2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
        relative_attention=False, position_biased_input=True))


def gemma2():
    return transformers.Gemma2ForCausalLM(_decoder_config(transformers.Gemma2Config, num_key_value_heads=2,
                                                          head_dim=16))


def mistral_window(window: int):
    return transformers.MistralForCausalLM(_decoder_config(transformers.MistralConfig, num_key_value_heads=2,
                                                           sliding_window=window))


def modernbert():
    """Layer 0 global, layer 1 local: keys at most 4 slots from the query (local_attention 8)."""
    return transformers.ModernBertModel(transformers.ModernBertConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
        global_attn_every_n_layers=2, local_attention=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        cls_token_id=1, sep_token_id=2))


def build(factory):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return factory().eval()


def right_padded(lengths: list[int], width: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (len(lengths), width), generator=g)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_families_run_padding_free(name):
    model = build(DECODERS[name])
    batch = right_padded([12, 7], 12)
    om = rewrite.optimize(model, ["varlen"], example_kwargs=batch)
    with torch.no_grad():
        want, got = model(**batch).logits, om(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_families_generate_like_hugging_face(name):
    model = build(DECODERS[name])
    prompt = right_padded([9], 9)["input_ids"]
    om = rewrite.optimize(model, ["stateful"], example_kwargs={"input_ids": prompt})
    want = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(om.generate(prompt, max_new_tokens=6), want)


@pytest.mark.parametrize(
    ("factory", "plan", "module", "reason"),
    [
        (bloom, [{"mixer": {}}], "transformer.h.0.self_attention", "ALiBi"),
        (bloom, ["varlen"], "transformer.h.0.self_attention", "ALiBi"),
        (bloom, ["stateful"], "transformer.h.0.self_attention", "ALiBi"),
        (mpnet, [{"mixer": {}}], "encoder.layer.0.attention.attn", "relative position bias"),
        (mpnet, ["varlen"], "encoder.layer.0.attention.attn", "relative position bias"),
        (gemma2, ["varlen"], "model.layers.0.self_attn", "softcapping"),
        (gemma2, ["stateful"], "model.layers.0.self_attn", "softcapping"),
        (gpt_oss, [{"mixer": {}}], "model.layers.0.self_attn", "attention sinks"),
        (gpt_oss, ["varlen"], "model.layers.0.self_attn", "attention sinks"),
        (gpt_oss, ["stateful"], "model.layers.0.self_attn", "attention sinks"),
        (falcon_alibi, [{"mixer": {}}], "transformer.h.0.self_attention", "differs per head \\(ALiBi"),
        (falcon_alibi, ["varlen"], "transformer.h.0.self_attention", "differs per head \\(ALiBi"),
        (falcon_alibi, ["stateful"], "transformer.h.0.self_attention", "differs per head \\(ALiBi"),
        (mpt, [{"mixer": {}}], "transformer.blocks.0.attn", "differs per head is added to q @ k\\^T \\(ALiBi"),
        (deberta_v2, [{"mixer": {}}], "encoder.layer.0.attention.self", "relative position bias"),
        (deberta_v2_absolute, [{"mixer": {}}], "encoder.layer.0.attention.self",
         "3-d bmm over batch and heads merged and reshaped to 4-d scores"),
        (deberta_v2_absolute, ["varlen"], "encoder.layer.0.attention.self", "batch and heads merged"),
    ],
    ids=["bloom-mixer", "bloom-varlen", "bloom-stateful", "mpnet-mixer", "mpnet-varlen", "gemma2-varlen",
         "gemma2-stateful", "gpt_oss-mixer", "gpt_oss-varlen", "gpt_oss-stateful", "falcon_alibi-mixer",
         "falcon_alibi-varlen", "falcon_alibi-stateful", "mpt-mixer", "deberta_v2-mixer",
         "deberta_v2_absolute-mixer", "deberta_v2_absolute-varlen"],
)
def test_unsupported_attention_is_refused_naming_the_module(factory, plan, module, reason):
    model = build(factory)
    batch = right_padded([8, 5], 8)
    with pytest.raises(PassError, match=reason) as info:
        rewrite.optimize(model, plan, example_kwargs=batch)
    assert info.value.module_path == module
    assert "Supported attention forms" in str(info.value)


def test_normalize_reports_the_attention_it_leaves():
    om = rewrite.optimize(build(bloom), ["attention_normalize"], example_kwargs=right_padded([8, 5], 8))
    assert om.report.results[-1].changed == []
    assert any("transformer.h.0.self_attention" in m and "ALiBi" in m for m in om.report.results[-1].messages)


def test_mixer_on_a_model_without_attention_is_refused():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    with pytest.raises(PassError, match="found no attention to replace"):
        rewrite.optimize(model, [{"mixer": {}}], (torch.randn(2, 5, 16),))


def test_window_longer_than_the_example_is_not_taken_for_causal():
    """A sliding window of 8 cannot be seen on a 6-token example; normalizing attention must keep it."""
    model = build(lambda: mistral_window(8))
    om = rewrite.optimize(model, ["attention_normalize"], example_kwargs={"input_ids": torch.randint(3, VOCAB, (2, 6))})
    assert all("mask kept" in c and "at least 10 tokens" in c for c in om.report.results[-1].changed)
    longer = torch.randint(3, VOCAB, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(om(input_ids=longer).logits, model(input_ids=longer).logits, atol=1e-5, rtol=1e-5)
    # a linear mixer cannot carry the window: refused now, not at the first input longer than the window
    with pytest.raises(PassError, match=r"layer 0 .*offsets positions by up to 8.*`layers` selector"):
        rewrite.optimize(model, [{"mixer": {}}], example_kwargs={"input_ids": torch.randint(3, VOCAB, (2, 6))})


def test_varlen_sees_windows_wider_than_the_example():
    """A causal window of 8 on a 6-token example: the long probe finds it, and sites run sliding-window attention
    (tests/test_varlen_window.py checks those in detail); so does ModernBERT's bidirectional local window (4 keys
    on each side), which runs the sliding-window kernel with a lookahead."""
    model = build(lambda: mistral_window(8))
    om = rewrite.optimize(model, ["varlen"], example_kwargs=right_padded([6, 4], 6))
    batch = right_padded([20, 9], 20)
    with torch.no_grad():
        want, got = model(**batch).logits, om(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    model = build(modernbert)
    om = rewrite.optimize(model, ["varlen"], example_kwargs=right_padded([6, 4], 6), verify=True)
    assert om.verification.passed
    assert om.report.results[-1].changed[1].endswith("sliding-window (4 keys before, 4 after) attention")
    batch = right_padded([20, 9, 3], 20)
    with torch.no_grad():
        want, got = model(**batch).last_hidden_state, om(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


def test_shared_layer_calls_are_named_apart():
    """ALBERT runs one layer module for every layer: each call is its own site and the report says which."""
    model = build(lambda: transformers.AlbertModel(transformers.AlbertConfig(
        embedding_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=VOCAB)))
    om = rewrite.optimize(model, [{"mixer": {}}], example_kwargs=right_padded([8, 5], 8))
    changed = next(r for r in om.report.results if r.name == "mixer").changed
    assert [c.split(": ")[0].rsplit(", ", 1)[-1] for c in changed] == ["call 1 of 2)", "call 2 of 2)"]


class _HandwrittenAttention(nn.Module):
    """Self-attention as people write it by hand: einsum scores, or matmul scores with softmax in float32."""

    def __init__(self, form: str, dim: int = 32, heads: int = 4):
        super().__init__()
        self.form, self.heads = form, heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        keep = mask[:, None, None, :].bool()
        if self.form == "einsum":
            scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / (dim // self.heads) ** 0.5
            o = torch.einsum("bhqk,bhkd->bhqd", scores.masked_fill(~keep, float("-inf")).softmax(-1), v)
        else:
            scores = (q @ k.transpose(-1, -2)) * (dim // self.heads) ** -0.5 + (1.0 - keep.to(q.dtype)) * -1e9
            o = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v
        return self.out(o.transpose(1, 2).reshape(batch, length, dim))


class _HandwrittenEncoder(nn.Module):
    def __init__(self, form: str, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.layers = nn.ModuleList([_HandwrittenAttention(form) for _ in range(layers)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = x + layer(x, attention_mask)
        return x


@pytest.mark.parametrize("form", ["einsum", "float32_softmax"])
def test_handwritten_attention_forms_are_found_and_rewritten(form):
    model = build(lambda: _HandwrittenEncoder(form))
    batch = right_padded([10, 6], 10)
    normalized = rewrite.optimize(model, ["attention_normalize"], example_kwargs=batch, verify=True)
    assert len(normalized.report.results[-1].changed) == 2
    om = rewrite.optimize(model, ["varlen"], example_kwargs=batch)
    other = right_padded([7, 12, 3], 12)
    with torch.no_grad():
        want, got = model(**other), om(**other)
    real = other["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    linear = rewrite.optimize(model, [{"mixer": {}}], example_kwargs=batch)
    assert [c.split(": ")[1] for c in linear.report.results[-1].changed] == ["bidirectional", "bidirectional"]


class _TokensFirstEinsum(nn.Module):
    """Heads kept in [batch, L, heads, D] and scores by einsum('bqhd,bkhd->bhqk'): not a layout a site can take."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, self.heads, 3, dim // self.heads).unbind(3)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * (dim // self.heads) ** -0.5
        scores = scores.masked_fill(~mask[:, None, None, :].bool(), float("-inf"))
        return self.out(torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(batch, length, dim))


def test_einsum_in_another_layout_is_refused_naming_the_equation():
    """The refusal said the scores did not come from a matmul at all; it names the einsum and the layout now."""
    model = build(lambda: _HandwrittenEncoder("einsum"))
    model.layers = nn.ModuleList([_TokensFirstEinsum() for _ in range(2)])
    batch = right_padded([8, 5], 8)
    normalized = rewrite.optimize(model, ["attention_normalize"], example_kwargs=batch, verify=True)
    assert any("layers.0: the scores are einsum('bqhd,bkhd->bhqk')" in m for m in normalized.report.results[-1].messages)
    for plan in ([{"mixer": {}}], ["varlen"]):
        with pytest.raises(PassError, match=r"einsum\('bqhd,bkhd->bhqk'\).*\[batch, heads, L, D\]") as info:
            rewrite.optimize(model, plan, example_kwargs=batch)
        assert info.value.module_path == "layers.0"


def test_mixer_on_blocks_without_attention_is_refused():
    model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(3)])
    with pytest.raises(PassError, match="found no attention to replace in the selected layers"):
        rewrite.optimize(model, [{"mixer": {}}], (torch.randn(2, 5, 16),))


class _CappedExperts(nn.Module):
    """Top-1 experts that take at most `capacity` tokens each, in token order (Switch-style): a token's
    output depends on how many earlier tokens chose its expert, so the block is not token-wise."""

    def __init__(self, dim: int = 32, experts: int = 2, capacity: int = 3):
        super().__init__()
        self.gate = nn.Linear(dim, experts)
        self.experts = nn.ModuleList([nn.Linear(dim, dim) for _ in range(experts)])
        self.capacity = capacity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        choice = self.gate(flat).argmax(-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            chosen = choice == e
            kept = chosen & (torch.cumsum(chosen.long(), 0) <= self.capacity)
            out = out + kept[:, None] * expert(flat)
        return out.reshape(x.shape)


class _IndexedExperts(nn.Module):
    """Top-1 experts dispatched through an index built from the token count (arange), then index_add."""

    def __init__(self, dim: int = 32, experts: int = 2):
        super().__init__()
        self.gate = nn.Linear(dim, experts)
        self.experts = nn.ModuleList([nn.Linear(dim, dim) for _ in range(experts)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        token = torch.arange(flat.shape[0], device=x.device).repeat_interleave(1)
        choice = self.gate(flat).argmax(-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            chosen = token[choice == e]
            out = out.index_add(0, chosen, expert(flat[chosen]))
        return out.reshape(x.shape)


class _MoeEncoder(nn.Module):
    def __init__(self, moe: nn.Module | None = None):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.attn = _HandwrittenAttention("einsum")
        self.moe = moe if moe is not None else _CappedExperts()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        x = x + self.moe(x)
        return x + self.attn(x, attention_mask)


@pytest.mark.parametrize("capacity", [3, 16], ids=["below-the-probe-batch", "above-it"])
def test_experts_with_a_capacity_are_refused_naming_the_module(capacity):
    model = build(lambda: _MoeEncoder(_CappedExperts(capacity=capacity)))
    with pytest.raises(PassError, match="moe: (a token's output changes|copies of one token)") as info:
        rewrite.optimize(model, ["varlen"], example_kwargs=right_padded([8, 5], 8))
    assert info.value.module_path == "moe"


def test_experts_dispatched_through_a_token_index_run_padding_free():
    """The index is built from the token count alone (arange), before the op no rule covers."""
    model = build(lambda: _MoeEncoder(_IndexedExperts()))
    om = rewrite.optimize(model, ["varlen"], example_kwargs=right_padded([8, 5], 8))
    assert any(m.endswith("shown token-wise by running them: moe") for m in om.report.results[-1].messages)
    batch = right_padded([7, 30, 3], 30)  # padding before row 1's tokens in the flat order
    with torch.no_grad():
        want, got = model(**batch), om(**batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


def test_experts_on_packed_sequences_run_per_sequence():
    model = build(mixtral)
    lengths = [5, 3, 4]
    ids = torch.randint(3, VOCAB, (1, sum(lengths)), generator=torch.Generator().manual_seed(1))
    om = rewrite.optimize(model, ["varlen"], example_kwargs={
        "input_ids": ids, "position_ids": torch.cat([torch.arange(n) for n in lengths])[None]})
    lengths = [9, 2, 6, 1]
    ids = torch.randint(3, VOCAB, (1, sum(lengths)), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = om(input_ids=ids, position_ids=torch.cat([torch.arange(n) for n in lengths])[None]).logits
        want = torch.cat([model(input_ids=part).logits for part in ids.split(lengths, 1)], 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


class _MeanShift(nn.Module):
    """Mixes a small share of the mean over the tokens into each token."""

    def __init__(self, share: float):
        super().__init__()
        self.share = share
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return self.scale * (x + self.share * x.mean(1, keepdim=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_module_probe_tells_token_wise_from_token_mixing(dtype):
    from rewrite.varlen.module_probe import tokenwise_reason

    def reason(module):
        return tokenwise_reason(module.to(dtype), 8)

    assert reason(nn.Sequential(nn.Linear(8, 8), nn.GELU())) is None
    assert reason(_IndexedExperts(8)) is None
    assert reason(_CappedExperts(8, capacity=2)) == "a token's output changes with the other tokens it runs with"
    assert reason(_CappedExperts(8, capacity=64)).startswith("copies of one token get different outputs")
    assert reason(_MeanShift(1.0)) == "its outputs change when the batch's rows are packed into one row"
    assert reason(_MeanShift(2e-5 if dtype == torch.float32 else 2e-2)) is not None


def granite_moe():
    """Its forward takes **kwargs instead of use_cache, which the inner model reads from the config."""
    return transformers.GraniteMoeForCausalLM(_decoder_config(
        transformers.GraniteMoeConfig, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        bos_token_id=1, eos_token_id=2, pad_token_id=0))


def xlm():
    """Builds a KV cache in every forward (concatenating empty tensors to the keys) and hides scores with an in-place
    masked_fill_ of a mask expanded to the scores' shape."""
    config = transformers.XLMConfig(vocab_size=VOCAB, emb_dim=64, n_layers=2, n_heads=4, max_position_embeddings=256)
    config._attn_implementation = "eager"
    return transformers.XLMModel(config)


def test_encoder_with_a_cache_made_in_its_forward_runs_padding_free():
    """XLM: the capture drops the empty cache concatenations and makes the in-place fill out of place; padding-free
    (its mask input named: the mask graph also reads input_ids) equals the model on real tokens, verify passes, and a
    bidirectional mixer replaces both layers; not naming the mask input is refused naming the plan field."""
    from rewrite.capture import capture

    model = build(xlm)
    example = right_padded([8, 5], 8)
    graph = capture(model, (), example, cache=False).graph_module.graph
    assert not [n for n in graph.nodes if "cat" in str(n.target) or "masked_fill_" in str(n.target)]
    with pytest.raises(PassError, match=r"passes\[0\]\.varlen\.mask_input"):
        rewrite.optimize(model, ["varlen"], example_kwargs=example)
    plan = [{"varlen": {"mask_input": "attention_mask"}}]
    om = rewrite.optimize(model, plan, example_kwargs=example, verify=True)
    batch = right_padded([12, 7], 12)
    with torch.no_grad():
        want, got = model(**batch).last_hidden_state, om(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    mixed = rewrite.optimize(model, [{"mixer": {}}], example_kwargs=example)
    assert [c.split(": ")[-1] for c in mixed.report.results[0].changed] == ["bidirectional"] * 2


def gpt_neo():
    """Eager attention only: causality by where(causal table, scores, lowest) then the additive padding mask; its local
    layers keep their window in the [N, N] table (a constant buffer), not in the mask graph's arithmetic."""
    config = transformers.GPTNeoConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, window_size=4,
                                       attention_types=[[["global", "local"], 1]], max_position_embeddings=256,
                                       bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "eager"
    return transformers.GPTNeoForCausalLM(config)


def test_gpt_neo_runs_padding_free_linearizes_its_global_layer_and_decodes_with_its_window():
    """The capture reads GPT-Neo's where-then-add scores as scores + mask (they used to be refused naming the form); the
    local layer's window (4) comes from the buffer: attention_normalize takes both layers (verify on), padding-free equals the model on real tokens of rows longer than the window (verify on), a mixer takes
    the global layer and refuses the local one naming it, and generate() keeps the local layer's window (read from
    window_size / attention_layers) and decodes as Hugging Face's greedy search past the window."""
    model = build(gpt_neo)
    example = right_padded([8, 5], 8)
    captured = rewrite.optimize(model, [], example_kwargs=example)  # the rewritten scores, nothing else
    left = right_padded([12, 7], 12)
    left["attention_mask"] = left["attention_mask"].flip(1)
    with torch.no_grad():  # every position, padded query rows included, bit for bit
        assert torch.equal(captured(**left).logits, model(**left).logits)
    normalized = rewrite.optimize(model, ["attention_normalize"], example_kwargs=example, verify=True)
    assert normalized.report.results[0].changed and len(normalized.report.results[0].changed) == 2
    om = rewrite.optimize(model, ["varlen"], example_kwargs=example, verify=True)
    batch = right_padded([12, 7], 12)
    with torch.no_grad():
        want, got = model(**batch).logits, om(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    with pytest.raises(PassError, match=r"layer 1 .*hides earlier keys") as info:
        rewrite.optimize(model, [{"mixer": {}}], example_kwargs=example)
    assert info.value.module_path == "transformer.h.1.attn.attention"
    mixed = rewrite.optimize(model, [{"mixer": {"layers": [0]}}], example_kwargs=example)
    mixed.eval()
    assert len(mixed.report.results[0].changed) == 1
    decoding = rewrite.optimize(model, ["stateful"], example_kwargs=example)
    prompt = right_padded([9], 9)["input_ids"]
    want = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(decoding.generate(prompt, max_new_tokens=6), want)
    # the torch.compile backend rewrites the scores as the capture does and reads the window from the buffer, which
    # arrives there as a graph input: a mixer on every layer is refused naming the local one, on the global one it runs
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="rewrite", dynamic=True, options={"plan": [{"mixer": {}}], "inductor": False})
    with pytest.raises(Exception, match=r"layer 1 .*hides earlier keys"):
        compiled(input_ids=example["input_ids"], use_cache=False)
    torch._dynamo.reset()
    plan = [{"mixer": {"layers": [0]}}]
    compiled = torch.compile(model, backend="rewrite", dynamic=True, options={"plan": plan, "inductor": False})
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=example["input_ids"], use_cache=False).logits,
                                   mixed(input_ids=example["input_ids"]).logits, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


def jamba():
    """Mamba layers whose reference selective scan loops over the tokens in Python: the capture fixes the length."""
    return transformers.JambaForCausalLM(_decoder_config(
        transformers.JambaConfig, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, expert_layer_period=2,
        expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8, mamba_d_conv=4,
        mamba_expand=2, mamba_dt_rank=8, bos_token_id=1, eos_token_id=2, pad_token_id=0))


def assert_padding_free_matches(model: torch.nn.Module) -> None:
    """`varlen` on right-padded prompts gives the model's logits on the real tokens of a batch of other lengths."""
    om = rewrite.optimize(model, ["varlen"], example_kwargs=right_padded([8, 5], 8))
    batch = right_padded([12, 7], 12)
    with torch.no_grad():
        want, got = model(**batch).logits, om(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


def test_model_taking_kwargs_is_captured_without_its_cache(tmp_path):
    """GraniteMoE's forward takes no use_cache (its inner model reads the config's): the capture switches the config's
    off and restores it; `verify` calls the original the same way (so it returns no cache the optimized module
    lacks), also after a save / load round trip, and on left-padded rows compares real tokens only."""
    model = build(granite_moe)
    assert_padding_free_matches(model)
    assert model.config.use_cache  # restored after the capture
    example = right_padded([8, 5], 8)
    example["attention_mask"] = example["attention_mask"].flip(1)  # left padding: positions restart per row
    om = rewrite.optimize(model, ["varlen"], example_kwargs=example, verify=True)
    with torch.no_grad():
        assert "cache" in model(**example) or "past_key_values" in model(**example)  # what verify must not compare
    report = verify(model, om, kwargs=example)
    assert report.passed and [c.path for c in report.outputs] == ["['logits']"]
    assert report.outputs[0].compared.startswith("real tokens")
    om.save(tmp_path / "granite")
    assert verify(model, rewrite.load(tmp_path / "granite"), kwargs=example).passed
    assert model.config.use_cache


def test_a_length_fixed_by_the_capture_is_captured_again_or_refused():
    """The mixer module captures again for another length; padding-free and decode programs, which need any
    length, are refused saying why."""
    model = build(jamba)
    om = rewrite.optimize(model, [{"mixer": {}}], example_kwargs=right_padded([8, 5], 8))
    with torch.no_grad():
        assert om(**right_padded([12, 7], 12)).logits.shape[1] == 12
    with pytest.raises(PassError, match="the model fixed the length while being captured"):
        rewrite.optimize(model, ["varlen"], example_kwargs=right_padded([8, 5], 8))
    stateful = rewrite.optimize(model, ["stateful"], example_kwargs=right_padded([8, 5], 8))
    with pytest.raises(rewrite.RewriteError, match="the capture fixed the token dim"):
        stateful.generate(right_padded([9], 9)["input_ids"], max_new_tokens=2)


def cohere2():
    """Sliding-window layers alternating with full-attention layers."""
    return transformers.Cohere2ForCausalLM(_decoder_config(
        transformers.Cohere2Config, num_key_value_heads=2, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], bos_token_id=1, eos_token_id=2, pad_token_id=0))


def test_alternating_window_layers_keep_their_window_while_full_layers_are_linearized():
    """The window layer is refused by a linear mixer when `optimize` runs, with or without `stateful` (before, only the
    first call or generate's prefill refused it), saying how to leave it out, while a packed example's block-diagonal
    causal mask on the full layer is not taken for a window (it asks for varlen, which carries it); left out, the window layer decodes from a ring KV cache next to the
    linearized full layer, token by token as the full forward predicts."""
    model = build(cohere2)
    example = right_padded([8, 5], 8)
    for plan in ([{"mixer": {}}], [{"mixer": {}}, "stateful"]):
        with pytest.raises(PassError, match=r"layer 0 .*hides earlier keys of a query's own sequence.*Leave this layer "
                                            r"out with the mixer's `layers` selector") as info:
            rewrite.optimize(model, plan, example_kwargs=example)
        assert info.value.module_path == "model.layers.0.self_attn"
    packed = {"input_ids": right_padded([8], 8)["input_ids"],
              "position_ids": torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1]])}  # two sequences in one row
    with pytest.raises(PassError, match=r"layer 0 .*hides earlier keys"):
        rewrite.optimize(model, [{"mixer": {}}], example_kwargs=packed)
    with pytest.raises(PassError, match=r"layer 1 .*packs several sequences into one row.*add one of varlen"):
        rewrite.optimize(model, [{"mixer": {"layers": [1]}}], example_kwargs=packed)  # block-diagonal, not a window
    full_layer = rewrite.optimize(model, [{"mixer": {"layers": [1]}}, "varlen"], example_kwargs=packed)
    assert [c.split(": ")[-1] for c in full_layer.report.results[0].changed] == ["gla"]
    linear = rewrite.optimize(model, [{"mixer": {"layers": [1]}}], example_kwargs=example)
    decoding = rewrite.optimize(model, [{"mixer": {"layers": [1]}}, "stateful"], example_kwargs=example)
    decoding.load_state_dict(linear.state_dict())
    prompt = right_padded([9], 9)["input_ids"]
    tokens = decoding.generate(prompt, max_new_tokens=6, eos_token_id=[])
    with torch.no_grad():
        logits = linear(input_ids=tokens).logits
    assert torch.equal(logits[:, prompt.shape[1] - 1:-1].argmax(-1), tokens[:, prompt.shape[1]:])


def test_experts_in_training_mode_run_padding_free_with_the_same_gradients():
    """Padding-free fine-tuning: the probe judges the expert block by its eval-mode function (dropout and router
    noise act per token); outputs and gradients at real tokens match the padded model in training mode."""
    model = build(mixtral).train()
    om = rewrite.optimize(model, ["varlen"], example_kwargs=right_padded([8, 5], 8))
    assert any("shown token-wise by running them" in m for m in om.report.results[-1].messages)
    batch = right_padded([12, 7, 3], 12)
    real = batch["attention_mask"].bool()
    weight = torch.randn(*real.shape, VOCAB, generator=torch.Generator().manual_seed(3)) * real[..., None]
    grads = []
    for module in (model, om):
        model.zero_grad()
        out = module(**batch).logits
        (out * weight).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, atol=1e-4, rtol=1e-4, msg=name)


def gemma3():
    """A sliding-window layer next to a full-attention one."""
    return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=VOCAB, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        bos_token_id=1, eos_token_id=2, pad_token_id=0))


@pytest.mark.parametrize("factory", [gemma3, cohere2], ids=["gemma3", "cohere2"])
def test_padding_free_module_also_generates_like_hugging_face(factory):
    """A plan with varlen and stateful: the forward runs padding-free, generate() decodes each prompt as Hugging
    Face does on it alone (the decode program keeps sequences apart itself and leaves varlen out)."""
    model = build(factory)
    om = rewrite.optimize(model, ["varlen", "stateful"], example_kwargs=right_padded([8, 5], 8))
    batch = right_padded([12, 7], 12)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(om(**batch).logits[real], model(**batch).logits[real], atol=1e-5, rtol=1e-5)
    out = om.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=6, eos_token_id=[])
    for row, length in enumerate([12, 7]):
        alone = model.generate(batch["input_ids"][row:row + 1, :length], max_new_tokens=6, do_sample=False,
                               eos_token_id=None)
        assert torch.equal(out[row, -6:], alone[0, length:])


def granite():
    """Multipliers on the embeddings, the attention scale, the residuals and the logits."""
    return transformers.GraniteForCausalLM(_decoder_config(
        transformers.GraniteConfig, num_key_value_heads=2, embedding_multiplier=2.0, attention_multiplier=0.3,
        residual_multiplier=0.5, logits_scaling=4.0, bos_token_id=1, eos_token_id=2))


def olmo():
    """q / k / v clipped after the fused projection."""
    return transformers.OlmoForCausalLM(_decoder_config(transformers.OlmoConfig, num_key_value_heads=2, clip_qkv=2.0,
                                                        bos_token_id=1, eos_token_id=2))


def persimmon():
    """Fused q / k / v per head, QK layer norm, partial rotary."""
    return transformers.PersimmonForCausalLM(_decoder_config(transformers.PersimmonConfig, partial_rotary_factor=0.5,
                                                             bos_token_id=1, eos_token_id=2))


def codegen():
    """Interleaved rotary embedding on a fused, head-permuted q / k / v projection."""
    return transformers.CodeGenForCausalLM(transformers.CodeGenConfig(
        n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=256, n_ctx=256, rotary_dim=8, bos_token_id=1,
        eos_token_id=2))


def falcon_gqa():
    """Falcon's new decoder architecture: grouped q / k / v in one projection, rotary."""
    return transformers.FalconForCausalLM(transformers.FalconConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB, new_decoder_architecture=True,
        num_kv_heads=2, bos_token_id=1, eos_token_id=2))


PROBED_DECODERS = {"granite": granite, "olmo": olmo, "persimmon": persimmon, "codegen": codegen,
                   "falcon_gqa": falcon_gqa}
"""Decoders whose attention differs from Llama's in what sits between the projections and the site (StableLM and
Starcoder2 were probed too and behave as Llama does; they are not repeated here)."""


@pytest.mark.parametrize("name", PROBED_DECODERS)
def test_probed_decoders_linearize_decode_and_run_padding_free(name):
    """Layer 0 linearized (gla), layer 1 softmax: prefill + one step per token equals the full forward; the padding-free
    module equals the padded one on real tokens; routers that skip nothing leave the model exactly as it was."""
    from rewrite.decode import decode_program

    model = build(PROBED_DECODERS[name])
    plan = [{"mixer": {"kind": "gla", "layers": [0]}}]
    example = right_padded([8, 5], 8)
    linear = rewrite.optimize(model, plan, example_kwargs=example)
    assert [c.split(": ")[-1] for c in linear.report.results[-1].changed] == ["gla"]
    ids = right_padded([10, 10], 10)["input_ids"]
    program = decode_program(linear)
    state = program.new_state(2, 10)
    steps = []
    for start, stop in [(0, 3), *((t, t + 1) for t in range(3, 10))]:
        state.begin(stop - start)
        steps.append(program(ids[:, start:stop], torch.arange(start, stop).expand(2, -1), state))
        state.advance()
    batch = right_padded([12, 7], 12)
    real = batch["attention_mask"].bool()
    packed = rewrite.optimize(model, [*plan, "varlen"], example_kwargs=example)
    packed.load_state_dict(linear.state_dict())
    routed = rewrite.optimize(model, [{"layer_skip": {"threshold": 1.0}}], example_kwargs=example)
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(steps, 1), linear(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        want = linear(**batch).logits
        assert torch.isfinite(want).all()
        torch.testing.assert_close(packed(**batch).logits[real], want[real], atol=1e-5, rtol=1e-5)
        assert torch.equal(routed(**batch).logits, model(**batch).logits)


def _encoder_config(cls, **extra):
    return cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
               max_position_embeddings=256, **extra)


PROBED_ENCODERS = {
    "roberta": lambda: transformers.RobertaModel(_encoder_config(transformers.RobertaConfig, pad_token_id=1)),
    "distilbert": lambda: transformers.DistilBertModel(transformers.DistilBertConfig(
        dim=64, hidden_dim=128, n_layers=2, n_heads=4, vocab_size=VOCAB, max_position_embeddings=256)),
}
"""RoBERTa counts positions from the token ids; DistilBERT fills its scores with masked_fill (XLM-R and ELECTRA were
probed too and behave as these do)."""


@pytest.mark.parametrize("name", PROBED_ENCODERS)
def test_probed_encoders_linearize_and_run_padding_free(name):
    """Bidirectional mixers in every layer; `verify=True` reports how far that is from the original (the mixer changes
    the function by design) naming the first mixer as where they part; the padding-free linearized module equals the
    padded one on real tokens; routers that skip nothing leave the model exactly as it was."""
    model = build(PROBED_ENCODERS[name])
    example = right_padded([8, 5], 8)
    plan = [{"mixer": {}}]
    linear = rewrite.optimize(model, plan, example_kwargs=example, verify=True)
    assert [c.split(": ")[-1] for c in linear.report.results[-1].changed] == ["bidirectional"] * 2
    report = linear.verification
    assert not report.passed and "bidirectional_mixer" in report.divergence.new_inputs
    assert any("mixer pass changes the model's outputs by design" in note for note in report.notes)
    packed = rewrite.optimize(model, [*plan, "varlen"], example_kwargs=example)
    packed.load_state_dict(linear.state_dict())
    routed = rewrite.optimize(model, [{"layer_skip": {"threshold": 1.0}}], example_kwargs=example)
    batch = right_padded([12, 7, 3], 12)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        want = linear(**batch).last_hidden_state
        torch.testing.assert_close(packed(**batch).last_hidden_state[real], want[real], atol=1e-5, rtol=1e-5)
        assert torch.equal(routed(**batch).last_hidden_state, model(**batch).last_hidden_state)


def test_window_layer_linearized_with_check_masks_off_runs_padding_free():
    """`check_masks: false` drops a window layer's window in the mixer; `varlen` carries that meaning (each sequence
    mixes over its whole prefix, as in the padded module) and says so, where it refused before. With the checks on,
    the plan is refused naming the option that would change it."""
    model = build(cohere2)
    example = right_padded([8, 5], 8)
    with pytest.raises(PassError, match="layer 0 .*`check_masks: false`"):
        rewrite.optimize(model, [{"mixer": {}}, "varlen"], example_kwargs=example)
    plan = [{"mixer": {"check_masks": False}}]
    linear = rewrite.optimize(model, plan, example_kwargs=example)
    packed = rewrite.optimize(model, [*plan, "varlen"], example_kwargs=example)
    packed.load_state_dict(linear.state_dict())
    assert any("window of 4 keys dropped" in m and "check_masks: false" in m for m in packed.report.results[-1].messages)
    batch = right_padded([20, 9], 20)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(packed(**batch).logits[real], linear(**batch).logits[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config, cls", [("ViTConfig", "ViTModel"), ("Dinov2Config", "Dinov2Model")])
def test_vision_encoders_normalize_linearize_and_refuse_padding_free(config, cls):
    """Vision transformers (patch embeddings, no token ids, no mask): attention_normalize equals the original, the
    bidirectional mixer replaces every layer with finite outputs, and varlen is refused naming the image input."""
    cfg = getattr(transformers, config)(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128, image_size=32, patch_size=8)
    model = getattr(transformers, cls)(cfg).eval()
    pixels = torch.randn(2, 3, 32, 32)
    normalized = rewrite.optimize(model, ["attention_normalize"], (pixels,), verify=True)
    assert normalized.verification.passed
    assert normalized.report.results[0].changed and len(normalized.report.results[0].changed) == 2
    linear = rewrite.optimize(model, [{"mixer": {"kind": "bidirectional"}}], (pixels,))
    assert [c.split(": ")[-1] for c in linear.report.results[0].changed] == ["bidirectional"] * 2
    with torch.no_grad():
        assert torch.isfinite(linear(torch.randn(3, 3, 32, 32)).last_hidden_state).all()
    with pytest.raises(PassError, match=r"varlen.*no token sequences.*captured inputs: pixel_values \[\w+, 3, \w+, \w+\]"):
        rewrite.optimize(model, ["varlen"], (pixels,))


def test_encoder_decoder_keeps_cross_attention_and_varlen_refuses_it():
    """BART: the mixer linearizes encoder self-attention (bidirectional) and decoder self-attention (causal) and leaves
    cross-attention as softmax, also when the example's encoder and decoder lengths are equal (the capture's lengths
    are separate symbols); varlen refuses the cross-attention naming its module."""
    cfg = transformers.BartConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=VOCAB,
                                  max_position_embeddings=64)
    model = transformers.BartModel(cfg).eval()
    ids = torch.randint(3, VOCAB, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    example = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": torch.randint(3, VOCAB, (2, 10))}
    om = rewrite.optimize(model, [{"mixer": {}}], example_kwargs=example)
    result = om.report.results[0]
    kinds = {next(w.strip("():") for w in line.split() if "layers." in w): line.split(": ")[-1] for line in result.changed}
    assert kinds == {"encoder.layers.0.self_attn": "bidirectional", "encoder.layers.1.self_attn": "bidirectional",
                     "decoder.layers.0.self_attn": "gla", "decoder.layers.1.self_attn": "gla"}
    left = [m for m in result.messages if "cross-attention" in m]
    assert len(left) == 2 and all("encoder_attn) as softmax" in m for m in left)
    with pytest.raises(PassError, match=r"decoder\.layers\.0\.encoder_attn.*cross-attention.*encoder-decoder"):
        rewrite.optimize(model, ["varlen"], example_kwargs=example)


def llama4():
    """Llama 4's text model: layer 0 chunked local attention (chunks of 4 tokens, RoPE), layer 1 global (NoPE: one
    layer in every `no_rope_layer_interval`, 4 in the released models)."""
    return transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(
        hidden_size=64, intermediate_size=128, intermediate_size_mlp=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=256, attention_chunk_size=4,
        no_rope_layer_interval=2, num_local_experts=1, interleave_moe_layer_step=0, moe_layers=[], bos_token_id=1,
        eos_token_id=2, pad_token_id=0))


def test_chunked_local_attention_is_refused_as_chunked_when_optimize_runs():
    """Llama 4's chunked mask is block-diagonal causal like a packed row, but its blocks are fixed chunks while
    positions go on: the mixer refuses it as chunked (not as packed sequences, which varlen would then refuse too),
    padded or not, naming the layer and the layers it could take; stateful refuses it when `optimize` runs, not at
    generate; left out by the mixer's `layers` selector, the global layer is linearized."""
    model = build(llama4)
    chunked = r"layer 0 \(model\.layers\.0\.self_attn\): chunked local attention: each query sees only keys in its " \
              r"own chunk of 4 tokens"
    unpadded = {"input_ids": right_padded([12], 12)["input_ids"]}
    for plan, example in (([{"mixer": {"kind": "gla"}}], right_padded([8, 5], 8)),
                          ([{"mixer": {"kind": "gla"}}, "varlen"], right_padded([8, 5], 8)),
                          ([{"mixer": {"kind": "gla"}}], unpadded)):
        with pytest.raises(PassError, match=chunked + r".*`layers` selector \(here the layers without chunked "
                                                      r"attention: `layers: \[1\]`\)") as info:
            rewrite.optimize(model, plan, example_kwargs=example)
        assert info.value.pass_name == "mixer" and info.value.module_path == "model.layers.0.self_attn"
    with pytest.raises(PassError, match=chunked + r".*Stateful decode does not support it") as info:
        rewrite.optimize(model, ["attention_normalize", "stateful"], example_kwargs=right_padded([8, 5], 8))
    assert info.value.module_path == "model.layers.0.self_attn"
    with pytest.raises(PassError, match=r"layer 0 .*cuts positions into chunks of 4 tokens"):  # no chunk crossed
        rewrite.optimize(model, ["stateful"], example_kwargs={"input_ids": unpadded["input_ids"][:, :4]})
    om = rewrite.optimize(model, [{"mixer": {"kind": "gla", "layers": [1]}}], example_kwargs=right_padded([8, 5], 8))
    assert [c.split(": ")[-1] for c in om.report.results[0].changed] == ["gla"]
    batch = right_padded([20, 9], 20)
    with torch.no_grad():
        assert torch.isfinite(om(**batch).logits).all()


def lfm2():
    """Short-conv layers (a causal depthwise conv over the tokens) beside full-attention layers."""
    return transformers.Lfm2ForCausalLM(_decoder_config(
        transformers.Lfm2Config, num_key_value_heads=2, layer_types=["conv", "full_attention"], conv_L_cache=3))


def diffllama():
    """Differential attention: two softmax attentions over one q / k, their values tiled over the kv heads by
    `repeat(1, 2, 1, 1)`, combined per head pair."""
    return transformers.DiffLlamaForCausalLM(_decoder_config(transformers.DiffLlamaConfig, num_key_value_heads=2))


def test_short_conv_layers_run_padding_free_per_sequence():
    """LFM2's short conv (a causal depthwise conv over the tokens beside a full-attention layer) runs per sequence
    of the packed batch (it was refused); the padding-free logits match the padded model's on real tokens, for a
    batch whose second sequence is shorter than the conv reaches into the first."""
    model = build(lfm2)
    assert_padding_free_matches(model)
    om = rewrite.optimize(model, ["varlen"], example_kwargs=right_padded([8, 5], 8))
    assert "causal convs per sequence: model.layers.0.conv" in om.report.results[0].messages
    batch = right_padded([9, 2], 9)
    with torch.no_grad():
        want, got = model(**batch).logits, om(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


def test_short_conv_layers_decode_token_by_token_like_hugging_face():
    """LFM2's short convs keep their last inputs in the decode state (they once read only the new token, silently):
    prefill then one step per token gives the full forward's logits, and a ragged batch generates each prompt's
    tokens as Hugging Face generates that prompt alone."""
    model = build(lfm2)
    ids = right_padded([10, 10], 10)["input_ids"]
    om = rewrite.optimize(model, ["stateful"], example_kwargs={"input_ids": ids})
    assert "layer 0 (model.layers.0.conv): can decode with a conv state (its last 2 inputs)" in \
        om.report.results[0].messages
    with torch.no_grad():
        got = stepwise_program_logits(decode_program(om), ids, 3)
        torch.testing.assert_close(got, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        mask = torch.ones_like(ids)
        mask[0, :4] = 0
        batched = om.generate(ids, mask, max_new_tokens=5)
        for row, start in ((0, 4), (1, 0)):
            alone = model.generate(ids[row:row + 1, start:], max_new_tokens=5, do_sample=False, pad_token_id=0)
            assert torch.equal(batched[row, start:], alone[0])


def granite_hybrid():
    """Mamba2 layers (a causal depthwise conv, then a selective scan over chunks of the tokens) beside attention."""
    return transformers.GraniteMoeHybridForCausalLM(_decoder_config(
        transformers.GraniteMoeHybridConfig, num_key_value_heads=2, layer_types=["mamba", "attention"], mamba_n_heads=8,
        mamba_d_head=16, mamba_expand=2, mamba_d_state=8, num_local_experts=0, shared_intermediate_size=64))


def test_a_selective_scan_is_refused_for_decoding_naming_its_module():
    """GraniteMoeHybrid's Mamba2 reference scan (cumsums over the chunks of the tokens) cannot restart at each
    decode step: the stateful pass refuses it (its decode once ran, silently wrong, with only the conv carried)."""
    model = build(granite_hybrid)
    ids = right_padded([8, 8], 8)["input_ids"]
    with pytest.raises(PassError, match=r"layer 0 \(model.layers.0.mamba\): a running cumsum along a dim sized by "
                                        r"the tokens, as a selective scan's") as info:
        rewrite.optimize(model, ["stateful"], example_kwargs={"input_ids": ids})
    assert info.value.module_path == "model.layers.0.mamba"


def test_differential_attention_runs_padding_free():
    """The `repeat` that tiles DiffLlama's values over the heads keeps tokens apart (it once stopped the pass)."""
    model = build(diffllama)
    assert_padding_free_matches(model)
