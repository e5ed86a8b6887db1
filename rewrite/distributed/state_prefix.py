"""The state each chunk of a split sequence starts from, from every earlier chunk's state: LASP-2 and all-scan.

A linear recurrence over a chunk of tokens maps its starting state I to  A ∘ I + S, where S is the
chunk's own final state (started from zero) and A the product of the chunk's transitions: a
per-key-row decay vector for gated / decayed linear attention (`A ∘ I = a[..., None] * I`), a
matrix for the delta rule (`A I`). Chunk c then starts from

    I_0 = 0,   I_{c+1} = A_c ∘ I_c + S_c,

so the products of the *preceding* chunks' decays weight each earlier state (the published LASP-2
code sums states without them, which is wrong for decayed and gated forms).

- **lasp2**: one all-gather of every chunk's (S, A), then each rank runs the short recurrence over
  the chunks before its own. Bytes received per rank grow with P - 1.
- **allscan**: a pipelined prefix over the ranks (ZeCO-like): rank r receives I_r from r - 1 in
  blocks along the value dim, and sends I_{r+1} to r + 1 block by block, so each rank receives one
  state whatever P is, and the pipeline has P + blocks - 1 steps. Contiguous layout only.
"""

from __future__ import annotations

import torch

from rewrite.distributed.collectives import all_gather
from rewrite.distributed.groups import GroupError, SequenceGroup
from rewrite.distributed.layout import chunks_per_rank

LINEAR_STRATEGIES = ("lasp2", "allscan")


def apply_transition(a: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """A ∘ state: a [..., K] scales key rows; a [..., K, K] multiplies on the left."""
    if a.dim() == state.dim():
        return a @ state
    return a[..., None] * state


def _transposed(a: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """A^T ∘ state (the adjoint of `apply_transition`)."""
    if a.dim() == state.dim():
        return a.transpose(-1, -2) @ state
    return a[..., None] * state


def _transition_grad(a: torch.Tensor, grad_out: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """Gradient of A ∘ state with respect to A, given the output's gradient."""
    if a.dim() == state.dim():
        return grad_out @ state.transpose(-1, -2)
    return (grad_out * state).sum(-1)


def lasp2_prefix(
    states: torch.Tensor, transitions: torch.Tensor, chunks: list[int], group: SequenceGroup
) -> list[torch.Tensor]:
    """Starting states of this rank's chunks. states [n, ...]; transitions [n, ...]; chunks: their global indices.

    One all-gather moves every rank's n chunk states and transitions (packed into one tensor).
    """
    n = states.shape[0]
    flat_s = states.reshape(n, -1)
    flat_a = transitions.reshape(n, -1)
    packed = torch.cat([flat_s, flat_a], dim=1)
    gathered = all_gather(packed, group)  # [P, n, ...]
    size = group.size
    all_s = gathered[..., : flat_s.shape[1]].reshape(size * n, *states.shape[1:])
    all_a = gathered[..., flat_s.shape[1]:].reshape(size * n, *transitions.shape[1:])
    # the gathered rows are (rank, local index); map them to global chunk order
    global_index = {_chunk_of(r, i, size): r * n + i for r in range(size) for i in range(n)}
    wanted = max(chunks)
    # zero, but computed from the gathered tensor: every rank must join the all-gather's backward,
    # including one (rank 0) whose outputs need no earlier chunk
    prefix = all_s[0] * 0
    starts: dict[int, torch.Tensor] = {}
    for c in range(wanted + 1):
        starts[c] = prefix
        row = global_index[c]
        prefix = apply_transition(all_a[row], prefix) + all_s[row]
    return [starts[c] for c in chunks]


def _chunk_of(rank: int, index: int, size: int) -> int:
    """Global chunk index of a rank's index-th segment (see `layout.segments`)."""
    return rank if index == 0 else 2 * size - 1 - rank


def total_state(states: torch.Tensor, group: SequenceGroup) -> torch.Tensor:
    """The sum of every chunk's state over the group (non-causal mixers): one all-gather."""
    return all_gather(states.sum(0), group).sum(0)


def _pipelined_chain(
    group: SequenceGroup, templates: list[torch.Tensor], reverse: bool, combine
) -> list[torch.Tensor]:
    """Pass blocks along the chain of ranks; returns what this rank received per block (zeros at the head).

    `combine(b, incoming)` gives the block this rank passes on. Every rank calls this together.
    """
    rank, size = group.rank, group.size
    pos = size - 1 - rank if reverse else rank
    prev = rank + 1 if reverse else rank - 1
    nxt = rank - 1 if reverse else rank + 1
    n = len(templates)
    received: list[torch.Tensor | None] = [None] * n
    for t in range(n + size - 1):
        b = t - pos
        send = None
        if 0 <= b < n:
            if received[b] is None:
                received[b] = torch.zeros_like(templates[b])
            if pos < size - 1:
                send = combine(b, received[b]).contiguous()
        b_next = t + 1 - pos
        src = prev if pos > 0 and 0 <= b_next < n else None
        got = group.exchange(send, nxt if send is not None else None, src,
                             like=templates[b_next] if src is not None else None)
        if got is not None:
            received[b_next] = got
    return [r if r is not None else torch.zeros_like(t) for r, t in zip(received, templates)]


class _AllScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, state: torch.Tensor, decay: torch.Tensor, group: SequenceGroup, blocks: int):
        pieces = list(torch.tensor_split(state, min(blocks, state.shape[-1]), dim=-1))
        incoming = _pipelined_chain(
            group, pieces, reverse=False, combine=lambda b, inc: apply_transition(decay, inc) + pieces[b]
        )
        start = torch.cat(incoming, dim=-1)
        ctx.save_for_backward(decay, start)
        ctx.group, ctx.blocks = group, len(pieces)
        return start

    @staticmethod
    def backward(ctx, grad_start: torch.Tensor):
        decay, start = ctx.saved_tensors
        pieces = list(torch.tensor_split(grad_start.contiguous(), ctx.blocks, dim=-1))
        # total gradient of the state this rank receives: its own use plus what later ranks pass back
        later = _pipelined_chain(
            ctx.group, pieces, reverse=True, combine=lambda b, inc: pieces[b] + _transposed(decay, inc)
        )
        grad_next = torch.cat(later, dim=-1)  # gradient of I_{r+1} = A_r ∘ I_r + S_r
        grad_decay = _transition_grad(decay, grad_next, start)
        return grad_next, grad_decay, None, None


def allscan_prefix(
    state: torch.Tensor, decay: torch.Tensor, group: SequenceGroup, blocks: int = 4, layout: str = "contiguous"
) -> torch.Tensor:
    """Starting state of this rank's chunk by a pipelined scan. state [..., K, V]; decay [..., K] or [..., K, K]."""
    if chunks_per_rank(layout) != 1:
        raise GroupError(f"allscan scans the ranks in order and needs the contiguous layout, not {layout!r} "
                         "(use strategy 'lasp2' with zigzag)")
    return _AllScan.apply(state, decay, group, int(blocks))
