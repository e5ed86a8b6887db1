"""A decode step's keys and values written into a KV cache (full or ring) by one kernel launch on CUDA."""

from .op import kv_cache_write_

__all__ = ["kv_cache_write_"]
