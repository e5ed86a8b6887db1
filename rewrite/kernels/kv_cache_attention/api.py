"""Public decode attention over a full KV cache: argument checks, then the `rewrite::kv_cache_attention` op."""

import torch

from .op import kv_cache_attention_op


def _fail(name: str, message: str) -> None:
    raise ValueError(f"kv_cache_attention: {name} {message}")


def kv_cache_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, scale: float | None = None,
    last_slot: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of new queries over a KV cache, as SDPA with a boolean mask, GQA without repeating k / v.

    q [B, H, T, D] (T: the few new tokens of a decode step), keys [B, Hkv, S, D] and values [B, Hkv, S, Dv]
    (views of a cache; any strides with a unit last one, else they are copied), visible bool broadcastable to
    [B, 1, T, S] (True: the query sees the slot). q head h reads kv head h // (H / Hkv). scale defaults to
    D**-0.5. Returns o [B, H, T, Dv] in q's dtype. A query that sees no slot gets zeros (as SDPA gives); the
    decode sites always let a query see its own slot, so that case does not arise there. On CUDA a split-KV
    Triton kernel runs (programs over row x kv head x slice of slots, merged by log-sum-exp); on the CPU the
    PyTorch reference. Forward only (inference): no gradients.

    `last_slot` (optional, one integer on q's device, e.g. a view `slots[-1:]` of the call's query slots): no query
    sees a slot after it, and the kernel reads no key or value there, so a cache filled up to that slot costs the
    reads of its filled part even when its shape (fixed under a CUDA graph) is the whole capacity.
    """
    for name, x in (("q", q), ("keys", keys), ("values", values)):
        if x.dim() != 4 or not x.is_floating_point():
            _fail(name, f"must be a floating-point 4-d tensor, got {x.dtype} {tuple(x.shape)}")
    if not (q.dtype == keys.dtype == values.dtype) or not (q.device == keys.device == values.device):
        _fail("q, keys, values", "must share one dtype and one device")
    batch, heads, count, dk = q.shape
    kv_heads, slots = keys.shape[1], keys.shape[2]
    if keys.shape[0] != batch or keys.shape[-1] != dk or values.shape[:3] != keys.shape[:3]:
        _fail("keys, values", f"do not fit q: q {tuple(q.shape)}, keys {tuple(keys.shape)}, "
                              f"values {tuple(values.shape)}")
    if kv_heads == 0 or heads % kv_heads != 0:
        _fail("keys", f"heads ({kv_heads}) must divide q's heads ({heads})")
    if visible.dtype != torch.bool or visible.device != q.device:
        _fail("visible", f"must be a bool tensor on {q.device}, got {visible.dtype} on {visible.device}")
    try:
        visible = visible.expand(batch, 1, count, slots)
    except RuntimeError:
        _fail("visible", f"must broadcast to [B, 1, T, S] = {[batch, 1, count, slots]}, got {list(visible.shape)}")
    if last_slot is not None and (last_slot.numel() != 1 or last_slot.dtype not in (torch.int32, torch.int64)
                                  or last_slot.device != q.device):
        _fail("last_slot", f"must be one int32 / int64 element on {q.device}, got {last_slot.dtype} "
                           f"{tuple(last_slot.shape)} on {last_slot.device}")
    scale = dk**-0.5 if scale is None else float(scale)
    return kv_cache_attention_op(q, keys, values, visible, scale, None if last_slot is None else last_slot.reshape(1))
