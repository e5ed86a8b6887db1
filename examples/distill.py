"""Linearize the pretrained all-MiniLM-L6-v2 and recover it with attention transfer on real sentences.

    python -m examples.distill                 # all 6 layers bidirectional, 200 transfer steps
    python -m examples.distill --tiny          # a few steps, a few sentences (seconds)

Sentences come from the standard library's docstrings (no download); held-out sentences come
from modules never used in training. Prints the mean cosine similarity of sentence embeddings to
the original model before and after the recipe.
"""

from __future__ import annotations

import argparse
from typing import Any

from examples.models import minilm_path
from rewrite.distill import DistillConfig, FinetuneConfig, TransferConfig, distill
from rewrite.distill.sentences import (
    encode_sentences,
    sentence_batches,
    sentence_embeddings,
    stdlib_sentences,
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the example; returns the cosine similarities before and after and the loss history."""
    import transformers

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200, help="attention-transfer steps")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--heldout", type=int, default=128, help="held-out sentences to score")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--tiny", action="store_true", help="4 steps, 8 sentences, 24 tokens")
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.batch, args.heldout, args.max_tokens = 4, 4, 8, 24

    path = str(minilm_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    teacher = transformers.BertModel.from_pretrained(path, attn_implementation="sdpa").eval()
    train, heldout = stdlib_sentences("train"), stdlib_sentences("heldout")[: args.heldout]

    data = sentence_batches(tokenizer, train, args.batch, args.max_tokens)
    plan = [{"mixer": {"kind": "bidirectional", "feature_map": "hedgehog"}}]
    test = encode_sentences(tokenizer, heldout, args.max_tokens)
    reference = sentence_embeddings(teacher, test)
    untrained = distill(teacher, plan, data, DistillConfig(TransferConfig(steps=0), FinetuneConfig(steps=0)))
    before = (sentence_embeddings(untrained.module, test) * reference).sum(-1).mean().item()
    result = distill(teacher, plan, data, DistillConfig(TransferConfig(steps=args.steps, mode="layer"),
                                                        progress=not args.tiny))
    after = (sentence_embeddings(result.module, test) * reference).sum(-1).mean().item()
    print(f"linearized {len(result.module.report.results[0].changed)} layers of all-MiniLM-L6-v2 (bidirectional, hedgehog)")
    print(f"attention transfer: {args.steps} steps, loss {result.history['transfer'][0]:.4g} -> "
          f"{result.history['transfer'][-1]:.4g}")
    print(f"mean cosine to the original on {len(heldout)} held-out sentences: {before:.4f} before, {after:.4f} after")
    return {"before": before, "after": after, "history": result.history}


if __name__ == "__main__":
    main()
