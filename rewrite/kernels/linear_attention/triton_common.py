"""Pieces shared by the chunked Triton kernels: where chunks are, and the in-chunk decay cumsum.

Tokens are addressed flat: token t of batch row b is row b * T + t of q.view(B * T, H, K), so
batches and packed varlen inputs are both "sequence n covers rows bounds[n]:bounds[n + 1]".
Dense batches need no tables (`Chunks` with varlen False): chunk i is chunk i % NT of sequence
i // NT, computed in the kernels, so a call launches no small index-building ops.
"""

import torch
import triton
import triton.language as tl

from rewrite.kernels.launch_math import cdiv, next_power_of_2

from .triton_gated import LIMIT, whole_chunk


class ChunkLayout:
    """Sequence bounds [N + 1], first chunk of each sequence [N + 1], and (sequence, chunk) per program."""

    def __init__(self, batch: int, length: int, cu_seqlens: torch.Tensor | None, chunk: int, device):
        if cu_seqlens is None:
            self.bounds = torch.arange(batch + 1, dtype=torch.int32, device=device) * length
            self.max_chunks = batch * cdiv(length, chunk)
        else:
            self.bounds = cu_seqlens.to(device=device, dtype=torch.int32)
            self.max_chunks = cdiv(length, chunk) + cu_seqlens.numel() - 1  # no host sync needed
        self.n = self.bounds.numel() - 1
        self.chunk = chunk
        counts = (self.bounds[1:] - self.bounds[:-1] + chunk - 1) // chunk
        self.chunk_start = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
        ids = torch.arange(self.max_chunks, dtype=torch.int32, device=device)
        seq = torch.searchsorted(self.chunk_start[1:], ids, right=True).to(torch.int32)
        local = ids - self.chunk_start[seq.clamp(max=self.n - 1).long()]
        self.table = torch.stack([seq, local], 1).contiguous()  # seq == N: no chunk, the program exits


def token_log_decay(
    g: torch.Tensor | None, decay: str, batch: int, length: int, kv_heads: int
) -> torch.Tensor:
    """Per-token log-decay as [B * T, Hkv, F] (F = K for "vector", else 1)."""
    if decay == "constant":
        return g.view(1, kv_heads, 1).expand(batch * length, kv_heads, 1).contiguous()
    if decay == "scalar":
        return g.reshape(batch * length, kv_heads, 1).contiguous()
    return g.reshape(batch * length, kv_heads, -1).contiguous()


class Chunks:
    """Chunks of a dense batch (no tables) or of packed sequences (the `ChunkLayout` tables)."""

    def __init__(self, batch: int, length: int, cu_seqlens: torch.Tensor | None, chunk: int, device):
        self.chunk, self.length, self.varlen = chunk, length, cu_seqlens is not None
        if self.varlen:
            layout = ChunkLayout(batch, length, cu_seqlens, chunk, device)
            self.n, self.max_chunks = layout.n, layout.max_chunks
            self.tables = (layout.bounds, layout.chunk_start, layout.table)
        else:
            self.n, self.max_chunks = batch, batch * cdiv(length, chunk)
            self.tables = None

    def args(self, dummy: torch.Tensor) -> tuple:
        """(bounds, chunk_start, table, n, T) kernel arguments; `dummy` stands in for absent tables."""
        bounds, chunk_start, table = self.tables or (dummy, dummy, dummy)
        return bounds, chunk_start, table, self.n, self.length


@triton.jit
def chunk_of_program(i_c, table_ptr, T, C: tl.constexpr, VARLEN: tl.constexpr):
    """(sequence, chunk within the sequence) of flat chunk i_c; sequence == N: no chunk there."""
    if VARLEN:
        seq = tl.load(table_ptr + 2 * i_c)
        local = tl.load(table_ptr + 2 * i_c + 1)
    else:
        n_chunks = tl.cdiv(T, C)
        seq = i_c // n_chunks
        local = i_c % n_chunks
    return seq, local


@triton.jit
def sequence_rows(seq, bounds_ptr, chunk_start_ptr, T, C: tl.constexpr, VARLEN: tl.constexpr):
    """(first row, end row, first flat chunk) of sequence `seq`."""
    if VARLEN:
        bos = tl.load(bounds_ptr + seq)
        eos = tl.load(bounds_ptr + seq + 1)
        first = tl.load(chunk_start_ptr + seq)
    else:
        bos = seq * T
        eos = bos + T
        first = seq * tl.cdiv(T, C)
    return bos, eos, first


@triton.jit
def chunk_rows(seq, local, bounds_ptr, chunk_start_ptr, T, heads, kv_heads, C: tl.constexpr, VARLEN: tl.constexpr):
    """(rows [C], row mask [C], q heads per kv head) of chunk `local` of sequence `seq`, as `chunk_of_program` gave
    them; call it after the kernel's `seq >= n_seqs` exit (with VARLEN, `sequence_rows` reads bounds[seq + 1]).
    The group division sits between the bounds and the rows as the kernels had it (same op order, same SASS)."""
    bos, eos, first = sequence_rows(seq, bounds_ptr, chunk_start_ptr, T, C, VARLEN)
    group = heads // kv_heads
    rows = bos + local * C + tl.arange(0, C)
    row_mask = rows < eos
    return rows, row_mask, group


@triton.jit
def key_gate(x, mask, GATE: tl.constexpr):
    """The key gate's log-decay logsigmoid(x) / GATE in float32 where `mask` holds, 0 elsewhere (rows past
    the sequence and columns past K add no decay); x: the raw keys, float32."""
    u = tl.exp(-tl.abs(x))
    w = 1.0 + u
    # log(1 + u) with the rounding of 1 + u corrected (u below float32's epsilon: log(1 + u) = u)
    log1p = tl.where(w == 1.0, u, tl.log(w) * (u / tl.where(w == 1.0, 1.0, w - 1.0)))
    return tl.where(mask, (tl.minimum(x, 0.0) - log1p) / GATE, 0.0)


@triton.jit
def chunk_log_decay(
    g_ptr, rows, row_mask, hk, kv_heads, kcols, dk, MODE: tl.constexpr, CONST: tl.constexpr, GATE: tl.constexpr
):
    """(in-chunk inclusive cumsum b of the log-decay, b_last - b as a suffix sum, chunk total), float32.

    The suffix sum keeps the decay to the chunk end exact for the latest tokens (a difference of
    two long prefix sums would lose it to rounding). MODE 1: [C], [C] and a scalar, from g [rows, Hkv] or, with CONST, g [Hkv] for every token.
    MODE 2: [C, BK], [C, BK] and [BK], from g [rows, Hkv, K]. Rows past the sequence add nothing.
    GATE (MODE 2 only): 0.0, g holds log-decays; > 0, g holds the raw keys and the log-decay is
    `key_gate`'s logsigmoid(g) / GATE, computed here from the loaded keys.
    """
    if MODE == 1:
        if CONST:
            g = tl.where(row_mask, tl.load(g_ptr + hk).to(tl.float32), 0.0)
        else:
            g = tl.load(g_ptr + rows.to(tl.int64) * kv_heads + hk, mask=row_mask, other=0.0).to(tl.float32)
    else:
        offs = (rows.to(tl.int64) * kv_heads + hk)[:, None] * dk + kcols[None, :]
        mask = row_mask[:, None] & (kcols < dk)[None, :]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if GATE > 0:
            g = key_gate(g, mask, GATE)
    return tl.cumsum(g, axis=0), tl.cumsum(g, axis=0, reverse=True) - g, tl.sum(g, axis=0)


@triton.jit
def hoisted_decay(g_ptr, rows, row_mask, hk, kv_heads, kcols, dk, GATE: tl.constexpr):
    """The GQA-hoisted kernels' vector decay on one chunk, kv head and K tile: (b, the in-chunk cumsum [C, BK];
    to_end, b_last - b [C, BK]; top, b's max over the chunk [BK]; whether the whole-chunk form holds). GATE as
    in `chunk_log_decay`."""
    b, to_end, b_last = chunk_log_decay(g_ptr, rows, row_mask, hk, kv_heads, kcols, dk, 2, False, GATE)
    top, bot, whole = whole_chunk(b, True)
    return b, to_end, top, whole


@triton.jit
def whole_chunk_down(b, top):
    """The whole-chunk form's row-side decay factor (reference top = b's max): exp(b - top) <= 1."""
    return tl.exp(tl.minimum(b - top[None, :], 0.0))


@triton.jit
def whole_chunk_up(b, top):
    """The whole-chunk form's other factor: exp(top - b) <= exp(LIMIT), so exp(b_i - b_j) = down_i * up_j."""
    return tl.exp(tl.minimum(top[None, :] - b, LIMIT))


def block(dim: int, cap: int = 64) -> int:
    """Tile size for a head dim: a power of two in [16, cap]."""
    return max(16, min(cap, next_power_of_2(dim)))


def check_head_dims(dk: int, dv: int) -> None:
    if dk > 256 or dv > 256:
        raise ValueError(
            f"linear_attention: the Triton kernels support head dims up to 256, got K={dk}, V={dv}"
        )
