"""The functions the `stateful` pass puts in the graph: attention, mixer and causal-conv sites that read and
write a `DecodeState`, and positions that continue from the tokens already seen.

Each takes the program's `decode_state` input first. They are plain functions (not ops) because
the state is a Python object; the tensors they compute with go through the kernels' ops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from rewrite.decode.state import DecodeState
from rewrite.decode.steps import (
    can_chunk,
    chunked_prefill,
    kind_step,
    rowwise_prefill,
    step_kwargs,
    writes_in_place,
)
from rewrite.errors import RewriteError
from rewrite.kernels.kv_cache_attention import kv_cache_attention
from rewrite.kernels.layout import in_layout_of
from rewrite.mixers.masks import MIXER_LIMIT

WINDOW_ADVICE = "a sliding window or a block pattern? set the `stateful` pass's sliding_window / window_layers"
"""What a kept softmax layer whose prefill mask is not causal can do (a mixer site says the mixer's limit)."""

KV_CACHE_ATTENTION_KERNEL = True
"""When True, `_grouped_attention` (decode attention over a KV cache, full or ring) runs the split-KV Triton op
`rewrite::kv_cache_attention` on the devices in KV_CACHE_ATTENTION_DEVICES instead of SDPA with a boolean mask:
its programs are (row x kv head x slice of slots), so its time follows the rows a routed block runs. On by
default since an H100 timed it (BENCHMARKS.md, 2026-12-06 seventh session: graphed decode steps of a 16-layer
Llama at batch 32, 16K context 0.70-0.91x SDPA's time, nothing slower); False gives SDPA back."""
KV_CACHE_ATTENTION_DEVICES = ("cuda",)
"""Device types the switch applies on (tests add "cpu", where the op runs its PyTorch reference)."""
KV_CACHE_ATTENTION_MAX_ROWS = 64
"""Most q heads per kv head x new tokens the op takes (one tile of rows per program): decode steps, not prompts."""
PROMPT_MASK_ELEMENTS = 1 << 29
"""Most elements (rows x q heads per kv head x queries x keys) of the boolean mask one SDPA call of a prompt over a
KV cache is given: a longer padded or continued prompt attends in blocks of queries, each with its own mask, so
that no call materialises the whole [B, G*T, S] mask (32 rows of a padded 16K prompt would be 34 GB as bools)."""


def _check_prefill_mask(
    state: DecodeState, mask: torch.Tensor | None, negated: bool, check: bool, layer: str, window: int | None = None,
    advice: str = WINDOW_ADVICE,
) -> None:
    """In a prefill call, refuse a mask that is not causal among the real tokens (a sliding window,
    a block pattern, an additive bias): the state carries only which slots are real, so any other
    pattern would be lost. Padded tokens are the state's business and are not compared."""
    if mask is None or not check or state.static or state.tokens < 2:
        return
    from rewrite.analysis.mask_probe import holds_bias
    from rewrite.mixers.masks import visible

    def refuse(why: str) -> RewriteError:
        return RewriteError(f"stateful decode at {layer}: {why}; a decode state carries only causal attention "
                            "over real tokens")

    if mask.is_floating_point() and not negated and holds_bias(mask):
        raise refuse("the attention mask holds additive bias values (neither 0 nor hidden)")
    vis = visible(mask, negated)
    while vis.dim() < 4:
        vis = vis.unsqueeze(0)
    count = state.tokens
    if vis.shape[-1] != count or vis.shape[-2] not in (1, count):
        raise refuse(f"the attention mask has shape {tuple(mask.shape)} for {count} new tokens")
    causal = torch.ones(count, count, dtype=torch.bool, device=vis.device).tril()
    if window is not None:
        causal = causal & ~torch.ones_like(causal).tril(-window)
    real = state.step_valid.to(vis.device)
    compared = real[:, None, :, None] & real[:, None, None, :]
    if bool(((vis != causal) & compared).any()):
        form = f"causal within a window of {window} tokens" if window is not None else "causal"
        raise refuse(f"the attention mask is not {form} among the real tokens ({advice})")


def stateful_attention(
    decode_state: DecodeState,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    site: str,
    scale: float | None = None,
    mask_negated: bool = False,
    check_mask: bool = True,
    window: int | None = None,
    layer: str = "",
) -> torch.Tensor:
    """Causal softmax attention of the new tokens over every real token so far, through a KV cache.

    q [B, H, T, D], k / v [B, Hkv, T, D] (GQA without repeating) -> o [B, H, T, Dv]. The new keys and
    values are written into `site`'s cache at the call's slots; a padded query sees only itself, so
    its (unused) output stays finite. With `window`, a query sees only the last `window` tokens and the
cache is a ring of `window` slots.
    `layer` names the site in errors.
    """
    _check_prefill_mask(decode_state, mask, mask_negated, check_mask, layer or site, window)
    slots = decode_state.slots
    # static first: a static step reads no Python value that changes per step (a compiled step would recompile)
    fresh = not decode_state.static and decode_state.length == 0 and not decode_state.padded
    if window is not None:
        return _windowed_attention(decode_state, q, k, v, site=site, scale=scale, window=window, fresh=fresh)
    cache = decode_state.kv_cache(site, k, v)
    decode_state.write_kv(cache, slots, k, v)
    if fresh:  # a fresh, unpadded prompt: plain causal attention over its own keys (the fused kernels apply)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] > k.shape[1])
    end = decode_state.visible_end()
    keys, values = decode_state.read_kv(cache, end)
    o = _attention_in_query_blocks(q, keys, values, lambda queries: decode_state.visible_mask(end, queries), scale,
                                   slots)
    return o if q.shape[2] == 1 else in_layout_of(o, q)  # as SDPA lays it out (one token: every layout views alike)


def _attention_in_query_blocks(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask_of: Callable[[slice | None], torch.Tensor],
    scale: float | None, query_slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """`_grouped_attention` of the call's queries, in blocks of queries where the whole call's mask would pass
    PROMPT_MASK_ELEMENTS; `mask_of(None)` is the call's mask [B, 1, T, S], `mask_of(queries)` a block's. With
    `query_slots` [T] (ascending cache slots of a full cache's queries), no query sees a slot after its block's last."""
    def last_slot(queries: slice) -> torch.Tensor | None:
        return None if query_slots is None else query_slots[queries][-1:]

    block = _query_block(q, keys)
    if block >= q.shape[2]:
        return _grouped_attention(q, keys, values, mask_of(None), scale, last_slot(slice(None)))
    blocks = [slice(start, start + block) for start in range(0, q.shape[2], block)]
    return torch.cat([_grouped_attention(q[:, :, queries], keys, values, mask_of(queries), scale, last_slot(queries))
                      for queries in blocks], dim=2)


def _query_block(q: torch.Tensor, keys: torch.Tensor) -> int:
    """Queries per SDPA call of q [B, H, T, D] over keys [B, Hkv, S, D]: all T unless the call's mask would pass
    PROMPT_MASK_ELEMENTS."""
    batch, heads, count, _ = q.shape
    per_query = batch * (heads // keys.shape[1]) * keys.shape[2]
    return count if per_query * count <= PROMPT_MASK_ELEMENTS else max(1, PROMPT_MASK_ELEMENTS // per_query)


def _grouped_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, scale: float | None,
    last_slot: torch.Tensor | None = None,
) -> torch.Tensor:
    """SDPA of q [B, H, T, D] over keys / values [B, Hkv, S, D] with visible [B, 1, T, S]; the query
    heads of one kv head attend together, so the cache is never copied per query head. `last_slot` ([1]: no query
    sees a slot after it, as `visible` already says) lets the split-KV kernel leave the slots after it unread."""
    if _kv_cache_kernel_applies(q, keys, values):
        return kv_cache_attention(q, keys, values, visible, scale, last_slot)
    batch, heads, count, _ = q.shape
    kv_heads, slots = keys.shape[1], keys.shape[2]
    groups = heads // kv_heads
    grouped = q.reshape(batch, kv_heads, groups * count, q.shape[-1])
    if groups > 1:
        visible = visible.expand(batch, groups, count, slots).reshape(batch, 1, groups * count, slots)
    o = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=visible, scale=scale)
    return o.reshape(batch, heads, count, values.shape[-1])


def _kv_cache_kernel_applies(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether KV_CACHE_ATTENTION_KERNEL sends this attention to the split-KV op: switch on, a listed device, one
    dtype the kernel takes, head dims it tiles, a decode step's few queries, no gradient asked (forward only)."""
    if not KV_CACHE_ATTENTION_KERNEL or q.device.type not in KV_CACHE_ATTENTION_DEVICES:
        return False
    if not (q.dtype == keys.dtype == values.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    if max(q.shape[-1], values.shape[-1]) > 256 or q.shape[1] // keys.shape[1] * q.shape[2] > KV_CACHE_ATTENTION_MAX_ROWS:
        return False
    return not (torch.is_grad_enabled() and any(x.requires_grad for x in (q, keys, values)))


def _windowed_attention(
    state: DecodeState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, site: str, scale: float | None,
    window: int, fresh: bool,
) -> torch.Tensor:
    """Causal attention over the last `window` tokens through a ring cache of `window` slots."""
    ring = state.ring_cache(site, k, v, window)
    slots, count = state.slots, q.shape[2]
    k, v = k.to(ring.keys.dtype), v.to(ring.values.dtype)
    if fresh and count <= window:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] > k.shape[1])
    elif count == 1:  # decoding: write the token, then attend over the ring
        _ring_write(ring, state, k, v, slots, window)
        keys, values = state.read_kv(ring)
        visible = _window_mask(ring.slot, state.ring_valid(ring), slots, window, state.padded)
        return _grouped_attention(q, keys, values, visible, scale)
    else:  # a prompt (chunk): the ring's past slots and the chunk's own, in blocks of queries (PROMPT_MASK_ELEMENTS)
        key_slots = torch.cat([ring.slot, slots])
        valid = torch.cat([state.ring_valid(ring), state.step_valid], dim=1)
        keys, values = state.read_kv(ring)
        keys, values = torch.cat([keys, k], 2), torch.cat([values, v], 2)
        o = _attention_in_query_blocks(
            q, keys, values,
            lambda queries: _window_mask(key_slots, valid, slots if queries is None else slots[queries], window,
                                         state.padded),
            scale,
        )
        o = in_layout_of(o, q)  # as SDPA lays it out
    _ring_write(ring, state, k, v, slots, window)
    return o


def _window_mask(key_slots: torch.Tensor, valid: torch.Tensor, query_slots: torch.Tensor, window: int,
                 padded: bool) -> torch.Tensor:
    """[B, 1, T, S]: a query sees the real keys of the last `window` slots up to its own (and itself); `padded`:
    whether the call holds padded queries (a real query's own key is among the real keys already)."""
    near = (key_slots <= query_slots[:, None]) & (key_slots > query_slots[:, None] - window)
    visible = valid[:, None, None, :] & near
    return visible | (key_slots == query_slots[:, None]) if padded else visible


def _ring_write(ring: Any, state: DecodeState, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
                window: int) -> None:
    """Store the last `window` of the new tokens at their ring positions (slot % window)."""
    keep = min(slots.numel(), window)
    slots, k, v = slots[-keep:], k[:, :, -keep:], v[:, :, -keep:]
    index = slots % window
    state.write_kv(ring, index, k, v)
    ring.slot.index_copy_(0, index, slots)  # the slot an entry holds is the same for every row
    state.write_ring_valid(ring, index, state.step_valid[:, -keep:])


def stateful_mixer(
    decode_state: DecodeState,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *params: torch.Tensor,
    site: str,
    kind: str,
    **site_kwargs: Any,
) -> torch.Tensor:
    """A linear mixer site of kind `kind` over the new tokens, from and into `site`'s recurrent state.

    Same arguments as the mixer the `mixer` pass placed (SDPA layout, its new parameters, its
    keyword arguments); padded tokens of a prefill leave the state as it was.
    """
    layer = site_kwargs.get("layer") or site
    _check_prefill_mask(
        decode_state, site_kwargs.get("mask"), bool(site_kwargs.get("mask_negated", False)),
        bool(site_kwargs.get("check_mask", True)), layer, advice=MIXER_LIMIT,
    )
    step = kind_step(kind, layer)
    held = decode_state.recurrent(site)
    previous = held.value if held is not None else None
    padded = decode_state.padded
    if can_chunk(kind, params, site_kwargs) and (padded or decode_state.tokens > 1):
        o, new = chunked_prefill(kind, q, k, v, params, site_kwargs,
                                 decode_state.step_valid if padded else None, previous)
    elif not padded:
        kwargs = step_kwargs(step, site_kwargs)
        if previous is not None and writes_in_place(step):  # the kernel writes the held state (a view's: its rows)
            kwargs["inplace"] = True
        o, new = step(q, k, v, *params, state=previous, **kwargs)
    elif previous is None:
        o, new = rowwise_prefill(step, q, k, v, params, step_kwargs(step, site_kwargs), decode_state.step_valid)
    else:
        raise RewriteError(
            f"{layer}: mixer kind {kind!r} cannot take padded tokens after its state has started; "
            "pad only the first call (the prompt)"
        )
    decode_state.set_recurrent(site, new)
    return o


def stateful_conv(
    decode_state: DecodeState,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    site: str,
) -> torch.Tensor:
    """A causal depthwise conv over the new tokens x [B, C, T] (weight [C, 1, K]) that continues from the last K-1
    inputs `site` holds (zeros before a sequence's first token) and keeps its own last K-1 inputs for the next call.

    The padded tokens of a prompt enter it as zeros: left padding then reads as the zeros before the real tokens'
    start, so a padded row gets what the row alone would.
    """
    kernel = weight.shape[-1]
    if decode_state.padded:
        x = x * decode_state.step_valid[:, None, :].to(x.dtype)
    held = decode_state.recurrent(site)
    previous = held.value.to(x.dtype) if held is not None else x.new_zeros(x.shape[0], x.shape[1], kernel - 1)
    window = torch.cat([previous, x], dim=2)
    decode_state.set_recurrent(site, window[:, :, window.shape[2] - (kernel - 1):].contiguous())
    return F.conv1d(window, weight, bias, groups=x.shape[1])


def continued_positions(decode_state: DecodeState, positions: torch.Tensor) -> torch.Tensor:
    """Positions the model computes from the sequence length (0..T-1), moved past the tokens seen."""
    offset = decode_state.slots[:1] if decode_state.static else decode_state.length
    return positions + offset


def held_route(
    decode_state: DecodeState, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, **route_kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | int]:
    """A routed block's decision in a decode program: made by its router from the prompt at prefill
    (the first call of the state; pooled over real tokens only) and held for every later call.

    Same arguments and result as `rewrite.routing.layer_skip_route` with the state first; the count
    of running rows is a Python int. The decisions are kept in `decode_state.skips`; per-call knobs
    (`skip_controls`) apply at prefill. Prefill reads each router's decisions on the host once and
    prepares them for decoding (`decode_state.held`); a later call reads no tensor on the host.
    """
    from rewrite.routing.controls import call_state, current_controls
    from rewrite.routing.runtime import HeldDecisions, layer_skip_route

    layer, column, n_routed = route_kwargs["layer"], int(route_kwargs["column"]), int(route_kwargs["n_routed"])
    if decode_state.static and decode_state.held is not None:  # a graphed or compiled step: read no context
        _, skip, order, count = decode_state.held.column(column)
        return skip, order, count
    if current_controls().mode != "hard":
        raise RewriteError(f"stateful decode at {layer}: layer skipping decodes with hard decisions only, not mode "
                           f"{current_controls().mode!r}")
    if decode_state.rows is not None:
        raise RewriteError(f"stateful decode at {layer}: a routed block inside another routed block is not supported")
    if decode_state.length == 0 and not decode_state.static:  # prefill: the routers decide from the prompt
        if column == 0:
            decode_state.skips = torch.zeros(decode_state.batch, n_routed, dtype=torch.bool)
            decode_state.held = None
        elif decode_state.skips is None:
            raise RewriteError(f"stateful decode at {layer}: the first routed block did not run at prefill")
        valid = decode_state.step_valid if decode_state.padded else None
        skip, order, count = layer_skip_route(hidden, weight, bias, valid=valid, **route_kwargs)
        held = call_state().held
        if held is not None:  # skip_controls(skip_mask=): the decisions are on the host already
            decided = held.skip[:, column]
        else:  # the router decided: one read gives the decisions and the running rows' count
            decided = skip.detach().to("cpu", torch.bool)
            count = int((~decided).sum())
        decode_state.skips[:, column] = decided
        if column == n_routed - 1:  # every decision made: prepare them for the decode steps
            decode_state.held = HeldDecisions.of(decode_state.skips, hidden.device)
        return skip, order, count
    if decode_state.skips is None:
        raise RewriteError(f"stateful decode at {layer}: no decisions were made at prefill (the state's first call)")
    if decode_state.held is None:
        decode_state.held = HeldDecisions.of(decode_state.skips, hidden.device)
    return layer_skip_route(hidden, weight, bias, held=decode_state.held, **route_kwargs)
