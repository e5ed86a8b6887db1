"""Decode state of one batch: a KV cache per softmax site, a recurrent state per linear mixer site and per causal
conv over the tokens (its last K-1 inputs).

The state lives in slots: every token a sequence has seen, padding included, holds one slot, and
all sequences of a batch advance together (left padding lines their last tokens up). `counts`
holds each sequence's real tokens so far (its next position) and `step_valid` which of the
current call's tokens are real. Only a program with a full softmax KV cache also keeps `valid`,
one entry per slot, so padded slots are never attended to; without one (linear mixers,
sliding-window rings) nothing in the state grows with the context. Tensors are allocated on first
use by the site that owns them and updated in place afterwards, so a captured CUDA graph of the
decode step reads and writes the same memory on every replay.

A routed block (the `layer_skip` pass) runs only some sequences; it sees the state through
`select_rows(rows)`, a view whose sites read and write only those sequences' rows. A cache or
recurrent state that a view allocates first holds that view's rows only (`routed_rows`): a routed
block's running rows are fixed at prefill, so the block reads and writes its own caches as they
are, without gathering, and no memory is kept for the sequences that skip it. The decisions made
at prefill are held in `skips`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from rewrite.errors import RewriteError
from rewrite.kernels.forward_only import forward_only_applies
from rewrite.kernels.kv_cache_write import kv_cache_write_


@dataclass
class KVCache:
    """Keys and values of one softmax site: [B, Hkv, capacity, D] each."""

    keys: torch.Tensor
    values: torch.Tensor
    routed_rows: int | None = None
    """Set when a row view allocated it: it holds that view's rows only, in the view's order."""

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


@dataclass
class RingKVCache:
    """Keys and values of a sliding-window softmax site: the last `size` slots only.

    keys / values [B, Hkv, size, D]; `slot` [size] is the slot each entry holds (-1: empty) and
    `valid` [B, size] whether that entry is a real token of its row. Slot s lives at s % size.
    """

    keys: torch.Tensor
    values: torch.Tensor
    slot: torch.Tensor
    valid: torch.Tensor
    routed_rows: int | None = None
    """Set when a row view allocated it: it holds that view's rows only, in the view's order."""

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.slot.nbytes + self.valid.nbytes


@dataclass
class RecurrentState:
    """The recurrent state of one linear mixer site (a tensor or a tuple of tensors, kind-specific) or causal conv
    site (its last K-1 inputs [B, C, K-1])."""

    value: Any
    routed_rows: int | None = None
    """Set when a row view allocated it: it holds that view's rows only, in the view's order."""

    def nbytes(self) -> int:
        return sum(t.nbytes for t in pytree.tree_leaves(self.value) if isinstance(t, torch.Tensor))

    def update(self, new: Any) -> None:
        """Write `new` into the held tensors (same structure, shapes and dtypes); a held tensor that `new`
        holds itself (a step wrote it in place) is left as it is, so no copy is made."""
        for old, fresh in zip(pytree.tree_leaves(self.value), pytree.tree_leaves(new), strict=True):
            if fresh is not old:
                old.copy_(fresh)


SLOT_BUCKET = 256
"""Eager decode steps attend over the filled KV-cache slots rounded up to a multiple of this."""

FUSED_KV_WRITE = True
"""Whether a decode program built while it is on (read when the program is built, as the other decode fusions'
switches are: `rewrite.decode.fusion_switches` "kv_write") stores the new keys and values of a cache its state owns
(full or ring) by one `rewrite::kv_cache_write_` call, one launch on CUDA that casts as well, instead of casting k / v
and two `index_copy_` (see `DecodeState.fused_kv_write`). On by default: with the other decode fusions it took a graphed batch-1
8K step from 2.35 to 1.55 ms (BENCHMARKS.md, 2026-12-07)."""


@dataclass
class DecodeState:
    """Everything a stateful program carries from one call to the next, for `batch` sequences.

    `capacity` bounds the slots of KV caches (prompt plus new tokens). `slot_mask` keeps `valid`
    [batch, capacity], whether each slot holds a real token, which a full softmax KV cache needs;
    without it (`valid` is None) the state holds no per-slot memory at all, and its size does not
    depend on `capacity` or on the tokens seen.
    """

    batch: int
    capacity: int
    device: torch.device
    length: int = 0
    slot_mask: bool = True
    """Whether to keep `valid`, the per-slot mask of real tokens (full softmax KV caches need it)."""
    layers: dict[str, KVCache | RingKVCache | RecurrentState] = field(default_factory=dict)
    static: bool = False
    """Set while a CUDA graph of the step is captured or replayed: full KV-cache sites attend over every slot."""
    skips: torch.Tensor | None = None
    """[batch, routed blocks] bool on the CPU: the layer-skip decisions made at prefill and held."""
    held: Any = None
    """`skips` prepared for the routed blocks (rewrite.routing.runtime.HeldDecisions), made once."""
    fused_kv_write: bool = False
    """Whether `write_kv` stores a cache's keys and values by one `rewrite::kv_cache_write_` call (set by the program
    calling it, from FUSED_KV_WRITE as it was when the program was built); not under autograd or while compiling
    (Inductor fuses the writes into the kernels that make k / v), nor on a row view reaching a whole-batch cache."""

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        self.valid: torch.Tensor | None = (
            torch.zeros(self.batch, self.capacity, dtype=torch.bool, device=self.device) if self.slot_mask else None
        )
        """[batch, capacity] bool: which slots hold real tokens (None without `slot_mask`)."""
        self.counts = torch.zeros(self.batch, dtype=torch.long, device=self.device)
        """[batch]: real tokens of each sequence so far, the current call's included once `begin` opened it."""
        self.slots = torch.zeros(0, dtype=torch.long, device=self.device)
        """[tokens]: the slots of the current call."""
        self.step_valid = torch.zeros(self.batch, 0, dtype=torch.bool, device=self.device)
        """[batch, tokens] bool: which of the current call's tokens are real."""
        self.padded = False
        """Whether the current call holds padded tokens."""
        self.rows: torch.Tensor | None = None
        """On a view from `select_rows`: the sequences it covers (None: all)."""
        self._visible: tuple[int, torch.Tensor] | None = None
        """(end, mask) of `visible_mask` in the current call (None: not made yet); every call starts without it."""

    # -- the loop's side ---------------------------------------------------------------------
    def positions(self, count: int, valid: torch.Tensor | None = None) -> torch.Tensor:
        """[B, count]: the positions of the next call's tokens (before `begin`): each real token
        continues its sequence's count of real tokens; a padded one takes its neighbour's (unused)."""
        if valid is None:
            return self.counts[:, None] + torch.arange(count, device=self.counts.device)
        return (self.counts[:, None] + valid.long().cumsum(-1) - 1).clamp(min=0)

    def begin(self, count: int, valid: torch.Tensor | None = None) -> None:
        """Open a call over `count` new tokens per sequence; `valid` [B, count] bool marks the real
        ones (None: all real, as in decoding)."""
        if self.length + count > self.capacity:
            raise RewriteError(
                f"decode state is full: {self.length} slots used + {count} new tokens > capacity {self.capacity}; "
                "allocate the state with a larger capacity (prompt length + max_new_tokens)"
            )
        if self.static:  # under a CUDA graph: one token per sequence, written into the captured buffers
            if count != 1:
                raise RewriteError(f"a CUDA-graph decode step takes one token per sequence, got {count}")
            self.slots.fill_(self.length)
            self.counts += 1
            if self.valid is not None:
                self.valid[:, self.length] = True
            return
        if valid is not None and tuple(valid.shape) != (self.batch, count):
            raise RewriteError(f"decode state holds {self.batch} sequences of {count} new tokens, got a mask of "
                               f"shape {tuple(valid.shape)}")
        self.slots = torch.arange(self.length, self.length + count, device=self.device)
        self.padded = valid is not None and not bool(valid.all())
        if valid is None:
            valid = torch.ones(self.batch, count, dtype=torch.bool, device=self.device)
        if self.valid is not None:
            self.valid[:, self.length : self.length + count] = valid
        self.counts += valid.to(self.device).sum(-1)
        self.step_valid = valid

    def grow(self, capacity: int) -> None:
        """Enlarge every slot buffer to `capacity` slots, keeping their content (not under a CUDA graph)."""
        if self.static:
            raise RewriteError("a decode state cannot grow while a CUDA graph replays it")
        extra = capacity - self.capacity
        if extra <= 0:
            return
        self.forget_call()
        if self.valid is not None:
            self.valid = torch.cat([self.valid, self.valid.new_zeros(self.batch, extra)], dim=1)
        for layer in self.layers.values():
            if isinstance(layer, KVCache):
                pad = (0, 0, 0, extra)
                layer.keys = torch.nn.functional.pad(layer.keys, pad)
                layer.values = torch.nn.functional.pad(layer.values, pad)
        self.capacity = capacity

    def start_static(self) -> None:
        """Enter static mode (for a CUDA graph of the one-token step, after the prefill): the call's
        slot and validity become fixed one-token buffers that `begin(1)` updates in place."""
        self.forget_call()
        self.slots = torch.full((1,), self.length, dtype=torch.long, device=self.device)
        self.step_valid = torch.ones(self.batch, 1, dtype=torch.bool, device=self.device)
        self.padded = False
        self.static = True

    def advance(self) -> None:
        """Close the call opened by `begin`: its tokens now belong to the past. Outside a CUDA graph the
        call's own `slots` / `step_valid` are dropped, so a prompt's length is not kept."""
        if self.rows is not None:
            raise RewriteError("a row view of a decode state cannot advance; advance the state itself")
        self.forget_call()
        self.length += self.slots.numel()
        if not self.static:
            self.slots = self.slots.new_zeros(0)
            self.step_valid = self.step_valid.new_zeros(self.batch, 0)
            self.padded = False

    def forget_call(self) -> None:
        """Drop what was made for the current call (its visible mask): the next call makes it anew. The loop's
        `begin` / `advance` and every program call do this, so nothing made for one step serves another."""
        self._visible = None

    # -- row views (routed blocks) ---------------------------------------------------------------
    def select_rows(self, rows: torch.Tensor, gathered: list[torch.Tensor] | None = None) -> DecodeState:
        """A view for the sequences `rows` [R] (ascending): its `valid` / `counts` / `step_valid` hold those
        rows (gathered when first read), its sites read and write only those rows. `gathered`: the rows `rows` of
        what `row_view_reads()` listed, gathered by the caller (a routed block, with its own inputs in one launch).

        A cache or recurrent state the view allocates holds only its R rows, and every later view
        reaching it must cover the same rows (a routed block's running rows, fixed at prefill); a
        view of other size reaching it is refused. One the whole state allocated is gathered and
        scattered by row.
        """
        return RowView(self, rows, visible=(self.visible_end(), *gathered) if gathered else None)

    def row_view_reads(self) -> list[torch.Tensor]:
        """What a row view of this state reads of the whole batch in a one-token step (batch along dim 0), for a
        caller that gathers it with its own inputs and hands it to `select_rows(rows, gathered)`: the step's
        visible mask where the state holds full KV caches (made now if not yet; the full-cache sites share it);
        nothing for a view, a longer call or a state without full caches."""
        if self.rows is not None or self.valid is None or self.slots.numel() != 1:
            return []
        if not any(isinstance(store, KVCache) for store in self.layers.values()):
            return []
        return [self.visible_mask(self.visible_end())]

    def _mine(self, t: torch.Tensor) -> torch.Tensor:
        """This view's rows of a whole-batch tensor (dim 0)."""
        return t if self.rows is None else t.index_select(0, self.rows)

    def _own_rows(self) -> int | None:
        """What a store this state allocates records as `routed_rows`: None for the whole state, a view's row count."""
        return None if self.rows is None else int(self.rows.shape[0])

    def _owns(self, store: KVCache | RingKVCache | RecurrentState) -> bool:
        """Whether `store` holds exactly this state's rows, in order (read and written as it is)."""
        if store.routed_rows is None:
            return self.rows is None
        if self.rows is None or self.rows.shape[0] != store.routed_rows:
            reader = "the whole batch" if self.rows is None else f"{self.rows.shape[0]} rows"
            raise RewriteError(f"decode state: a cache kept for the {store.routed_rows} running rows of a routed block "
                               f"is reached by {reader}; a routed block's rows must stay those of the prefill")
        return True

    def write_kv(self, cache: KVCache | RingKVCache, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store keys / values [R, Hkv, T, D] of this view's rows at cache positions `index` [T]."""
        owns = self._owns(cache)
        if owns and self.fused_kv_write and forward_only_applies(k, v):
            kv_cache_write_(cache.keys, cache.values, index, k, v)
            return
        k, v = k.to(cache.keys.dtype), v.to(cache.values.dtype)
        if owns:
            cache.keys.index_copy_(2, index, k)
            cache.values.index_copy_(2, index, v)
            return
        heads = torch.arange(k.shape[1], device=k.device)
        where = (self.rows[:, None, None], heads[None, :, None], index[None, None, :])
        cache.keys.index_put_(where, k)
        cache.values.index_put_(where, v)

    def read_kv(self, cache: KVCache | RingKVCache, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """This view's rows of the cache's keys and values, up to position `end` (all when None)."""
        keys, values = cache.keys, cache.values
        if end is not None:
            keys, values = keys[:, :, :end], values[:, :, :end]
        if self._owns(cache):
            return keys, values
        return self._mine(keys), self._mine(values)

    def ring_valid(self, ring: RingKVCache) -> torch.Tensor:
        """This view's rows of the ring's validity [R, size]."""
        return ring.valid if self._owns(ring) else self._mine(ring.valid)

    def write_ring_valid(self, ring: RingKVCache, index: torch.Tensor, valid: torch.Tensor) -> None:
        """Mark ring entries `index` [T] of this view's rows real or not (`valid` [R, T])."""
        if self._owns(ring):
            ring.valid.index_copy_(1, index, valid)
        else:
            ring.valid.index_put_((self.rows[:, None], index[None, :]), valid)

    # -- the sites' side -----------------------------------------------------------------------
    @property
    def tokens(self) -> int:
        """New tokens per sequence in the current call."""
        return self.slots.numel()

    def visible_end(self) -> int:
        """Slots a site attends over: those filled so far, rounded up to a multiple of `SLOT_BUCKET`
        (unfilled slots are masked), so consecutive eager steps share one attention shape and kernels
        that specialise on shapes are not rebuilt per step; every slot under a CUDA graph."""
        if self.static:
            return self.capacity
        filled = self.length + self.tokens
        return min(self.capacity, -(-filled // SLOT_BUCKET) * SLOT_BUCKET)

    def visible_mask(self, end: int, queries: slice | None = None) -> torch.Tensor:
        """[B, 1, T, end] bool: the slots below `end` each of the call's tokens attends to in a full KV cache
        (the real ones up to its own, and itself); made once per call (per view for a row view). With `queries`,
        only those tokens' rows [B, 1, t, end], made anew (a long prompt's block of queries)."""
        if queries is not None:
            return self._make_visible(end, self.slots[queries])
        made = self._visible
        if made is not None and made[0] == end:
            return made[1]
        mask = self._make_visible(end)
        self._visible = (end, mask)
        return mask

    def _make_visible(self, end: int, query_slots: torch.Tensor | None = None) -> torch.Tensor:
        valid = self.valid
        if valid is None:
            raise RewriteError("decode state: a full KV cache's visible mask needs the state's slot mask (slot_mask=True)")
        slots = (self.slots if query_slots is None else query_slots)[:, None]
        key_slots = torch.arange(end, device=slots.device)
        visible = valid[:, None, None, :end] & (key_slots <= slots)
        if self.padded:  # a padded query sees only itself; a real one's own slot is marked valid by `begin` already
            visible = visible | (key_slots == slots)
        return visible

    def kv_cache(self, site: str, k: torch.Tensor, v: torch.Tensor) -> KVCache:
        """The KV cache of `site`, allocated on first use from the new keys / values [B, Hkv, T, D]."""
        cache = self.layers.get(site)
        if cache is None and self.valid is None:
            raise RewriteError(f"decode state of {site}: a full KV cache needs the state's slot mask; this state was "
                               "made without one (slot_mask=False, for programs without full softmax sites)")
        if cache is None:
            rows = self.batch if self.rows is None else k.shape[0]
            keys = k.new_zeros(rows, k.shape[1], self.capacity, k.shape[-1])
            values = v.new_zeros(rows, v.shape[1], self.capacity, v.shape[-1])
            cache = self.layers[site] = KVCache(keys, values, self._own_rows())
        if not isinstance(cache, KVCache):
            raise RewriteError(f"decode state of {site} is a {type(cache).__name__}, not a KV cache")
        return cache

    def ring_cache(self, site: str, k: torch.Tensor, v: torch.Tensor, size: int) -> RingKVCache:
        """The ring cache of `size` slots of `site`, allocated on first use from keys / values [B, Hkv, T, D]."""
        cache = self.layers.get(site)
        if cache is None:
            rows = self.batch if self.rows is None else k.shape[0]
            cache = self.layers[site] = RingKVCache(
                k.new_zeros(rows, k.shape[1], size, k.shape[-1]),
                v.new_zeros(rows, v.shape[1], size, v.shape[-1]),
                torch.full((size,), -1, dtype=torch.long, device=k.device),
                torch.zeros(rows, size, dtype=torch.bool, device=k.device),
                self._own_rows(),
            )
        if not isinstance(cache, RingKVCache):
            raise RewriteError(f"decode state of {site} is a {type(cache).__name__}, not a ring cache")
        return cache

    def recurrent(self, site: str) -> RecurrentState | None:
        """The recurrent state of `site` (this view's rows of it), or None before its first call."""
        state = self.layers.get(site)
        if state is not None and not isinstance(state, RecurrentState):
            raise RewriteError(f"decode state of {site} is a {type(state).__name__}, not a recurrent state")
        if state is None or self._owns(state):
            return state
        return RecurrentState(pytree.tree_map(lambda t: self._mine(t) if isinstance(t, torch.Tensor) else t,
                                              state.value))

    def set_recurrent(self, site: str, value: Any) -> None:
        """Store the new recurrent state of `site` (in place once it exists); a view's first store holds
        its rows only. On a view reaching a whole-batch state, only its rows are written; every tensor
        of a recurrent state holds the batch in its first dim."""
        state = self.layers.get(site)
        if state is None:
            self.layers[site] = RecurrentState(value, self._own_rows())
            return
        if not isinstance(state, RecurrentState):
            raise RewriteError(f"decode state of {site} is a {type(state).__name__}, not a recurrent state")
        if self._owns(state):
            state.update(value)
            return
        rows = self.rows
        assert rows is not None
        for old, fresh in zip(pytree.tree_leaves(state.value), pytree.tree_leaves(value), strict=True):
            old.index_copy_(0, rows, fresh.to(old.dtype))

    def nbytes(self) -> dict[str, int]:
        """Bytes held: per kind of state ("kv_cache", "recurrent") and the bookkeeping ("valid": the
        slot mask if kept, the per-sequence counts, the current call's slots and validity); together,
        every tensor the state holds."""
        valid = self.counts.nbytes + self.slots.nbytes + self.step_valid.nbytes
        valid += 0 if self.valid is None else self.valid.nbytes
        out = {"kv_cache": 0, "recurrent": 0, "valid": valid}
        for layer in self.layers.values():
            out["recurrent" if isinstance(layer, RecurrentState) else "kv_cache"] += layer.nbytes()
        return out


_UNREAD: Any = object()
"""A row view's per-sequence field before its first read."""


class RowView(DecodeState):
    """`DecodeState.select_rows(rows)`: the state seen by the sequences `rows` (a routed block's running rows).

    It shares the state's caches and bookkeeping; its per-sequence fields (`valid`, `counts`,
    `step_valid`) are the state's rows `rows`, gathered when first read. Built attribute by attribute
    (no copy of the state object), so torch.compile traces it as plain Python.
    """

    def __init__(self, parent: DecodeState, rows: torch.Tensor, visible: tuple[int, torch.Tensor] | None = None):
        # no dataclass __init__: nothing allocated; `visible`: (end, mask) of the call, its rows gathered already
        self.batch, self.capacity, self.device = parent.batch, parent.capacity, parent.device
        self.slot_mask, self.layers = parent.slot_mask, parent.layers
        self.static, self.skips, self.held = parent.static, parent.skips, parent.held
        self.fused_kv_write = parent.fused_kv_write
        self.slots, self.padded = parent.slots, parent.padded
        self.rows = rows if parent.rows is None else parent.rows.index_select(0, rows)
        self._parent, self._local_rows = parent, rows
        self._valid, self._counts, self._step_valid = _UNREAD, _UNREAD, _UNREAD
        self._visible = visible

    @property
    def length(self) -> int:  # type: ignore[override]
        """Slots used so far: the state's (read when asked, so a compiled step that never asks does not
        depend on it)."""
        return self._parent.length

    def _make_visible(self, end: int, query_slots: torch.Tensor | None = None) -> torch.Tensor:
        """The state's mask of the call (made there if not yet), this view's rows of it; some queries' mask from
        this view's rows of the slot mask."""
        if query_slots is not None:
            return super()._make_visible(end, query_slots)
        return self._parent.visible_mask(end).index_select(0, self._local_rows)

    def _mine_of_parent(self, whole: torch.Tensor | None) -> torch.Tensor | None:
        return None if whole is None else whole.index_select(0, self._local_rows)

    @property
    def valid(self) -> torch.Tensor | None:  # type: ignore[override]
        """[rows, capacity] bool: which slots hold real tokens, for this view's rows (None without a slot mask)."""
        if self._valid is _UNREAD:
            self._valid = self._mine_of_parent(self._parent.valid)
        return self._valid

    @property
    def counts(self) -> torch.Tensor:  # type: ignore[override]
        """[rows]: real tokens of each of this view's sequences so far."""
        if self._counts is _UNREAD:
            self._counts = self._mine_of_parent(self._parent.counts)
        return self._counts

    @property
    def step_valid(self) -> torch.Tensor:  # type: ignore[override]
        """[rows, tokens] bool: which of the current call's tokens are real, for this view's rows."""
        if self._step_valid is _UNREAD:
            self._step_valid = self._mine_of_parent(self._parent.step_valid)
        return self._step_valid
