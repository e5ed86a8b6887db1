"""Real text that needs no download: the Python standard library's own sources, as bytes.

Used to train small byte-level language models (teachers for the mixer recipe, routers for layer
skipping) and to draw held-out text for evaluation. The split is by file, so held-out text is
never seen in training.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB_SIZE = 256
"""Byte-level: one token per byte."""


def stdlib_sources() -> list[Path]:
    """The top-level `.py` files of the running interpreter's standard library, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"no Python sources found in the standard library folder {root}")
    return files


@dataclass(frozen=True)
class ByteCorpus:
    """Training and held-out byte streams (uint8 tensors) from the standard library's sources."""

    train: torch.Tensor
    heldout: torch.Tensor

    @classmethod
    def load(cls, max_bytes: int | None = None, heldout_every: int = 10) -> ByteCorpus:
        """Every `heldout_every`-th file goes to the held-out stream; `max_bytes` caps each stream."""
        if heldout_every < 2:
            raise ValueError(f"heldout_every must be >= 2, got {heldout_every}")
        train, heldout = bytearray(), bytearray()
        for index, path in enumerate(stdlib_sources()):
            (heldout if index % heldout_every == heldout_every - 1 else train).extend(path.read_bytes())
        if max_bytes is not None:
            train, heldout = train[:max_bytes], heldout[:max_bytes]
        return cls(torch.frombuffer(train, dtype=torch.uint8).clone(), torch.frombuffer(heldout, dtype=torch.uint8).clone())

    def batches(
        self, batch_size: int, length: int, *, split: str = "train", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One batch [batch_size, length + 1] of token ids (int64) at random offsets of a split.

        Inputs are `batch[:, :-1]`, next-token targets `batch[:, 1:]`.
        """
        stream = self._split(split)
        if stream.numel() <= length + 1:
            raise ValueError(f"the {split} split has {stream.numel()} bytes, too few for length {length}")
        starts = torch.randint(0, stream.numel() - length - 1, (batch_size,), generator=generator)
        return torch.stack([stream[s : s + length + 1] for s in starts.tolist()]).long()

    def sequential(self, length: int, *, split: str = "heldout", limit: int | None = None) -> torch.Tensor:
        """Non-overlapping windows [N, length + 1] covering a split in order (for evaluation)."""
        stream = self._split(split)
        count = (stream.numel() - 1) // length
        if limit is not None:
            count = min(count, limit)
        if count == 0:
            raise ValueError(f"the {split} split has {stream.numel()} bytes, too few for length {length}")
        return torch.stack([stream[i * length : i * length + length + 1] for i in range(count)]).long()

    def _split(self, split: str) -> torch.Tensor:
        if split not in ("train", "heldout"):
            raise ValueError(f"unknown split {split!r}; choose 'train' or 'heldout'")
        return self.train if split == "train" else self.heldout
