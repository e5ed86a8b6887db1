"""Functions the varlen pass puts in the graph: unpad once, pack token inputs, repad outputs, attend.

A packed tensor keeps the rank and dim order of the padded tensor it stands for, with the batch dim
of size 1 and the sequence dim of size T (the real tokens of every row, row after row). So views,
transposes and broadcasts of the model run unchanged on packed tensors once their sizes say 1 and T.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch

_CAPACITY: ContextVar[tuple[int, int | None] | None] = ContextVar("varlen_token_capacity", default=None)


@contextlib.contextmanager
def token_capacity(capacity: int, sequences: int | None = None) -> Iterator[None]:
    """Within the block, every packed size is fixed without reading a tensor on the host: the static shapes a
    CUDA graph replays.

    Padded input: unpadding makes exactly `capacity` packed tokens (at least the real ones). The packed
    tokens past the real ones are filler: copies of a real token that no sequence of `cu_seqlens` holds,
    so no token mixes with them, and repadding drops them. `max_seqlen` is then the padded length.
    Already-packed input: `max_seqlen` is the row's length, the checks of the sequence boundaries run on
    the device, and restarting `position_ids` must hold exactly `sequences` sequences.
    """
    if capacity < 0 or (sequences is not None and sequences < 0):
        raise ValueError(f"varlen: the token capacity and sequence count must be >= 0, got {capacity}, {sequences}")
    mark = _CAPACITY.set((capacity, sequences))
    try:
        yield
    finally:
        _CAPACITY.reset(mark)


def _checks_on_device() -> bool:
    """Whether a check must stay on the device (a CUDA graph being captured, or tracing) instead of raising."""
    return torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def static_capacity() -> int | None:
    """The packed token count fixed by `token_capacity`, or None when unpadding keeps exactly the real tokens."""
    static = _CAPACITY.get()
    return None if static is None else static[0]


def _static_sequences() -> int:
    static = _CAPACITY.get()
    if static is None or static[1] is None:
        raise ValueError("varlen: a static layout of restarting position_ids needs their sequence count "
                         "(token_capacity(tokens, sequences=N))")
    return static[1]


def _sequence_starts(bounds: torch.Tensor, total: int) -> torch.Tensor:
    """[T] first token of each token's sequence of `bounds` [N + 1] (int64, N >= 1), with static shapes; tokens
    past the last sequence (filler) count as the last one's."""
    sequence = torch.searchsorted(bounds[1:], torch.arange(total, device=bounds.device), right=True)
    return bounds[:-1].index_select(0, sequence.clamp(max=bounds.numel() - 2))


def _positions_in_sequences(bounds: torch.Tensor, total: int) -> torch.Tensor:
    """[T] position of each token within its sequence of `bounds` [N + 1] (int64), with static shapes."""
    tokens = torch.arange(total, device=bounds.device)
    return tokens - _sequence_starts(bounds, total) if bounds.numel() > 1 else tokens


def padding_keep(mask: torch.Tensor, pads_are_true: bool) -> torch.Tensor:
    """[B, L] bool, True at real tokens, from a padding mask (1 = real, or True = padding when `pads_are_true`)."""
    if mask.dim() != 2:
        raise ValueError(f"varlen: the padding mask must be [batch, seq], got shape {tuple(mask.shape)}")
    return mask == 0 if pads_are_true else mask != 0


def unpad_layout(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """(indices [T], cu_seqlens [B + 1] int32, max_seqlen, positions [T]) of the real tokens in `keep` [B, L].

    indices are flat positions b * L + l of real tokens in row order; row b's tokens are packed rows
    cu_seqlens[b] .. cu_seqlens[b + 1] - 1; positions count each row's real tokens from 0. A row
    without real tokens is an empty sequence (its outputs are repadded as zeros).
    """
    flat = keep.reshape(-1)
    lengths = keep.sum(dim=1)
    cu_seqlens = torch.zeros(keep.shape[0] + 1, dtype=torch.int32, device=keep.device)
    cu_seqlens[1:] = lengths.cumsum(0)
    capacity = static_capacity()
    if capacity is None:
        indices = flat.nonzero().squeeze(1)
        max_seqlen = lengths.max().item() if keep.shape[0] > 0 else 0
        gather = indices
    else:  # static shapes: filler slots hold index B * L (one past the last token), which repadding drops
        total = flat.numel()
        slot = torch.where(flat, flat.long().cumsum(0) - 1, capacity)  # padding goes to a spare slot
        indices = torch.full((capacity + 1,), total, dtype=torch.long, device=keep.device)
        indices.scatter_(0, slot, torch.arange(total, device=keep.device))
        indices = indices[:capacity]
        max_seqlen = keep.shape[1]
        gather = indices.clamp(max=max(total - 1, 0))
    positions = (keep.cumsum(dim=1) - 1).reshape(-1).index_select(0, gather)
    return indices, cu_seqlens, max_seqlen, positions


def packed_layout(position_ids: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor]:
    """(cu_seqlens, max_seqlen, positions [T]) of already-packed tokens whose positions restart at 0 per sequence.

    position_ids is [1, T] (or [T]); a new sequence starts wherever the position is 0.
    """
    positions = position_ids.reshape(-1)
    if positions.dim() != 1 or (position_ids.dim() == 2 and position_ids.shape[0] != 1):
        raise ValueError(f"varlen: packed position_ids must be [1, T], got shape {tuple(position_ids.shape)}")
    total = positions.shape[0]
    if static_capacity() is not None:
        starts = torch.nonzero_static(positions == 0, size=_static_sequences(), fill_value=total).squeeze(1)
        bounds = torch.cat([starts.new_zeros(1), starts[1:], starts.new_full((1,), total)])
        expected = _positions_in_sequences(bounds, total)
        ok = (expected == positions.to(expected.dtype)).all() & (starts[:1] == 0).all()
        message = "varlen: packed position_ids must count 0, 1, 2, ... within each sequence"
        if _checks_on_device():
            torch._assert_async(ok, message)
        elif not bool(ok):
            raise ValueError(message)
        return bounds.to(torch.int32), total, positions
    starts = (positions == 0).nonzero().squeeze(1)
    if total > 0 and (starts.numel() == 0 or int(starts[0]) != 0):
        raise ValueError("varlen: packed position_ids must start each sequence at 0 (the first token's is not 0)")
    bounds = torch.cat([starts, torch.tensor([total], device=positions.device)])
    lengths = bounds[1:] - bounds[:-1]
    expected = torch.arange(total, device=positions.device) - torch.repeat_interleave(bounds[:-1], lengths)
    if not torch.equal(expected, positions.to(expected.dtype)):
        raise ValueError("varlen: packed position_ids must count 0, 1, 2, ... within each sequence")
    cu_seqlens = bounds.to(torch.int32)
    max_seqlen = int(lengths.max()) if lengths.numel() else 0
    return cu_seqlens, max_seqlen, positions


def pack_tokens(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """x [B, L, ...] -> [1, T, ...]: the real tokens, row after row (then filler, under `token_capacity`)."""
    rows = x.flatten(0, 1)
    if static_capacity() is not None:
        indices = indices.clamp(max=max(rows.shape[0] - 1, 0))  # filler copies the last token
    return rows.index_select(0, indices).unsqueeze(0)


def repad_tokens(
    x: torch.Tensor, indices: torch.Tensor, batch: int, seq: int, batch_dim: int | None, seq_dim: int,
    *, seq_outer: bool = False,
) -> torch.Tensor:
    """The padded tensor a packed `x` stands for, with zeros at padded tokens.

    x has size 1 at `batch_dim` and T at `seq_dim`; batch_dim None means the two are merged into
    one dim of size T at `seq_dim` (the padded tensor then has B * L there, batch outer, or sequence
    outer when `seq_outer`).
    """
    spare = int(static_capacity() is not None)  # a row past the end takes the filler tokens
    if batch_dim is None:
        if seq_outer:
            moved = (indices % seq) * batch + indices // seq
            indices = torch.where(indices < batch * seq, moved, indices) if spare else moved
        rows = x.movedim(seq_dim, 0)
        out = rows.new_zeros(batch * seq + spare, *rows.shape[1:]).index_copy(0, indices, rows)
        return out[: batch * seq].movedim(0, seq_dim)
    rows = x.squeeze(batch_dim)
    s = seq_dim - (1 if batch_dim < seq_dim else 0)
    rows = rows.movedim(s, 0)
    out = rows.new_zeros(batch * seq + spare, *rows.shape[1:]).index_copy(0, indices, rows)
    out = out[: batch * seq].view(batch, seq, *rows.shape[1:])
    return out.movedim((0, 1), (batch_dim, seq_dim))


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool,
    scale: float | None,
    backend: str = "auto",
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """SDPA's layout on packed tensors: q [1, H, T, D], k / v [1, Hkv, T, D] -> o [1, H, T, Dv], per sequence.

    With attention dropout (a model in training mode) each sequence runs through SDPA on its own, since
    the varlen kernels have no dropout.
    """
    from rewrite.kernels.varlen_attention import varlen_attention  # loaded on first use

    if dropout_p > 0:
        return _attention_per_sequence(q, k, v, cu_seqlens, causal, scale, dropout_p)

    def tokens_first(x: torch.Tensor) -> torch.Tensor:
        return x.squeeze(0).transpose(0, 1)

    o = varlen_attention(
        tokens_first(q), tokens_first(k), tokens_first(v), cu_seqlens, max_seqlen,
        causal=causal, scale=scale, backend=backend, check_bounds=False,
    )
    return o.transpose(0, 1).unsqueeze(0)


def packed_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    window: int,
    scale: float | None,
    backend: str = "auto",
    dropout_p: float = 0.0,
    lookahead: int = 0,
) -> torch.Tensor:
    """Sliding-window attention per sequence on packed tensors (SDPA's layout, q [1, H, T, D], k / v [1, Hkv, T, D]
    -> o [1, H, T, Dv]): each query sees the last `window` keys of its own sequence, itself included, and the next
    `lookahead` keys of it (0: causal; > 0: a bidirectional window such as ModernBERT's local layers).

    Runs `rewrite::sliding_window_attention` with cu_seqlens (the PyTorch reference on CPU, Triton on CUDA);
    backend "reference" runs the reference on any device. With attention dropout each sequence runs through SDPA
    with the window as a mask.
    """
    from rewrite.kernels.packed_bounds import trusted_cu_seqlens  # loaded on first use
    from rewrite.kernels.sliding_window.api import sliding_window_attention
    from rewrite.kernels.sliding_window.reference import sliding_window_reference

    if dropout_p > 0:
        return _attention_per_sequence(q, k, v, cu_seqlens, lookahead == 0, scale, dropout_p, window=window,
                                       lookahead=lookahead)
    qt, kt, vt = (x.squeeze(0).transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, T, heads, D]
    if backend == "reference":
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        o = sliding_window_reference(qt, kt, vt, window, 0, scale, cu_seqlens, lookahead)[0]
    else:
        with trusted_cu_seqlens():  # built by unpad_layout / the packed layouts: no host read to check it
            o = sliding_window_attention(qt, kt, vt, window, scale=scale, cu_seqlens=cu_seqlens, lookahead=lookahead)
    return o.transpose(1, 2)


def contiguous_rows(keep: torch.Tensor, what: str) -> torch.Tensor:
    """`keep` [B, L], once every row's real tokens are checked to be one run (left or right padding, no holes).

    A sliding window counted between row slots (Hugging Face counts it between cache positions) equals the window
    counted between the packed tokens only on such rows. Raises ValueError naming the first row with a hole; under
    tracing and with a static token capacity (CUDA-graph replay) it is a device-side assert without the details.
    """
    from torch._subclasses.fake_tensor import is_fake

    before = torch.cat([keep.new_zeros(keep.shape[0], 1), keep[:, :-1]], dim=1)
    runs = (keep & ~before).sum(dim=1)
    bad = runs > 1
    message = (f"varlen: {what} counts its sliding window between row slots, which equals the window over the packed "
               "tokens only when each row's real tokens are contiguous (left or right padding)")
    if torch.compiler.is_compiling() or is_fake(bad) or static_capacity() is not None:
        torch._assert_async(bad.any().logical_not(), message)
        return keep
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"{message}; row {row} has padding between real tokens (attention_mask "
                         f"{keep[row].int().tolist()}). Pad on the left or on the right only")
    return keep


def _attention_per_sequence(q, k, v, cu_seqlens, causal: bool, scale: float | None, dropout_p: float,
                            window: int | None = None, lookahead: int = 0):
    bounds = cu_seqlens.tolist()
    gqa = q.shape[1] != k.shape[1]

    def mask(length: int) -> torch.Tensor | None:
        if window is None:
            return None
        t = torch.arange(length, device=q.device)
        return (t[None, :] <= t[:, None] + lookahead) & (t[:, None] - t[None, :] < window)

    pieces = [torch.nn.functional.scaled_dot_product_attention(
        q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], attn_mask=mask(e - s), dropout_p=dropout_p,
        is_causal=causal and window is None, scale=scale, enable_gqa=gqa)
        for s, e in zip(bounds, bounds[1:]) if e > s]
    if not pieces:
        return q.new_zeros(*q.shape[:-1], v.shape[-1])
    return torch.cat(pieces, dim=2)


def shifted_positions(positions: torch.Tensor, start: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-token positions [T] offset by `start`, in `dtype` (what `arange(start, start + L)` becomes)."""
    return (positions + start).to(dtype)


def cu_seqlens_layout(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, int, torch.Tensor]:
    """(cu_seqlens int32, max_seqlen, positions [T]) of packed tokens whose sequences cu_seqlens [N + 1] gives."""
    bounds = cu_seqlens.reshape(-1).to(torch.int64)
    lengths = bounds[1:] - bounds[:-1]
    if static_capacity() is not None and bounds.numel() >= 2:
        ok = (bounds[0] == 0) & (bounds[-1] == total) & (lengths >= 0).all()
        if _checks_on_device():
            torch._assert_async(ok, f"varlen: cu_seqlens must rise from 0 to the {total} packed tokens")
        elif not bool(ok):
            raise ValueError(f"varlen: cu_seqlens must rise from 0 to the {total} packed tokens, got {bounds.tolist()}")
        return bounds.to(torch.int32), total, _positions_in_sequences(bounds, total)
    if bounds.numel() < 2 or int(bounds[0]) != 0 or int(bounds[-1]) != total or bool((lengths < 0).any()):
        raise ValueError(f"varlen: cu_seqlens must rise from 0 to the {total} packed tokens, got {bounds.tolist()}")
    positions = torch.arange(total, device=bounds.device) - torch.repeat_interleave(bounds[:-1], lengths)
    return bounds.to(torch.int32), int(lengths.max()) if lengths.numel() else 0, positions


def packed_mixer(kind: str, cu_seqlens: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *params,
                 **kwargs) -> torch.Tensor:
    """The linear mixer `kind` of the `mixer` pass (SDPA layout, packed [1, H, T, D]) run within each sequence.

    A mixer that takes `cu_seqlens` (every built-in kind) gets it: one call over all sequences, whose
    kernels reset states, conv windows and normalisers at each sequence start, without reading
    `cu_seqlens` back to the host. Any other runs once per
    sequence on its slice of the tokens, so state never flows from one sequence into the next.
    """
    from rewrite.kernels.packed_bounds import trusted_cu_seqlens  # loaded on first use
    from rewrite.mixers import KINDS  # the mixer registry, loaded on first use

    fn = KINDS[kind].fn
    if mixer_takes_cu_seqlens(kind):
        with trusted_cu_seqlens():  # built (or checked once) by this runtime: the kernels need not read it back
            return fn(q, k, v, *params, cu_seqlens=cu_seqlens, **kwargs)
    bounds = cu_seqlens.tolist()
    pieces = [fn(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], *params, **kwargs)
              for s, e in zip(bounds, bounds[1:]) if e > s]
    if not pieces:
        return q.new_zeros(*q.shape[:-1], v.shape[-1])
    return torch.cat(pieces, dim=2)


def mixer_takes_cu_seqlens(kind: str) -> bool:
    """Whether the function of mixer kind `kind` takes `cu_seqlens` (packed sequences in one call)."""
    from rewrite.mixers import KINDS  # the mixer registry, loaded on first use

    return "cu_seqlens" in _parameters_of(KINDS[kind].fn)


def _parameters_of(fn) -> frozenset[str]:
    import inspect

    try:
        return frozenset(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return frozenset()


def segmented_cumsum(x: torch.Tensor, dim: int, cu_seqlens: torch.Tensor, dtype: torch.dtype | None = None
                     ) -> torch.Tensor:
    """cumsum of packed `x` along its token dim `dim`, restarting at each sequence of cu_seqlens."""
    total = x.cumsum(dim, dtype=dtype)
    tokens = x.shape[dim]
    bounds = cu_seqlens.long()
    if bounds.numel() < 2:
        return total
    start = _sequence_starts(bounds, tokens)
    before = total.index_select(dim, (start - 1).clamp(min=0))
    shape = [1] * x.dim()
    shape[dim % x.dim()] = tokens
    return total - before * (start > 0).view(shape)


def check_zero_at_padding(
    packed: torch.Tensor, padded: torch.Tensor, keep: torch.Tensor, batch_dim: int, seq_dim: int, what: str,
    names: tuple[str, ...], sources: tuple[torch.Tensor, ...],
) -> torch.Tensor:
    """`packed`, once `padded` (the same value on the padded batch) is checked to be 0 at every padded token that
    precedes a real token of its row; raises ValueError naming the first one that is not.

    A cumsum over the tokens of such a value adds only zeros at padding before each real token, so at real
    tokens it equals the cumsum restarted per sequence (RoBERTa's positions, `cumsum(input_ids != pad_id)`).
    Under tracing (export, Inductor) and with a static token capacity (CUDA-graph replay) the check becomes a
    device-side assert without the details.
    """
    from torch._subclasses.fake_tensor import is_fake

    nonzero = padded.movedim((batch_dim, seq_dim), (0, 1)) != 0
    nonzero = nonzero.reshape(*nonzero.shape[:2], -1).any(dim=2)
    before_real = keep.flip(1).cumsum(1).flip(1) > 0  # a real token at or after this position
    bad = nonzero & ~keep & before_real
    if torch.compiler.is_compiling() or is_fake(bad) or static_capacity() is not None:
        torch._assert_async(bad.any().logical_not(), f"varlen: {what}: the counted value must be 0 at padding before "
                            "a real token (put the pad token there, or pass position_ids explicitly)")
        return packed
    if not bool(bad.any()):
        return packed
    row, pos = (int(i) for i in bad.nonzero()[0])
    held = ", ".join(f"{name} = {src[row, pos].tolist()}" for name, src in zip(names, sources)
                     if src.dim() >= 2 and src.shape[:2] == keep.shape)
    raise ValueError(
        f"varlen: {what}; the padding-free module restarts that count per sequence, which equals the padded "
        f"model only where the counted value is 0 at padding before a row's real tokens. Row {row}, position {pos} "
        f"is padding but the value is not 0 there ({held or 'see the inputs'}). Put the pad token at padded "
        "positions (e.g. input_ids[attention_mask == 0] = pad_token_id) or pass position_ids explicitly")


def packed_causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         cu_seqlens: torch.Tensor) -> torch.Tensor:
    """`conv1d(x, weight, bias, padding=K-1, groups=C)[..., :T]` of packed x [1, C, T] (weight [C, 1, K]), restarted
    at each sequence of cu_seqlens: no token reads another sequence's inputs."""
    from rewrite.kernels.short_conv import short_conv

    y, _ = short_conv(x.transpose(1, 2), weight[:, 0], bias, cu_seqlens=cu_seqlens)
    return y.transpose(1, 2)
