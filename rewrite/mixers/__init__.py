"""Mixers that replace softmax attention: one module per kind, each a plain function in SDPA layout.

A kind is described by a `MixerKind`: the function the `mixer` pass puts in the graph, whether it
is causal, the new parameters it needs per site, and the keyword arguments it takes from the pass
options. Adding a kind is one module plus one entry in `KINDS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from rewrite.mixers.bidirectional import bidirectional_mixer
from rewrite.mixers.common import POSITIVE_FEATURE_MAPS
from rewrite.mixers.gla import gla_mixer
from rewrite.mixers.linear import linear_mixer
from rewrite.mixers.retention import init_decay_logit, retention_mixer


@dataclass(frozen=True)
class SiteShape:
    """What a kind needs to size and place its new parameters."""

    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device


def _no_parameters(shape: SiteShape, options: Any) -> dict[str, torch.Tensor]:
    return {}


def _no_kwargs(options: Any) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class MixerKind:
    """One mixer kind: `fn(q, k, v, *new_parameters, mask=..., **kwargs)` in SDPA layout."""

    name: str
    fn: Callable[..., torch.Tensor]
    causal: bool
    summary: str
    parameters: Callable[[SiteShape, Any], dict[str, torch.Tensor]] = field(default=_no_parameters)
    kwargs: Callable[[Any], dict[str, Any]] = field(default=_no_kwargs)


def _retention_parameters(shape: SiteShape, options: Any) -> dict[str, torch.Tensor]:
    logit = init_decay_logit(shape.kv_heads, options.decay_min, options.decay_max)
    return {"retention_decay_logit": logit.to(device=shape.device, dtype=shape.dtype)}


def _gla_kwargs(options: Any) -> dict[str, Any]:
    return {"gate": options.gate, "gate_normalizer": float(options.gate_normalizer)}


KINDS: dict[str, MixerKind] = {
    "linear": MixerKind("linear", linear_mixer, True, "causal linear attention, no decay"),
    "retention": MixerKind(
        "retention", retention_mixer, True, "causal linear attention with a learned constant decay per kv head",
        parameters=_retention_parameters,
    ),
    "gla": MixerKind(
        "gla", gla_mixer, True, "gated linear attention, gates from the keys (no new parameters)", kwargs=_gla_kwargs
    ),
    "bidirectional": MixerKind(
        "bidirectional", bidirectional_mixer, False, "non-causal linear attention for encoders"
    ),
}
"""Every mixer kind by name."""

__all__ = ["KINDS", "POSITIVE_FEATURE_MAPS", "MixerKind", "SiteShape"]
