"""The `rewrite::kv_cache_write_` op: schema, fake, CPU reference and CUDA Triton implementation (forward only)."""

import torch

from .._triton import load_triton_module
from .reference import kv_cache_write_reference

_TRITON = "rewrite.kernels.kv_cache_write.triton_kernels"


@torch.library.custom_op("rewrite::kv_cache_write_", mutates_args=("keys", "values"))
def kv_cache_write_op(
    keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """keys[:, :, index] = k.to(keys.dtype); values[:, :, index] = v.to(values.dtype)."""
    kv_cache_write_reference(keys, values, index, k, v)


@kv_cache_write_op.register_kernel("cuda")
def _kv_cache_write_cuda(
    keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    launchers = load_triton_module(_TRITON)
    if launchers.launchable(keys, values, k, v):
        launchers.kv_cache_write_forward(keys, values, index, k, v)
    else:
        kv_cache_write_reference(keys, values, index, k, v)


@kv_cache_write_op.register_fake
def _kv_cache_write_fake(
    keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    return None


def check_kv_cache_write_inputs(
    keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Raise a ValueError unless `kv_cache_write_` can store k / v at `index` of keys / values (see there)."""
    named = (("keys", keys), ("values", values), ("k", k), ("v", v))
    for name, t in named:
        if t.dim() != 4:
            raise ValueError(f"kv_cache_write_: {name} must be 4-D, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"kv_cache_write_: {name} must be a floating-point tensor, got {t.dtype}")
        if t.device != keys.device:
            raise ValueError(f"kv_cache_write_: {name} is on {t.device}, keys on {keys.device}")
    if index.dim() != 1 or index.dtype != torch.long:
        raise ValueError(f"kv_cache_write_: index must be a 1-D int64 tensor, got {index.dtype} of shape "
                         f"{tuple(index.shape)}")
    if index.device != keys.device:
        raise ValueError(f"kv_cache_write_: index is on {index.device}, keys on {keys.device}")
    if keys.shape[:3] != values.shape[:3]:
        raise ValueError(f"kv_cache_write_: keys {tuple(keys.shape)} and values {tuple(values.shape)} must share "
                         "rows, heads and slots (head dims may differ)")
    for name, new, cache in (("k", k, keys), ("v", v, values)):
        expected = (cache.shape[0], cache.shape[1], index.shape[0], cache.shape[3])
        if tuple(new.shape) != expected:
            raise ValueError(f"kv_cache_write_: {name} of shape {tuple(new.shape)} does not fit its cache "
                             f"{tuple(cache.shape)} at {index.shape[0]} positions; expected {expected}")


def kv_cache_write_(
    keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Store a decode step's keys / values in a KV cache, in place: keys / values [B, Hkv, S, Dk / Dv] (the cache),
    index [T] int64 slots in [0, S), k [B, Hkv, T, Dk] and v [B, Hkv, T, Dv] of any strides and floating dtypes.
    Equals `keys.index_copy_(2, index, k.to(keys.dtype))` and the same for values, by one kernel launch on CUDA
    (no allocation, no host sync; a cache whose last dim is not contiguous, or a dtype other than float32 /
    float16 / bfloat16, takes the two `index_copy_`). On CUDA an index outside [0, S) writes nothing; repeated
    indices leave one of their tokens, unspecified which. Forward only (no autograd)."""
    check_kv_cache_write_inputs(keys, values, index, k, v)
    kv_cache_write_op(keys, values, index, k, v)
