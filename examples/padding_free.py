"""Padding-free inference and packed batches with the `varlen` pass.

1. A padded batch of sentences of very different lengths runs through the optimized module, which
   unpads once, runs every layer on the real tokens only, and repads the outputs; they match the
   original model on every real token.
2. With a static token count (`token_capacity`: the real tokens, then filler), every shape is fixed
   by the padded batch, which is what lets the module replay from CUDA graphs; on CUDA the eager and
   replayed modules are timed side by side.
3. The same sentences packed into one row by `rewrite.packing` (position_ids restart per sentence)
   run with no padding at all and give the same sentence embeddings.
4. Layouts beyond plain attention, each a small random Hugging Face model on prompts of different
   lengths: a causal sliding window (Mistral, window 8, left-padded prompts), ModernBERT's
   bidirectional local window (4 keys on each side) and mixture-of-experts blocks (Mixtral, whose
   experts sort tokens by expert: run packed because running the block shows it token-wise). Each
   runs padding-free and matches the padded model on every real token.
Run: python -m examples.padding_free [--tiny] [--device cuda]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import rewrite
from rewrite.packing import PackedCollator
from rewrite.varlen.runtime import token_capacity

SENTENCES = [
    "Padding wastes compute on tokens that do not exist.",
    "Short.",
    "A compiler rewrites the graph of a model so that it runs every layer on the real tokens of a batch and "
    "nothing else, which matters most when a few long documents share a batch with many short queries.",
    "The cat sat on the mat.",
    "Linear attention keeps a fixed-size state.",
    "Hi",
]


def build(tiny: bool):
    """(model, tokenize) : the pretrained all-MiniLM-L6-v2, or a tiny random BERT with a toy tokenizer."""
    import transformers

    if tiny:
        torch.manual_seed(0)
        cfg = transformers.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, vocab_size=256, attn_implementation="sdpa")

        def tokenize(text: str) -> list[int]:
            return [101, *(ord(c) % 200 + 50 for c in text), 102]

        return transformers.BertModel(cfg).eval(), tokenize
    from examples.models import minilm_path

    path = str(minilm_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.BertModel.from_pretrained(path, attn_implementation="sdpa").eval()
    return model, lambda text: tok(text)["input_ids"]


def padded(token_lists: list[list[int]]) -> dict[str, torch.Tensor]:
    width = max(map(len, token_lists))
    ids = torch.zeros(len(token_lists), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(token_lists):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


def timed(fn, runs: int = 5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(runs):
        fn()
    return (time.perf_counter() - start) / runs * 1e3


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random BERT instead of the pretrained MiniLM")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    model, tokenize = build(args.tiny)
    model = model.to(args.device)
    token_lists = [tokenize(s) for s in SENTENCES]
    batch = {k: v.to(args.device) for k, v in padded(token_lists).items()}
    mask = batch["attention_mask"]
    real = int(mask.sum())
    print(f"{len(SENTENCES)} sentences, {real} real tokens in a padded batch of {mask.numel()} "
          f"({100 * real / mask.numel():.0f}% real)")

    om = rewrite.optimize(model, {"passes": ["varlen"]}, example_kwargs=batch)
    print(om.report.summary())
    with torch.no_grad():
        want = model(**batch).last_hidden_state
        got = om(**batch).last_hidden_state
    keep = mask.bool()
    padded_error = (got[keep] - want[keep]).abs().max().item()
    print(f"padding-free vs padded, max |difference| on real tokens: {padded_error:.2e}")
    with torch.no_grad():
        padded_ms = timed(lambda: model(**batch))
        varlen_ms = timed(lambda: om(**batch))
    print(f"padded {padded_ms:.1f} ms, padding-free {varlen_ms:.1f} ms (this machine, {want.device})")

    capacity = real + 7
    with torch.no_grad(), token_capacity(capacity):
        static = om(**batch).last_hidden_state
    static_error = (static[keep] - got[keep]).abs().max().item()
    print(f"static token count ({capacity} packed tokens, shapes fixed as a CUDA graph needs) vs eager: "
          f"{static_error:.2e}")
    if want.device.type == "cuda":
        eager = rewrite.optimize(model, {"passes": [{"varlen": {"cuda_graphs": "never"}}]}, example_kwargs=batch)
        with torch.no_grad():
            eager_ms, graphs_ms = timed(lambda: eager(**batch)), timed(lambda: om(**batch))
        print(f"padding-free eager {eager_ms:.2f} ms, replayed from a CUDA graph {graphs_ms:.2f} ms")

    packed = PackedCollator()([{"input_ids": torch.tensor(t)} for t in token_lists])
    packed = {k: v.to(args.device) for k, v in packed.items()}
    packed_om = rewrite.optimize(model, {"passes": ["varlen"]},
                                 example_kwargs={"input_ids": packed["input_ids"],
                                                 "position_ids": packed["position_ids"]})
    with torch.no_grad():
        row = packed_om(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).last_hidden_state[0]
    bounds = packed["cu_seqlens"].tolist()
    packed_embeddings = torch.stack([row[s:e].mean(0) for s, e in zip(bounds, bounds[1:])])
    packed_error = (packed_embeddings - mean_pool(want, mask)).abs().max().item()
    print(f"packed row of {row.shape[0]} tokens, no padding; sentence embeddings vs padded model: {packed_error:.2e}")
    layouts = {name: other_layout(name, args.device) for name in OTHER_LAYOUTS}
    return {"padded_error": padded_error, "static_error": static_error, "packed_error": packed_error,
            **{f"{name}_error": error for name, error in layouts.items()}, "real_fraction": real / mask.numel()}


def _small(config_class, model_class, **extra):
    import transformers

    config = getattr(transformers, config_class)(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                 num_attention_heads=4, vocab_size=256, pad_token_id=0, **extra)
    return getattr(transformers, model_class)(config)


OTHER_LAYOUTS = {
    # name: (builder, left padding, output compared)
    "window": (lambda: _small("MistralConfig", "MistralForCausalLM", num_key_value_heads=2, sliding_window=8),
               True, "logits"),
    "bidirectional_window": (lambda: _small("ModernBertConfig", "ModernBertModel", global_attn_every_n_layers=2,
                                            local_attention=8, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                            sep_token_id=2), False, "last_hidden_state"),
    "experts": (lambda: _small("MixtralConfig", "MixtralForCausalLM", num_key_value_heads=2, num_local_experts=4,
                               num_experts_per_tok=2), True, "logits"),
}
"""Part 4's models: windows counted in row slots want rows without holes, so prompts are padded on one side."""


def other_layout(name: str, device: str) -> float:
    """Part 4: one of OTHER_LAYOUTS padding-free on prompts of 20, 5 and 13 tokens; max |difference| on real tokens."""
    build_model, left, output = OTHER_LAYOUTS[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model().to(device).eval()
    lengths = [20, 5, 13]
    ids = torch.randint(3, 256, (len(lengths), max(lengths)), device=device)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        if left:  # as generation batches are padded
            mask[row, max(lengths) - n:] = 1
        else:
            mask[row, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    om = rewrite.optimize(model, {"passes": ["varlen"]}, example_kwargs=batch)
    with torch.no_grad():
        want, got = getattr(model(**batch), output), getattr(om(**batch), output)
    keep = mask.bool()
    error = (got[keep] - want[keep]).abs().max().item()
    how = "; ".join(c.split(": ", 1)[1] for c in om.report.results[-1].changed)
    whole = [m for m in om.report.results[-1].messages if "shown token-wise" in m]
    print(f"{name.replace('_', ' ')} ({type(model).__name__}), prompts of {lengths} tokens: {how}"
          + (f"; {whole[0]}" if whole else "") + f"; max |difference| on real tokens {error:.2e}")
    return error


if __name__ == "__main__":
    main()
