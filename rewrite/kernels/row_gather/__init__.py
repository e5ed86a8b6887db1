"""Rows of several tensors gathered by one index, in one kernel launch on CUDA."""

from .op import gather_rows

__all__ = ["gather_rows"]
