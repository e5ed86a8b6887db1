"""The KV-cache write in plain PyTorch: the CPU implementation and the CUDA fallback of `rewrite::kv_cache_write_`."""

import torch


def kv_cache_write_reference(
    keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """keys[:, :, index] = k and values[:, :, index] = v, each cast to its cache's dtype first (as `.to` rounds)."""
    keys.index_copy_(2, index, k.to(keys.dtype))
    values.index_copy_(2, index, v.to(values.dtype))
