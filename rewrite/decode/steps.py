"""Per-kind recurrent steps of the linear mixer sites: prefill a prompt into a state, then decode.

Every mixer kind that can decode exposes `MixerKind.step(q, k, v, *params, state=..., **kwargs)`
(SDPA layout, a few new tokens from a state). This module adds what the decode loop needs around
it:

- a padding-aware prefill: left-padded tokens must neither write nor decay the state. For the
  kinds built on the linear-attention kernel with a fixed feature map (`linear`, `retention`,
  `gla`) the prefill runs the chunked kernel once with the padded tokens' values zeroed and their
  decay set to 0 (`chunked_prefill`); any other kind prefills each row from its first real token
  with the kind's own step;
- a clear error naming the layer and the kind for a kind that has no step.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

from rewrite.errors import RewriteError

KERNEL_FEATURE_MAPS = {"identity": "identity", "elu1": "elu", "relu": "relu", "softmax": "softmax"}
"""Feature maps the linear-attention kernel applies itself (mixer option name -> kernel name)."""

NORMALIZER_EPS = 1e-6
"""The mixers' normalisation epsilon: o = num / (den + eps)."""

CHUNKED_KINDS = {"linear": 0, "retention": 1, "gla": 0}
"""Kinds `chunked_prefill` handles, with how many new parameters their sites take."""

SITE_ONLY_KWARGS = ("mask", "mask_negated", "check_mask", "layer")
"""Keyword arguments of a mixer site that its step does not take."""

INPLACE_STATE = False
"""Whether a decode step whose kind's step takes `inplace` (linear, retention, gla, lawcat) writes the held
recurrent state in place (the step kernel writes it: no copy of the state per layer and step) instead of
returning a new state that the decode state copies into its buffer. Same values either way. Off: with
`FUSED_STEP_NORMALIZE` it saved 1% of the compiled, graphed batch-1 step on an H100 (inside the spread)."""


def kind_step(kind: str, layer: str) -> Callable[..., tuple[torch.Tensor, Any]]:
    """The recurrent step of mixer kind `kind`; raises naming `layer` when the kind has none."""
    from rewrite.mixers import KINDS

    spec = KINDS.get(kind)
    step = getattr(spec, "step", None) if spec is not None else None
    if step is None:
        able = sorted(name for name, k in KINDS.items() if getattr(k, "step", None) is not None)
        raise RewriteError(
            f"{layer}: mixer kind {kind!r} has no recurrent step, so this layer cannot decode token by token "
            f"(kinds that can: {', '.join(able)})"
        )
    return step


def step_kwargs(step: Callable[..., Any], site_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The site's keyword arguments that `step` accepts (masks and labels are the site's business)."""
    accepted = inspect.signature(step).parameters
    return {k: v for k, v in site_kwargs.items() if k not in SITE_ONLY_KWARGS and k in accepted}


def writes_in_place(step: Callable[..., Any]) -> bool:
    """Whether `step` can update a given state in place (it takes `inplace`) and INPLACE_STATE is on."""
    return INPLACE_STATE and "inplace" in inspect.signature(step).parameters


def can_chunk(kind: str, params: tuple, site_kwargs: dict[str, Any]) -> bool:
    """Whether `chunked_prefill` covers this site (a kernel-side feature map, no learned weights)."""
    return (
        kind in CHUNKED_KINDS
        and len(params) == CHUNKED_KINDS[kind]
        and site_kwargs.get("feature_map", "identity") in KERNEL_FEATURE_MAPS
    )


def _log_decay(kind: str, k: torch.Tensor, params: tuple, kwargs: dict[str, Any], valid: torch.Tensor | None):
    """(g, decay) in the kernel's layout for `kind`, with padded tokens not decaying."""
    from rewrite.kernels.linear_attention.feature_maps import log_decay_from_keys

    batch, _, length, _ = k.shape
    if kind == "linear":
        return None, "none"
    if kind == "retention":
        g = F.logsigmoid(params[0].float())
        if valid is None:
            return g, "constant"
        g, decay = g.expand(batch, length, -1), "scalar"
    else:  # gla
        decay = kwargs.get("gate", "vector")
        g = log_decay_from_keys(k.transpose(1, 2), decay, float(kwargs.get("gate_normalizer", 16.0)))
    if valid is not None:
        g = g * valid.view(*valid.shape, *([1] * (g.dim() - 2))).to(g.dtype)
    return g, decay


def chunked_prefill(
    kind: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    params: tuple,
    kwargs: dict[str, Any],
    valid: torch.Tensor | None,
    state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, H, T, Dv], new state) of a `linear` / `retention` / `gla` site over T tokens from `state`.

    Same values as the kind's full-sequence mixer on those tokens (the kernel's state layout:
    [B, Hkv, K, Dv (+1 when normalising)] float32), computed with the chunked kernel.
    """
    from rewrite.kernels.linear_attention import linear_attention

    g, decay = _log_decay(kind, k, params, kwargs, valid)
    normalize = bool(kwargs.get("normalize", False))
    scale = kwargs.get("scale")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if normalize:
        vt = torch.cat([vt, vt.new_ones(*vt.shape[:-1], 1)], dim=-1)
    if valid is not None:
        vt = vt * valid[:, :, None, None].to(vt.dtype)
    o, state = linear_attention(
        qt, kt, vt, g, decay=decay, scale=scale, initial_state=state, output_final_state=True, causal=True,
        feature_map=KERNEL_FEATURE_MAPS[kwargs.get("feature_map", "identity")],
    )
    if normalize:
        o = o[..., :-1] / (o[..., -1:] + NORMALIZER_EPS)
    return o.transpose(1, 2), state


def rowwise_prefill(
    step: Callable[..., tuple[torch.Tensor, Any]],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    params: tuple,
    kwargs: dict[str, Any],
    valid: torch.Tensor,
) -> tuple[torch.Tensor, Any]:
    """A left-padded prefill with a kind's own step, one row at a time from its first real token.

    Only for a fresh state (nothing before these tokens). Outputs at padded tokens are 0; the
    rows' states are concatenated along their first (batch) dim.
    """
    out = q.new_zeros(*q.shape[:-1], v.shape[-1])
    states = []
    for row in range(q.shape[0]):
        real = valid[row]
        first = int(real.long().argmax()) if bool(real.any()) else q.shape[2]
        if not bool(real[first:].all()):
            raise RewriteError("prefill padding must be on the left (pad tokens first, then the prompt)")
        start = min(first, q.shape[2] - 1)  # a row of padding only still gets a state (from its last token)
        o, state = step(q[row : row + 1, :, start:], k[row : row + 1, :, start:], v[row : row + 1, :, start:],
                        *params, state=None, **kwargs)
        out[row : row + 1, :, start:] = o
        states.append(state)
    merged = pytree.tree_map(lambda *leaves: torch.cat(leaves, dim=0), *states)
    return out, merged
