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

import torch
import torch.nn.functional as F

from examples.models import minilm_path
from rewrite.distill import DistillConfig, FinetuneConfig, TransferConfig, distill, main_output
from rewrite.distill.sentences import stdlib_sentences


def embed(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (how all-MiniLM-L6-v2 is used)."""
    with torch.no_grad():
        hidden = main_output(module(**batch)).float()
    mask = batch["attention_mask"][..., None].float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


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

    def encode(sentences: list[str]) -> dict[str, torch.Tensor]:
        enc = tokenizer(sentences, padding="max_length", truncation=True, max_length=args.max_tokens,
                        return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def data(step: int) -> dict[str, torch.Tensor]:
        start = (step * args.batch) % (len(train) - args.batch)
        return encode(train[start : start + args.batch])

    plan = [{"mixer": {"kind": "bidirectional", "feature_map": "hedgehog"}}]
    test = encode(heldout)
    reference = embed(teacher, test)
    untrained = distill(teacher, plan, data, DistillConfig(TransferConfig(steps=0), FinetuneConfig(steps=0)))
    before = (embed(untrained.module, test) * reference).sum(-1).mean().item()
    result = distill(teacher, plan, data, DistillConfig(TransferConfig(steps=args.steps, mode="layer"),
                                                        progress=not args.tiny))
    after = (embed(result.module, test) * reference).sum(-1).mean().item()
    print(f"linearized {len(result.module.report.results[0].changed)} layers of all-MiniLM-L6-v2 (bidirectional, hedgehog)")
    print(f"attention transfer: {args.steps} steps, loss {result.history['transfer'][0]:.4g} -> "
          f"{result.history['transfer'][-1]:.4g}")
    print(f"mean cosine to the original on {len(heldout)} held-out sentences: {before:.4f} before, {after:.4f} after")
    return {"before": before, "after": after, "history": result.history}


if __name__ == "__main__":
    main()
