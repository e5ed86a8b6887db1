"""Feature maps applied to q and k before linear attention, and the key-derived decay gate."""

import torch
import torch.nn.functional as F


def apply_feature_map(x: torch.Tensor, name: str) -> torch.Tensor:
    """phi(x) over the head dim: "identity", "softmax", "elu" (elu(x) + 1) or "relu"."""
    if name == "identity":
        return x
    if name == "softmax":
        return torch.softmax(x, dim=-1, dtype=torch.promote_types(x.dtype, torch.float32)).to(x.dtype)
    if name == "elu":
        return F.elu(x) + 1
    if name == "relu":
        return F.relu(x)
    raise ValueError(f"unknown feature map {name!r}")


def log_decay_from_keys(k: torch.Tensor, decay: str, normalizer: float) -> torch.Tensor:
    """Liger-style gate from the raw keys, with no new parameters, in float32 (float64 for float64 keys).

    "vector": g[b, t, h, :] = logsigmoid(k[b, t, h, :]) / normalizer        -> [B, T, Hkv, K]
    "scalar": g[b, t, h]    = logsigmoid(mean_K k[b, t, h, :]) / normalizer  -> [B, T, Hkv]
    """
    kf = k.to(torch.promote_types(k.dtype, torch.float32))
    if decay == "vector":
        return F.logsigmoid(kf) / normalizer
    if decay == "scalar":
        return F.logsigmoid(kf.mean(-1)) / normalizer
    raise ValueError(f'linear_attention: key_gate_normalizer needs decay "scalar" or "vector", got {decay!r}')
