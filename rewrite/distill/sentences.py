"""Real English sentences that need no download: the first sentences of the standard library's docstrings.

Split by file like `rewrite.text_corpus.ByteCorpus` (every `heldout_every`-th file is held out),
so held-out sentences come from modules never seen in training.
"""

from __future__ import annotations

import ast
import functools
import re

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
