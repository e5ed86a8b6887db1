"""Decode attention of a few new queries over a full KV cache with a boolean visibility mask (GQA, split-KV)."""

from .api import kv_cache_attention

__all__ = ["kv_cache_attention"]
