"""Real English sentences that need no download: the first sentences of the standard library's docstrings.

Split by file like `rewrite.text_corpus.ByteCorpus` (every `heldout_every`-th file is held out),
so held-out sentences come from modules never seen in training. `sentence_batches` and
`sentence_embeddings` feed them to a sentence encoder (all-MiniLM-L6-v2) and read its embeddings.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from rewrite.distill.recipe import main_output
from rewrite.text_corpus import stdlib_sources

_SENTENCE = re.compile(r"^[A-Z][^\n]{30,200}?[.!?]$")


def _first_sentences(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if not doc:
                continue
            paragraph = " ".join(doc.split("\n\n")[0].split())
            first = re.split(r"(?<=[.!?])\s", paragraph)[0]
            if _SENTENCE.match(first) and ">>>" not in first:
                out.append(first)
    return out


def stdlib_sentences(split: str = "train", heldout_every: int = 10, limit: int | None = None) -> list[str]:
    """Distinct docstring sentences of one split ("train" or "heldout"), in file order.

    Held-out sentences that also occur in a training file are left out.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'heldout'")
    sentences = list(_split_sentences(split, heldout_every))
    return sentences[:limit] if limit is not None else sentences


@functools.cache
def _split_sentences(split: str, heldout_every: int) -> tuple[str, ...]:
    exclude = set(_split_sentences("train", heldout_every)) if split == "heldout" else set()
    seen: dict[str, None] = {}
    for index, path in enumerate(stdlib_sources()):
        held = index % heldout_every == heldout_every - 1
        if held != (split == "heldout"):
            continue
        for sentence in _first_sentences(path.read_text(encoding="utf-8", errors="replace")):
            if sentence not in exclude:
                seen.setdefault(sentence, None)
    return tuple(seen)


def encode_sentences(tokenizer: Any, sentences: list[str], max_tokens: int) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` [len(sentences), max_tokens]: padded (and truncated) to max_tokens."""
    enc = tokenizer(sentences, padding="max_length", truncation=True, max_length=max_tokens, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def sentence_batches(
    tokenizer: Any, sentences: list[str], batch: int, max_tokens: int
) -> Callable[[int], dict[str, torch.Tensor]]:
    """The `data` of a distill run: step -> the encoded batch of `batch` sentences at that step, cycling."""

    def data(step: int) -> dict[str, torch.Tensor]:
        start = (step * batch) % (len(sentences) - batch)
        return encode_sentences(tokenizer, sentences[start : start + batch], max_tokens)

    return data


def sentence_embeddings(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled (over real tokens), L2-normalised last hidden states: how all-MiniLM-L6-v2 is used."""
    with torch.no_grad():
        hidden = main_output(module(**batch)).float()
    mask = batch["attention_mask"][..., None].float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
