"""Communication cost of each strategy as sympy formulas, and the per-layer choice `auto` makes.

Bytes are those one rank *receives* in one forward pass of one layer (the busiest rank where ranks
differ), exactly as `groups.CountingGroup` counts them, as formulas in `batch`, `seq` (the global
length) and `P` (the group size). Time is bytes over a stated link bandwidth; ring attention hides
its transfers behind the attention compute of the step, so only the excess is exposed.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from rewrite.analysis.shapes import BATCH, SEQ

P = sympy.Symbol("P", positive=True, integer=True)
STATE_BYTES = 4  # recurrent states are float32


@dataclass(frozen=True)
class AttentionShape:
    """Head counts and dims of one attention site, and its activation element size in bytes."""

    heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    element_size: int
    causal: bool


def ulysses_bytes(s: AttentionShape, size: int | sympy.Expr = P, masked: bool = False) -> sympy.Expr:
    """All-to-alls of q, k, v (k / v: one kv head per rank when Hkv < P) and of the output."""
    local = SEQ / size
    kv_sent = sympy.Max(1, sympy.floor(sympy.Integer(s.kv_heads) / size))
    per_peer = (sympy.Integer(s.heads) / size * (s.head_dim + s.value_dim) + kv_sent * (s.head_dim + s.value_dim))
    total = (size - 1) * BATCH * local * per_peer * s.element_size
    if masked:
        total += (size - 1) * BATCH * local  # key validity, gathered whenever the site has a mask
    return sympy.simplify(total)


def ring_bytes(s: AttentionShape, size: int | sympy.Expr = P, masked: bool = False) -> sympy.Expr:
    """P - 1 steps, each receiving one k / v block of the local length (not repeated over GQA groups)."""
    local = SEQ / size
    total = (size - 1) * BATCH * s.kv_heads * local * (s.head_dim + s.value_dim) * s.element_size
    if masked:
        total += (size - 1) * BATCH * local
    return sympy.simplify(total)


def ulysses_ring_bytes(s: AttentionShape, inner: int, size: int | sympy.Expr = P, masked: bool = False) -> sympy.Expr:
    """Ulysses over `inner` ranks (all-to-alls of q, k, v and the output, on shards of seq / P tokens), then a
    ring over size / inner ranks whose k / v blocks hold the inner group's kv heads for inner x seq / P tokens."""
    local = SEQ / sympy.sympify(size)
    kv_sent = max(1, s.kv_heads // inner)
    per_peer = sympy.Integer(s.heads) / inner * (s.head_dim + s.value_dim) + kv_sent * (s.head_dim + s.value_dim)
    total = (inner - 1) * BATCH * local * per_peer * s.element_size
    total += (sympy.sympify(size) / inner - 1) * BATCH * kv_sent * inner * local * (s.head_dim + s.value_dim) * s.element_size
    if masked:
        total += (size - 1) * BATCH * local  # key validity (or packed sequence starts), gathered over the group
    return sympy.simplify(total)


def ulysses_ring_ring_bytes(s: AttentionShape, inner: int, size: int | sympy.Expr = P) -> sympy.Expr:
    """The ring part of `ulysses_ring_bytes` (what the ring steps can hide behind compute)."""
    kv_sent = max(1, s.kv_heads // inner)
    return sympy.simplify((sympy.sympify(size) / inner - 1) * BATCH * kv_sent * inner * (SEQ / size) * (s.head_dim + s.value_dim)
                          * s.element_size)


def lasp2_bytes(kv_heads: int, key_dim: int, value_dim: int, size: int | sympy.Expr = P, *,
                chunks_per_rank: int = 1, matrix_transition: bool = False) -> sympy.Expr:
    """One all-gather of every chunk's state [B, Hkv, K, V] and transition ([B, Hkv, K] or [B, Hkv, K, K])."""
    transition = key_dim if matrix_transition else 1
    return (size - 1) * chunks_per_rank * BATCH * kv_heads * key_dim * (value_dim + transition) * STATE_BYTES


def allscan_bytes(kv_heads: int, key_dim: int, value_dim: int) -> sympy.Expr:
    """One state [B, Hkv, K, V] per rank (rank 0 receives none), whatever the group size."""
    return BATCH * kv_heads * key_dim * value_dim * STATE_BYTES


def total_state_bytes(kv_heads: int, key_dim: int, value_dim: int, size: int | sympy.Expr = P) -> sympy.Expr:
    """Non-causal mixers: one all-gather of each rank's summed state."""
    return (size - 1) * BATCH * kv_heads * key_dim * value_dim * STATE_BYTES


def halo_bytes(channels: int, width: int, element_size: int, chunks_per_rank: int = 1) -> sympy.Expr:
    """A short conv's W - 1 preceding inputs per segment."""
    return chunks_per_rank * BATCH * (width - 1) * channels * element_size


def attention_flops(s: AttentionShape, size: int | sympy.Expr = P) -> sympy.Expr:
    """Forward FLOPs of one rank's share of softmax attention (causal halves it)."""
    flops = 2 * BATCH * s.heads * SEQ * SEQ * (s.head_dim + s.value_dim) / size
    return flops / 2 if s.causal else flops


@dataclass(frozen=True)
class Choice:
    """A strategy picked for one layer, with the predictions behind it."""

    strategy: str
    bytes: dict[str, float]
    exposed_seconds: dict[str, float]
    inner: int | None = None  # the Ulysses size when the strategy is ulysses_ring

    def describe(self) -> str:
        parts = [f"{name} {self.bytes[name] / 2**20:.3g} MiB ({self.exposed_seconds[name] * 1e3:.3g} ms exposed)"
                 for name in self.bytes]
        return f"{self.strategy} [" + "; ".join(parts) + "]"


def _value(expr: sympy.Expr, size: int, seq: int, batch: int) -> float:
    return float(expr.subs({P: size, SEQ: seq, BATCH: batch}))


def choose_softmax(s: AttentionShape, size: int, seq: int, batch: int, *, link_bytes_per_s: float,
                   flops_per_s: float, ulysses_ok: bool, inner_sizes: tuple[int, ...] = ()) -> Choice:
    """Ulysses, ring or Ulysses x ring (one option per inner size in `inner_sizes`) for one softmax layer: the
    one whose communication is least exposed (Ulysses' all-to-alls are; ring steps hide behind the compute),
    then the fewest bytes."""
    ring_b = _value(ring_bytes(s, size), size, seq, batch)
    compute = _value(attention_flops(s, size), size, seq, batch) / flops_per_s
    options = {"ring": (ring_b, max(0.0, ring_b / link_bytes_per_s - compute))}
    if ulysses_ok:
        uly_b = _value(ulysses_bytes(s, size), size, seq, batch)
        options["ulysses"] = (uly_b, uly_b / link_bytes_per_s)
    for inner in inner_sizes:
        total = _value(ulysses_ring_bytes(s, inner, size), size, seq, batch)
        ring_part = _value(ulysses_ring_ring_bytes(s, inner, size), size, seq, batch)
        exposed = (total - ring_part) / link_bytes_per_s + max(0.0, ring_part / link_bytes_per_s - compute)
        options[f"ulysses_ring {inner}x{size // inner}"] = (total, exposed)
    best = min(options, key=lambda k: (options[k][1], options[k][0]))
    strategy, inner = best, None
    if best.startswith("ulysses_ring"):
        strategy, inner = "ulysses_ring", int(best.split()[1].split("x")[0])
    return Choice(strategy, {k: v[0] for k, v in options.items()}, {k: v[1] for k, v in options.items()}, inner)


def choose_linear(kv_heads: int, key_dim: int, value_dim: int, size: int, batch: int, *, link_bytes_per_s: float,
                  blocks: int, allscan_ok: bool, matrix_transition: bool = False) -> Choice:
    """LASP-2 or all-scan for one linear layer: fewer bytes against a pipeline of P + blocks - 1 steps."""
    lasp = _value(lasp2_bytes(kv_heads, key_dim, value_dim, size, matrix_transition=matrix_transition),
                  size, 0, batch)
    options = {"lasp2": (lasp, lasp / link_bytes_per_s)}
    if allscan_ok:
        scan = _value(allscan_bytes(kv_heads, key_dim, value_dim), size, 0, batch)
        steps = (size - 1 + blocks) / blocks  # the pipeline's fill plus one state's worth of blocks
        options["allscan"] = (scan, scan * steps / link_bytes_per_s)
    best = min(options, key=lambda k: (options[k][1], options[k][0]))
    return Choice(best, {k: v[0] for k, v in options.items()}, {k: v[1] for k, v in options.items()})
