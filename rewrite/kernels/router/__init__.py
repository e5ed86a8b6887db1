"""Layer-skip router: pool a block's input over the sequence, score it, and list the rows that run."""

from .api import route

__all__ = ["route"]
