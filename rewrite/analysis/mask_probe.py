"""Decide whether an attention mask is causal by evaluating the graph that builds it on example inputs.

Hugging Face models fold causality and padding into one mask tensor; the graph that builds it is
small (it reads only the inputs' shapes and the padding mask), so running it once is cheap and
exact for those inputs. A mask is called causal when every key after its query is hidden and no
row is fully hidden for queries whose own position is visible. A mask built from input *shapes*
alone (no padding mask among the inputs) is the same for every input of those shapes, so a
causal one can be replaced by SDPA's `is_causal=True`.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx

from rewrite.analysis.attention_sites import find_attention_sites
from rewrite.analysis.graph_utils import ancestors, attribute_tensor, subgraph_module, walk_inputs

aten = torch.ops.aten

CAUSAL_KEY = "rewrite_mask_causal"
EXACTLY_CAUSAL_KEY = "rewrite_mask_exactly_causal"
SHAPE_ONLY_KEY = "rewrite_mask_shape_only"
BIAS_KEY = "rewrite_mask_bias"
"""Node metadata: the (additive) mask holds values that neither keep (0) nor hide a key: a position bias such as
ALiBi folded into the mask; how it varies is said by `mask_bias_description`."""
SEQUENCE_CAUSAL_KEY = "rewrite_mask_sequence_causal"
"""Node metadata, for a mask that hides every future key: whether, on the example, each real query sees exactly the
real keys from its sequence's start up to itself, sequences restarting where packed ones do (`sequence_causal`);
False for a sliding window or block pattern that hides earlier keys of the query's own sequence."""
PACKED_KEY = "rewrite_mask_packed"
"""Node metadata, for a sequence-causal mask: whether the example's mask restarts a sequence inside a row (a packed
row's block-diagonal causal mask, which a pass must carry as sequence boundaries)."""
TABLE_WINDOW_KEY = "rewrite_table_window"
"""Placeholder metadata: the window of the square table a state input holds (`table_window`), recorded by
`annotate_mask_causality` from the example inputs for the buffers the masks read (they arrive as inputs under
torch.compile, tagged `state_name`); `window_constant` counts it as it counts a constant table of the module."""
UNSEEN_WINDOW_KEY = "rewrite_mask_unseen_window"
"""Node metadata: a window-like constant of the mask graph too large for the example to show its effect."""
CHUNK_KEY = "rewrite_mask_chunk"
"""Node metadata, for a mask that hides every future key: the chunk size N when the mask is chunked local attention
(Llama 4's local layers): block-diagonal causal with blocks of N slots at fixed places (multiples of N from the row's
first real slot, or from slot 0), each real query seeing only the real keys of its own chunk. It is told from a packed
example's block-diagonal mask (`PACKED_KEY`) by its evidence (`chunk_size`); None when the mask is not chunked."""
UNSEEN_CHUNK_KEY = "rewrite_mask_unseen_chunk"
"""Node metadata: a chunk-like divisor of positions in the mask graph (`chunk_constants`) that no sequence of the
example is long enough to cross: the example shows causal attention, longer inputs would show chunks."""

_OFFSET_OPS = (
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Scalar, aten.rsub.Tensor,
    aten.lt.Scalar, aten.le.Scalar, aten.gt.Scalar, aten.ge.Scalar, aten.tril.default, aten.triu.default,
)
"""Ops through which an integer constant becomes a distance between query and key positions."""


def window_constant(masks: list[fx.Node]) -> int:
    """The largest integer constant that offsets or compares positions in the graphs building `masks`
    (a sliding window, a band, a chunk size), or 0 when there is none.

    A mask whose graph holds such a constant W can differ from a causal / padding mask only between
    positions at least W apart, so a probe must be longer than W + 1 tokens to see what it is. A mask sliced from
    a square constant table of the module (GPT-Neo's local layers keep their window in a [N, N] buffer) counts the
    table's window (`_table_window`).
    """
    largest = 0
    for node in ancestors(masks):
        if node.op == "get_attr":
            largest = max(largest, _table_window(node))
        if node.op == "placeholder":  # a table that arrives as an input (a buffer under torch.compile)
            largest = max(largest, node.meta.get(TABLE_WINDOW_KEY, 0))
        if node.op != "call_function" or node.target not in _OFFSET_OPS:
            continue
        for arg in node.args[1:]:
            if isinstance(arg, int) and not isinstance(arg, bool):
                largest = max(largest, abs(arg))
    return largest


def _table_window(node: fx.Node) -> int:
    """For a constant [.., N, N] table of 0 / 1 (or bool) values, read as the keys to keep or as the keys to hide: 0
    when each row i keeps every column up to i or every column (a causal or a full table), W when row i keeps exactly
    the columns (i - W, i] (a band of W), else N (a pattern a probe must be longer than the table to see). 0 for
    other constants."""
    return table_window(attribute_tensor(node.graph.owning_module, node))


def table_window(value: Any) -> int:
    """`_table_window` of a tensor value (0 for anything that is not a square table)."""
    if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[-1] != value.shape[-2]:
        return 0
    known = _TABLE_WINDOWS.get(id(value))  # read once per table: every pass asks for every layer's mask
    if known is not None and known[0]() is value and known[1] == value._version:
        return known[2]
    window = _window_of_table(value)
    key = id(value)
    _TABLE_WINDOWS[key] = (weakref.ref(value, lambda _, key=key: _TABLE_WINDOWS.pop(key, None)), value._version, window)
    return window


_TABLE_WINDOWS: dict[int, tuple[weakref.ref, int, int]] = {}
"""Windows of the tables read so far: (the table, its version when read, its window) by the table's id; an entry
leaves with its table, and a table changed in place since is read again."""


def _window_of_table(value: torch.Tensor) -> int:
    n = value.shape[-1]
    if n < 2 or not bool(((value == 0) | (value == 1)).all()):
        return 0
    rows = torch.arange(n)
    causal = rows[None, :] <= rows[:, None]
    for table in (value.reshape(-1, n, n).bool(), ~value.reshape(-1, n, n).bool()):  # keep or hide table
        if bool((table == causal).all()) or bool(table.all()):
            return 0
        width = int(table.sum(-1).max())  # a band keeps min(i + 1, W) columns ending at i
        if bool((table == (causal & (rows[:, None] - rows[None, :] < width))).all()):
            return width
    return n


_CHUNK_OPS = tuple(
    op for op in (aten.floor_divide.default, aten.floor_divide.Scalar, aten.div.Tensor_mode, aten.div.Scalar_mode,
                  aten.remainder.Scalar, aten.remainder.Tensor)
)
"""Ops through which an integer constant cuts positions into chunks (`pos // N`, `pos % N`)."""


def chunk_constants(masks: list[fx.Node]) -> set[int]:
    """The integer constants (> 1) that positions are divided by (floor) or taken modulo in the graphs building
    `masks`: the chunk sizes of a chunked local attention mask such as Llama 4's `(k - pad) // N == (q - pad) // N`.

    `window_constant` does not count them: a chunk of N tokens is shown by an example of N + 1 tokens, and a sequence
    crossing a chunk start looks like two packed sequences (`chunk_size` tells the two apart).
    """
    found: set[int] = set()
    for node in ancestors(masks):
        if node.op != "call_function" or node.target not in _CHUNK_OPS:
            continue
        if node.target in (aten.div.Tensor_mode, aten.div.Scalar_mode) and node.kwargs.get("rounding_mode") != "floor":
            continue
        arg = node.args[1] if len(node.args) > 1 else None
        if isinstance(arg, int) and not isinstance(arg, bool) and arg > 1:
            found.add(arg)
    return found


def _reads_input_values(mask: fx.Node) -> bool:
    """Whether the mask is computed from the *values* of a model input (not only from shapes)."""
    return any(n.op == "placeholder" and not n.meta.get("state_name") for n in walk_inputs([mask], _value_inputs))


def _value_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs of `node` whose values it reads: a size read (`sym_size`) of a model input reads no value."""
    shape_read = node.op == "call_function" and _is_shape_read(node)
    return [a for a in node.all_input_nodes if not (shape_read and a.op == "placeholder")]


def _is_shape_read(node: fx.Node) -> bool:
    name = getattr(node.target, "__name__", str(node.target))
    return name.startswith("sym_size") or name.startswith("sym_numel") or name.startswith("sym_stride")


PROBE_BLOCK_ELEMENTS = 1 << 26
"""Most mask elements one step of the checks below reads at a time: a [.., L, L] mask is checked in blocks of
query rows, so the checks hold no [L, L] temporaries (a 128K-token mask is 16 GiB as booleans)."""


def _row_blocks(mask: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, mask[..., rows, :]) over blocks of query rows (dim -2) of at most PROBE_BLOCK_ELEMENTS, with
    broadcast leading dims read once (`_distinct_rows`: the checks ask whether any / every element holds)."""
    if mask.dim() > 2:
        mask = _distinct_rows(mask)
    rows = mask.shape[-2] if mask.dim() >= 2 else 1
    per_row = max(1, mask.numel() // max(1, rows))
    step = max(1, PROBE_BLOCK_ELEMENTS // per_row)
    if mask.dim() < 2:
        yield 0, mask
        return
    for first in range(0, rows, step):
        yield first, mask[..., first:first + step, :]


def _visible(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def _causality(mask: torch.Tensor) -> tuple[bool, bool]:
    """(every future key is hidden, the mask is exactly the causal mask) of a [..., L, L] mask.

    The first allows more hiding (padding, a window); the second means every earlier key is visible too.
    """
    if mask.dim() < 2 or mask.shape[-1] != mask.shape[-2]:
        return False, False
    n = mask.shape[-1]
    keys = torch.arange(n, device=mask.device)
    hides_future, exact = True, True
    for first, block in _row_blocks(mask):
        visible = _visible(block)
        queries = torch.arange(first, first + block.shape[-2], device=mask.device)
        earlier = keys[None, :] <= queries[:, None]  # the causal mask's rows of this block
        hides_future = hides_future and not bool((visible & ~earlier).any())
        if not hides_future:
            return False, False
        exact = exact and bool((visible | ~earlier).all())
    return hides_future, exact


HIDDEN_BELOW = -1e4
"""An additive mask value at or below this hides its key (`-inf`, `finfo.min`, the old `-10000.0`)."""


def holds_bias(mask: torch.Tensor) -> bool:
    """Whether an additive float mask holds values that neither keep (0) nor hide (<= `HIDDEN_BELOW`) a key."""
    return any(bool(((block != 0) & (block > HIDDEN_BELOW)).any()) for _, block in _row_blocks(mask))


def _differs_per_head(mask: torch.Tensor) -> bool:
    """Whether a [.., H, L, S] mask's heads (dim -3) hold different values."""
    return any(bool((block != block[..., :1, :, :]).any()) for _, block in _row_blocks(mask))


def mask_bias_description(mask: torch.Tensor) -> str | None:
    """What an additive mask adds besides keeping and hiding keys, or None when it only keeps (0) and hides
    (<= `HIDDEN_BELOW`): an ALiBi-like bias (different per head) or another additive bias."""
    if mask.dtype == torch.bool or not mask.is_floating_point():
        return None
    if not holds_bias(mask):
        return None
    if mask.dim() >= 3 and mask.shape[-3] > 1 and _differs_per_head(mask):
        return ("the attention mask carries an additive bias that differs per head (ALiBi or another position bias "
                "folded into the mask)")
    return "the attention mask carries an additive bias (values that neither keep a key, 0, nor hide it)"


def _distinct_rows(mask: torch.Tensor) -> torch.Tensor:
    """`mask` with each broadcast leading dim (stride 0: the same [L, S] for every index) cut to size 1, so that
    flattening its leading dims copies nothing that is only repeated (a mask expanded over heads)."""
    broadcast = [stride == 0 and size > 1 for stride, size in zip(mask.stride()[:-2], mask.shape[:-2])]
    if not any(broadcast):
        return mask
    return mask[tuple(slice(0, 1) if b else slice(None) for b in broadcast)]


def sequence_causal(mask: torch.Tensor) -> bool:
    """Whether a [..., L, L] mask (True / 0 = visible) is causal attention over each sequence's real tokens.

    Real tokens are those that see themselves. Each real query must see exactly the real keys from some first key
    up to itself, and that first key must be the previous real query's or the query itself: a packed row restarts
    its sequences (a block-diagonal causal mask), padding hides keys, but nothing hides an earlier key of the
    query's own sequence. A sliding window of W tokens shown by the example (more than W + 1 tokens) fails: its
    first key moves on by one per query. (A window of 1 is indistinguishable from sequences of one token.)
    """
    return _sequence_starts(mask) is not None


def _restarts(real: torch.Tensor, first: torch.Tensor) -> bool:
    """Whether some row's real queries (`_sequence_starts`) start their sequences at more than one key: a packed row's
    block-diagonal mask restarts a sequence inside the row."""
    for row_real, row_first in zip(real, first):
        starts = row_first[row_real]
        if starts.numel() and bool((starts != starts[0]).any()):
            return True
    return False


def _chunk_pattern(real: torch.Tensor, first: torch.Tensor, size: int) -> bool:
    """Whether every row's real queries (`_sequence_starts`) start at their chunk of `size` slots: the first real key
    at or after the chunk start, chunks counted from slot 0 or from the row's first real slot (left padding)."""
    slots = torch.arange(real.shape[-1], device=real.device)
    for row_real, row_first in zip(real, first):
        positions, firsts = slots[row_real], row_first[row_real]
        if not positions.numel():
            continue
        matched = False
        for origin in {0, int(positions[0])}:
            starts = origin + torch.div(positions - origin, size, rounding_mode="floor") * size
            if torch.equal(positions[torch.searchsorted(positions, starts)], firsts):
                matched = True
                break
        if not matched:
            return False
    return True


def _first_block(real: torch.Tensor, first: torch.Tensor) -> int | None:
    """The length in slots of the first block of the first row that restarts (where its second block starts)."""
    for row_real, row_first in zip(real, first):
        firsts = row_first[row_real]
        later = firsts[firsts != firsts[0]] if firsts.numel() else firsts
        if later.numel():
            return int(later[0])
    return None


def chunk_size(real: torch.Tensor, first: torch.Tensor, constants: set[int], shape_only: bool) -> int | None:
    """The chunk size N of a block-diagonal causal mask (`_sequence_starts`'s real queries and first keys, some row
    restarting) when it is chunked local attention, else None (sequences packed by the example).

    Blocks of N slots at multiples of N could also be sequences of N tokens packed by the example; a chunked mask is
    told by one of two pieces of evidence: its graph divides positions by N (`chunk_constants`), or it reads no input
    value (a shape-only mask is the same for every input, so its blocks are the model's, not the example's).
    """
    candidates = set(constants)
    if shape_only:
        block = _first_block(real, first)
        if block:
            candidates.add(block)
    for size in sorted(candidates):
        if _chunk_pattern(real, first, size):
            return size
    return None


def _sequence_starts(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """([rows, L] real queries, [rows, L] each query's first visible key) of a `sequence_causal` mask, with its
    leading dims flattened (broadcast ones read once); None when the mask is not sequence-causal."""
    if mask.dim() < 2 or mask.shape[-1] != mask.shape[-2]:
        return None
    def kept(x: torch.Tensor) -> torch.Tensor:
        return x > HIDDEN_BELOW if x.is_floating_point() else x.bool()

    n = mask.shape[-1]
    flat = _distinct_rows(mask).reshape(-1, n, n)
    keys = torch.arange(n, device=mask.device)
    real = kept(flat.diagonal(dim1=-2, dim2=-1))  # [rows, n]: the queries that see themselves
    first = torch.zeros(flat.shape[0], n, dtype=torch.long, device=mask.device)
    for start, block in _row_blocks(flat):
        queries = keys[start:start + block.shape[-2]]
        seen = kept(block) & real[:, None, :]
        rows = real[:, queries]
        firsts = torch.where(seen, keys, n).amin(-1)  # the first visible real key of each query
        expected = real[:, None, :] & (keys >= firsts[..., None]) & (keys <= queries[:, None])
        if bool(((seen != expected) & rows[..., None]).any()):
            return None
        first[:, queries] = firsts
    for row_real, row_first in zip(real, first):
        positions, firsts = keys[row_real], row_first[row_real]
        if not bool(((firsts[1:] == firsts[:-1]) | (firsts[1:] == positions[1:])).all()):
            return None
    return real, first


def most_keys_seen(mask: torch.Tensor) -> int:
    """The most keys any one real query (one that sees itself, where the mask is square) of a [..., L, S] mask
    (True / 0 = visible) sees: on a causal mask, the longest stretch of a sequence the example shows (a packed
    row's longest sequence, not the row)."""
    if mask.dim() < 2:
        return int(mask.shape[-1]) if mask.dim() else 1
    square = mask.shape[-1] == mask.shape[-2]
    most = 0
    for first, block in _row_blocks(mask):
        counts = _visible(block).sum(-1)
        if square:
            rows = torch.arange(block.shape[-2], device=mask.device)
            counts = counts * _visible(block[..., rows, rows + first])
        most = max(most, int(counts.amax()))
    return most


def _chunk_facts(node: fx.Node, shown: torch.Tensor) -> None:
    """Record on a mask that hides every future key whether it is causal over each sequence's real tokens, whether
    the example packs sequences into a row, and whether it is chunked local attention (shown or not by the example)."""
    exact = node.meta[EXACTLY_CAUSAL_KEY]
    starts = None if exact else _sequence_starts(shown)  # one walk for every fact
    packed = starts is not None and _restarts(*starts)
    constants = chunk_constants([node])
    chunk = chunk_size(*starts, constants, node.meta[SHAPE_ONLY_KEY]) if packed else None
    node.meta[CHUNK_KEY] = chunk
    # a chunked mask hides earlier keys of a query's own sequence: not sequence-causal, and not packed
    node.meta[SEQUENCE_CAUSAL_KEY] = (exact or starts is not None) and chunk is None
    node.meta[PACKED_KEY] = packed and chunk is None
    if chunk is None and constants and not packed and most_keys_seen(shown) <= max(constants):
        # no sequence of the example crosses a chunk of the largest divisor: longer inputs may show chunks
        node.meta[EXACTLY_CAUSAL_KEY] = False
        node.meta[UNSEEN_CHUNK_KEY] = max(constants)


def annotate_mask_causality(gm: fx.GraphModule, flat_inputs: list[Any]) -> dict[str, bool]:
    """Evaluate every attention mask on `flat_inputs`; record in node.meta whether it is causal."""
    sites = [s for s in find_attention_sites(gm) if isinstance(s.mask, fx.Node)]
    negated = {s.mask: s.mask_negated for s in sites}
    masks = list(negated)
    if not masks:
        return {}
    if any(n.op == "call_module" for n in ancestors(masks)):
        return {}
    runner, _ = subgraph_module(gm, masks, every_input=True)
    position = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    for node in ancestors(masks):  # state only: a user input (a [B, T] padding mask with B == T) is no table
        if node in position and node.meta.get("state_name") and position[node] < len(flat_inputs):
            node.meta[TABLE_WINDOW_KEY] = table_window(flat_inputs[position[node]])
    with torch.no_grad():
        try:
            values = runner(*flat_inputs)
        except Exception:  # the mask graph needs something we cannot give it: leave masks undecided
            return {}
    out = {}
    for node, val in zip(masks, values):
        if isinstance(val, torch.Tensor):
            if negated[node]:
                val = ~val if val.dtype == torch.bool else val
            node.meta[CAUSAL_KEY], node.meta[EXACTLY_CAUSAL_KEY] = _causality(val)
            shown = val == 0 if negated[node] and val.is_floating_point() else val
            window = window_constant([node])
            if window and val.dim() >= 1 and most_keys_seen(shown) < window + 2:
                # a window longer than any sequence of the example (a packed row's sequences counted one by one):
                # what the example shows says nothing about longer inputs
                node.meta[EXACTLY_CAUSAL_KEY] = False
                node.meta[UNSEEN_WINDOW_KEY] = window
            node.meta[SHAPE_ONLY_KEY] = not _reads_input_values(node)
            if node.meta[CAUSAL_KEY]:
                _chunk_facts(node, shown)
            if not negated[node]:
                node.meta[BIAS_KEY] = mask_bias_description(val)
            out[node.name] = node.meta[CAUSAL_KEY]
    return out
