"""Mixers that replace softmax attention: one module per kind, each a plain function in SDPA layout.

A kind is described by a `MixerKind`: the function the `mixer` pass puts in the graph, whether it
is causal, the new parameters it needs per site, the keyword arguments it takes from the pass
options, and its recurrent step for decoding. Adding a kind is one module plus one entry in `KINDS`.

Every kind's function is `fn(q, k, v, *new_parameters, mask=..., scale=..., layer=..., **kwargs)`
(with `teacher_qk=(q, k)`, the q and k attention transfer's softmax teacher reads when they are not the
mixer's own, see `transfer`) and every step is `step(q, k, v, *new_parameters, state=..., scale=..., **kwargs) -> (o, new_state)`,
both in SDPA layout (q [B, H, L, D], k / v [B, Hkv, L, D]). The parameters come in the order of
`MixerKind.parameters`; a learned feature map's (q, k) weights come last.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from rewrite.kernels.delta_rule.api import chunked_key_dim_refusal
from rewrite.mixers.bidirectional import bidirectional_mixer
from rewrite.mixers.common import LEARNED_FEATURE_MAPS, POSITIVE_FEATURE_MAPS, hedgehog_init
from rewrite.mixers.gated_deltanet import gated_deltanet_mixer, gated_deltanet_mixer_step
from rewrite.mixers.gla import gla_mixer, gla_mixer_step
from rewrite.mixers.hybrid_swa import hybrid_swa_mixer, hybrid_swa_mixer_step
from rewrite.mixers.lawcat import lawcat_mixer, lawcat_mixer_step
from rewrite.mixers.linear import linear_mixer, linear_mixer_step
from rewrite.mixers.mamba2 import (
    init_a_log,
    init_dt_bias,
    init_identity_conv,
    mamba2_mixer,
    mamba2_mixer_step,
)
from rewrite.mixers.retention import init_decay_logit, retention_mixer, retention_mixer_step
from rewrite.mixers.window import sliding_window_mixer, sliding_window_mixer_step


@dataclass(frozen=True)
class SiteShape:
    """What a kind needs to size and place its new parameters."""

    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    value_dim: int | None = None  # v's head dim when it differs from q / k's

    @property
    def v_dim(self) -> int:
        return self.head_dim if self.value_dim is None else self.value_dim


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
    feature_maps: bool = True  # takes the pass's feature_map (and its learned weights)
    normalizable: bool = True  # takes the pass's normalize
    step: Callable[..., tuple[torch.Tensor, Any]] | None = None  # recurrent step for decoding
    rope: str = "keep"  # default of the pass's `rope`: read q / k after the rotary embedding (keep) or before (drop)
    refusal: Callable[[SiteShape], str | None] | None = None  # why this kind cannot serve a site of this shape


def _placed(tensors: dict[str, torch.Tensor], shape: SiteShape) -> dict[str, torch.Tensor]:
    return {name: t.to(device=shape.device, dtype=shape.dtype) for name, t in tensors.items()}


def with_feature_map_parameters(
    make: Callable[[SiteShape, Any], dict[str, torch.Tensor]],
) -> Callable[[SiteShape, Any], dict[str, torch.Tensor]]:
    """`make`'s parameters followed by a learned feature map's (q, k) weights when the options ask for one."""

    def parameters(shape: SiteShape, options: Any) -> dict[str, torch.Tensor]:
        out = make(shape, options)
        if getattr(options, "feature_map", None) in LEARNED_FEATURE_MAPS:
            out = {
                **out,
                **_placed({
                    "feature_map_q": hedgehog_init(shape.heads, shape.head_dim),
                    "feature_map_k": hedgehog_init(shape.kv_heads, shape.head_dim),
                }, shape),
            }
        return out

    return parameters


def _retention_parameters(shape: SiteShape, options: Any) -> dict[str, torch.Tensor]:
    logit = init_decay_logit(shape.kv_heads, options.decay_min, options.decay_max)
    return _placed({"retention_decay_logit": logit}, shape)


def _deltanet_parameters(shape: SiteShape, options: Any) -> dict[str, torch.Tensor]:
    beta = float(options.beta_init)
    return _placed({
        "deltanet_beta_weight": torch.zeros(shape.kv_heads, shape.head_dim),
        "deltanet_beta_bias": torch.full((shape.kv_heads,), torch.logit(torch.tensor(beta)).item()),
        "deltanet_gate_weight": torch.zeros(shape.kv_heads, shape.head_dim),
        "deltanet_gate_bias": init_decay_logit(shape.kv_heads, options.decay_min, options.decay_max),
    }, shape)


def _mamba2_parameters(shape: SiteShape, options: Any) -> dict[str, torch.Tensor]:
    channels = shape.kv_heads * shape.v_dim + (shape.kv_heads + shape.heads) * shape.head_dim
    return _placed({
        "mamba_conv_weight": init_identity_conv(channels, options.conv_width),
        "mamba_dt_weight": torch.zeros(shape.kv_heads, shape.v_dim),
        "mamba_dt_bias": init_dt_bias(shape.kv_heads, options.dt_min, options.dt_max),
        "mamba_a_log": init_a_log(shape.kv_heads, options.a_min, options.a_max),
        "mamba_skip": torch.zeros(shape.heads),
    }, shape)


def _lawcat_parameters(shape: SiteShape, options: Any) -> dict[str, torch.Tensor]:
    return _placed({
        "lawcat_q_conv": init_identity_conv(shape.heads * shape.head_dim, options.conv_width),
        "lawcat_k_conv": init_identity_conv(shape.kv_heads * shape.head_dim, options.conv_width),
    }, shape)


def _hybrid_parameters(shape: SiteShape, options: Any) -> dict[str, torch.Tensor]:
    weight = torch.tensor(float(options.linear_weight))
    return _placed({"hybrid_linear_logit": torch.logit(weight).expand(shape.heads).clone()}, shape)


def _deltanet_refusal(shape: SiteShape) -> str | None:
    return chunked_key_dim_refusal(shape.head_dim, shape.device)


def _gla_kwargs(options: Any) -> dict[str, Any]:
    return {"gate": options.gate, "gate_normalizer": float(options.gate_normalizer)}


def _window_kwargs(options: Any) -> dict[str, Any]:
    return {"window": int(options.window), "sinks": int(options.sinks)}


def _hybrid_kwargs(options: Any) -> dict[str, Any]:
    return {**_window_kwargs(options), **_gla_kwargs(options)}


KINDS: dict[str, MixerKind] = {
    "linear": MixerKind(
        "linear", linear_mixer, True, "causal linear attention, no decay",
        parameters=with_feature_map_parameters(_no_parameters), step=linear_mixer_step,
    ),
    "retention": MixerKind(
        "retention", retention_mixer, True, "causal linear attention with a learned constant decay per kv head",
        parameters=with_feature_map_parameters(_retention_parameters), step=retention_mixer_step,
    ),
    "gla": MixerKind(
        "gla", gla_mixer, True, "gated linear attention, gates from the keys (no new parameters)",
        parameters=with_feature_map_parameters(_no_parameters), kwargs=_gla_kwargs, step=gla_mixer_step,
    ),
    "gated_deltanet": MixerKind(
        "gated_deltanet", gated_deltanet_mixer, True,
        "gated delta rule; write strength and decay from the keys through new per-head weights",
        parameters=with_feature_map_parameters(_deltanet_parameters), normalizable=False,
        step=gated_deltanet_mixer_step, refusal=_deltanet_refusal,
    ),
    "mamba2": MixerKind(
        "mamba2", mamba2_mixer, True, "Mamba-2 SSM initialised from attention (v->x, k->B, q->C) with new dt / A / conv",
        parameters=_mamba2_parameters, feature_maps=False, normalizable=False, step=mamba2_mixer_step,
    ),  # rope stays "keep": on our byte-level LM the recipe recovered more with RoPE kept (BENCHMARKS.md)
    "lawcat": MixerKind(
        "lawcat", lawcat_mixer, True, "causal short conv on q and k, then normalised gated linear attention",
        parameters=with_feature_map_parameters(_lawcat_parameters), kwargs=_gla_kwargs, step=lawcat_mixer_step,
    ),
    "hybrid_swa": MixerKind(
        "hybrid_swa", hybrid_swa_mixer, True,
        "sliding-window softmax (with sinks) plus gated linear attention beyond the window, one normalisation",
        parameters=with_feature_map_parameters(_hybrid_parameters), kwargs=_hybrid_kwargs, normalizable=False,
        step=hybrid_swa_mixer_step,
    ),
    "sliding_window": MixerKind(
        "sliding_window", sliding_window_mixer, True, "softmax over the last `window` tokens plus `sinks` first ones",
        kwargs=_window_kwargs, feature_maps=False, normalizable=False, step=sliding_window_mixer_step,
    ),
    "bidirectional": MixerKind(
        "bidirectional", bidirectional_mixer, False, "non-causal linear attention for encoders",
        parameters=with_feature_map_parameters(_no_parameters),
    ),
}
"""Every mixer kind by name."""

ROPE_CHOICES = ["keep", "drop"]
"""How a mixer reads q and k of a site with a rotary embedding: as the site sees them, or before the rotation."""

__all__ = ["KINDS", "LEARNED_FEATURE_MAPS", "POSITIVE_FEATURE_MAPS", "ROPE_CHOICES", "MixerKind", "SiteShape"]
