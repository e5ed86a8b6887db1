"""Real text that needs no download, as bytes: the Python standard library's own sources (code) and
the Python reference documentation shipped with every CPython install (`pydoc_data.topics`, prose).

Used to train small byte-level language models (teachers for the mixer recipe, routers for layer
skipping) and to draw held-out text for evaluation. The split is by document (a source file, a
documentation topic), so held-out text is never seen in training.

`ByteCorpus.load()` is the code alone, as it always was. `ByteCorpus.load(kinds=("code", "prose"))`
mixes the two: each window is drawn from one kind (a window never straddles code and prose), the
kind chosen per window with the probabilities `mix` (default: equal, `MIXED_RATIO`).
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB_SIZE = 256
"""Byte-level: one token per byte."""

KINDS = ("code", "prose")
"""code: the standard library's top-level sources; prose: the reference documentation's topics."""

HELDOUT_EVERY = {"code": 10, "prose": 4}
"""Default held-out documents: every 10th source file (10% of the code's bytes), every 4th documentation
topic (79 topics of very unequal size in CPython 3.11: every 10th would hold out 7 topics, 2% of the
prose, 85 windows of 128 bytes; every 4th holds out 19 topics, 15%)."""

MIXED_RATIO = {"code": 0.5, "prose": 0.5}
"""Default mixing ratio of `ByteCorpus.load(kinds=("code", "prose"))`: the fraction of windows of each kind."""


def stdlib_sources() -> list[Path]:
    """The top-level `.py` files of the running interpreter's standard library, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"no Python sources found in the standard library folder {root}")
    return files


def python_docs() -> list[tuple[str, str]]:
    """The Python reference documentation in English: (topic, text) pairs of `pydoc_data.topics.topics`,
    sorted by topic (the text `help("if")` shows; part of every CPython install)."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:
        raise ImportError(
            "the prose corpus needs the standard library's `pydoc_data` package (pydoc_data.topics), which this "
            "Python install lacks (some distributions strip it); use ByteCorpus.load(kinds=('code',))"
        ) from exc
    if not topics:
        raise ImportError("pydoc_data.topics.topics is empty: this Python install has no reference documentation")
    return sorted(topics.items())


def _documents(kind: str) -> list[bytes]:
    if kind == "code":
        return [path.read_bytes() for path in stdlib_sources()]
    if kind == "prose":
        return [text.encode("utf-8") for _, text in python_docs()]
    raise ValueError(f"unknown corpus kind {kind!r}; choose from {', '.join(KINDS)}")


@dataclass(frozen=True)
class ByteCorpus:
    """Training and held-out byte streams (uint8 tensors) of one kind of text or a mix of kinds.

    `train` / `heldout` hold the kinds one after another, in `kinds` order; `train_sizes` /
    `heldout_sizes` are the bytes of each kind (None: a single kind, the whole stream). `mix` is the
    fraction of windows `batches` draws from each kind.
    """

    train: torch.Tensor
    heldout: torch.Tensor
    kinds: tuple[str, ...] = ("code",)
    train_sizes: tuple[int, ...] | None = None
    heldout_sizes: tuple[int, ...] | None = None
    mix: tuple[float, ...] | None = None

    @classmethod
    def load(
        cls,
        max_bytes: int | None = None,
        heldout_every: int | None = None,
        *,
        kinds: tuple[str, ...] = ("code",),
        mix: dict[str, float] | None = None,
    ) -> ByteCorpus:
        """Every `heldout_every`-th document of each kind (default `HELDOUT_EVERY`: 10 for code, 4 for
        prose) goes to the held-out stream; `max_bytes`
        caps each kind's stream per split. `mix`: the fraction of windows of each kind (normalised;
        default equal, `MIXED_RATIO` for code and prose). Raises ImportError naming `pydoc_data` when
        prose is asked for and the install lacks it."""
        if heldout_every is not None and heldout_every < 2:
            raise ValueError(f"heldout_every must be >= 2, got {heldout_every}")
        kinds = tuple(kinds)
        if not kinds or len(set(kinds)) != len(kinds) or any(k not in KINDS for k in kinds):
            raise ValueError(f"kinds must be distinct names from {KINDS}, got {kinds}")
        weights = mix if mix is not None else {k: 1.0 for k in kinds}
        if set(weights) != set(kinds) or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"mix must give a non-negative weight to each of {kinds}, got {mix}")
        streams: list[tuple[bytearray, bytearray]] = []
        for kind in kinds:
            every = heldout_every or HELDOUT_EVERY[kind]
            train, heldout = bytearray(), bytearray()
            for index, document in enumerate(_documents(kind)):
                (heldout if index % every == every - 1 else train).extend(document)
            if max_bytes is not None:
                train, heldout = train[:max_bytes], heldout[:max_bytes]
            streams.append((train, heldout))

        def tensor(data: bytearray) -> torch.Tensor:
            return torch.frombuffer(data, dtype=torch.uint8).clone() if data else torch.zeros(0, dtype=torch.uint8)

        train = torch.cat([tensor(t) for t, _ in streams])
        heldout = torch.cat([tensor(h) for _, h in streams])
        if kinds == ("code",) and mix is None:
            return cls(train, heldout)  # the code corpus, exactly as before kinds existed
        total = sum(weights.values())
        return cls(
            train, heldout, kinds, tuple(len(t) for t, _ in streams), tuple(len(h) for _, h in streams),
            tuple(weights[k] / total for k in kinds),
        )

    def stream(self, split: str = "train", kind: str | None = None) -> torch.Tensor:
        """The bytes of one kind in a split (kind None: the whole split, every kind in order)."""
        whole = self._split(split)
        if kind is None:
            return whole
        if kind not in self.kinds:
            raise ValueError(f"this corpus holds {self.kinds}, not {kind!r}")
        sizes = (self.train_sizes if split == "train" else self.heldout_sizes) or (whole.numel(),)
        start = sum(sizes[: self.kinds.index(kind)])
        return whole[start : start + sizes[self.kinds.index(kind)]]

    def batches(
        self,
        batch_size: int,
        length: int,
        *,
        split: str = "train",
        generator: torch.Generator | None = None,
        kind: str | None = None,
    ) -> torch.Tensor:
        """One batch [batch_size, length + 1] of token ids (int64) at random offsets of a split.

        Inputs are `batch[:, :-1]`, next-token targets `batch[:, 1:]`. With several kinds, each window
        lies inside one kind's stream, its kind drawn with the probabilities `mix` (or fixed by `kind`).
        """
        if len(self.kinds) == 1 or kind is not None:
            stream = self.stream(split, kind)
            if stream.numel() <= length + 1:
                raise ValueError(f"the {split} split has {stream.numel()} bytes, too few for length {length}")
            starts = torch.randint(0, stream.numel() - length - 1, (batch_size,), generator=generator)
            return torch.stack([stream[s : s + length + 1] for s in starts.tolist()]).long()
        streams = [self.stream(split, k) for k in self.kinds]
        for k, s in zip(self.kinds, streams, strict=True):
            if s.numel() <= length + 1:
                raise ValueError(f"the {split} split has {s.numel()} bytes of {k}, too few for length {length}")
        mix = torch.tensor(self.mix if self.mix is not None else [1.0] * len(self.kinds))
        picks = torch.multinomial(mix, batch_size, replacement=True, generator=generator).tolist()
        offsets = torch.rand(batch_size, generator=generator).tolist()
        rows = []
        for pick, u in zip(picks, offsets, strict=True):
            stream = streams[pick]
            start = min(int(u * (stream.numel() - length - 1)), stream.numel() - length - 2)
            rows.append(stream[start : start + length + 1])
        return torch.stack(rows).long()

    def sequential(
        self, length: int, *, split: str = "heldout", limit: int | None = None, kind: str | None = None
    ) -> torch.Tensor:
        """Non-overlapping windows [N, length + 1] covering a split in order (for evaluation).

        With several kinds, each kind's stream is cut on its own (no window straddles two kinds) and
        the windows follow in `kinds` order; `kind` keeps one kind's windows.
        """
        if kind is None and len(self.kinds) > 1:
            parts = [self._windows(self.stream(split, k), length, split, None) for k in self.kinds]
            windows = torch.cat([p for p in parts if p.numel()])
            return windows[:limit] if limit is not None else windows
        windows = self._windows(self.stream(split, kind), length, split, limit)
        if windows.numel() == 0:
            raise ValueError(f"the {split} split has too few bytes for length {length}")
        return windows

    def window_kinds(self, length: int, *, split: str = "heldout") -> list[str]:
        """The kind of each window `sequential(length, split=split)` returns, in order."""
        return [k for k in self.kinds for _ in range(self._windows(self.stream(split, k), length, split, None).shape[0])]

    @staticmethod
    def _windows(stream: torch.Tensor, length: int, split: str, limit: int | None) -> torch.Tensor:
        count = max((stream.numel() - 1) // length, 0)
        if limit is not None:
            count = min(count, limit)
        if count == 0:
            return torch.zeros(0, length + 1, dtype=torch.long)
        return torch.stack([stream[i * length : i * length + length + 1] for i in range(count)]).long()

    def _split(self, split: str) -> torch.Tensor:
        if split not in ("train", "heldout"):
            raise ValueError(f"unknown split {split!r}; choose 'train' or 'heldout'")
        return self.train if split == "train" else self.heldout
