"""The no-download corpora: code (the standard library's sources), prose (the reference documentation
in `pydoc_data.topics`) and their mix."""

import sys

import pytest
import torch

from rewrite.text_corpus import HELDOUT_EVERY, ByteCorpus, python_docs


def _kind_of(window: torch.Tensor, corpus: ByteCorpus, split: str) -> set[str]:
    """The kinds whose stream holds this window's bytes as a contiguous run."""
    needle = bytes(window.tolist())
    return {k for k in corpus.kinds if needle in bytes(corpus.stream(split, k).tolist())}


@pytest.fixture(scope="module")
def mixed() -> ByteCorpus:
    return ByteCorpus.load(max_bytes=60_000, kinds=("code", "prose"))


def test_default_corpus_is_the_code_alone_as_before():
    corpus = ByteCorpus.load(max_bytes=5_000)
    assert corpus.kinds == ("code",) and corpus.mix is None and corpus.train.numel() == 5_000
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(0, 5_000 - 17, (3,), generator=torch.Generator().manual_seed(0))
    expected = torch.stack([corpus.train[s : s + 17] for s in starts.tolist()]).long()
    assert torch.equal(corpus.batches(3, 16, generator=generator), expected)


def test_mixed_batches_hold_both_kinds_and_no_window_straddles(mixed):
    assert mixed.kinds == ("code", "prose") and mixed.mix == (0.5, 0.5)
    batch = mixed.batches(64, 48, generator=torch.Generator().manual_seed(1))
    kinds = [_kind_of(w, mixed, "train") for w in batch]
    assert all(len(k) == 1 for k in kinds)  # inside one kind's stream: never across the code / prose boundary
    counts = {k: sum(next(iter(s)) == k for s in kinds) for k in mixed.kinds}
    assert counts["code"] > 10 and counts["prose"] > 10
    prose = mixed.batches(4, 48, kind="prose", generator=torch.Generator().manual_seed(2))
    assert all(_kind_of(w, mixed, "train") == {"prose"} for w in prose)


def test_mixed_sequential_windows_are_cut_per_kind(mixed):
    windows = mixed.sequential(64, split="heldout")
    kinds = mixed.window_kinds(64, split="heldout")
    assert len(kinds) == windows.shape[0] and set(kinds) == {"code", "prose"}
    for window, kind in zip(windows, kinds, strict=True):
        assert kind in _kind_of(window, mixed, "heldout")
    boundary = mixed.heldout_sizes[0]
    code_windows = kinds.count("code")
    assert code_windows * 64 + 1 <= boundary  # the last code window ends inside the code stream


def test_prose_split_is_disjoint_by_document():
    docs = python_docs()
    assert len(docs) > 20 and all(isinstance(t, str) and t for _, t in docs)
    corpus = ByteCorpus.load(kinds=("prose",))
    every = HELDOUT_EVERY["prose"]
    held = [t for i, (_, t) in enumerate(docs) if i % every == every - 1]
    train = [t for i, (_, t) in enumerate(docs) if i % every != every - 1]
    assert corpus.heldout_sizes == (sum(len(t.encode()) for t in held),)
    assert corpus.train_sizes == (sum(len(t.encode()) for t in train),)
    assert bytes(corpus.stream("heldout", "prose")[:200].tolist()) == held[0].encode()[:200]
    train_bytes = bytes(corpus.stream("train", "prose").tolist())
    for text in held:  # no held-out topic appears in the training stream
        assert text.encode()[:300] not in train_bytes


def test_missing_pydoc_data_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)
    with pytest.raises(ImportError, match="pydoc_data"):
        ByteCorpus.load(kinds=("code", "prose"))


def test_bad_kinds_and_mix_are_refused():
    with pytest.raises(ValueError, match="kinds"):
        ByteCorpus.load(kinds=("poetry",))
    with pytest.raises(ValueError, match="mix"):
        ByteCorpus.load(kinds=("code", "prose"), mix={"code": 1.0})
