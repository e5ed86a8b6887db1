"""Prove that every attention mask is key padding (plus causality, or a sliding window) of one padding-mask input.

The graph that builds the masks is run on a padding pattern with right and left padding, a full
row, a one-token row and a row with holes. A site's mask is accepted when, on every real query,
it shows exactly the real keys (all of them, those up to the query when causal, or those within a
window around the query, causal or bidirectional) and nothing else. The padding input's polarity
is found the same way: 1 marks real tokens (Hugging Face's attention_mask) or True marks padding
(`key_padding_mask`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy
import torch
import torch.fx as fx

from rewrite.analysis import AttentionSite
from rewrite.analysis.graph_utils import ancestor_placeholders, subgraph_module
from rewrite.analysis.mask_probe import holds_bias, mask_bias_description, window_constant
from rewrite.analysis.nodes import tensor_meta
from rewrite.analysis.shapes import to_expr
from rewrite.errors import PassError
from rewrite.varlen.symbols import TokenSymbols

PATTERN = (
    (1, 1, 1, 1, 0, 0),
    (0, 0, 1, 1, 1, 1),
    (1, 1, 1, 1, 1, 1),
    (1, 0, 0, 0, 0, 0),
    (0, 1, 1, 0, 1, 0),
)
"""Rows of the probe: 1 = real token."""
PATTERN_LENGTH = len(PATTERN[0])
MAX_PROBE_LENGTH = 8194
"""The longest probe run to see a window-like constant of the mask graph (2 x L x L mask values)."""


def _padding_probes(masked: list[MaskUse]) -> list[torch.Tensor]:
    """The padding patterns to run: PATTERN, plus three long rows (full, right-padded, one hole in the middle) when
    the mask graph holds a window-like constant W >= 2.

    The long rows (W + 2 tokens, at least PATTERN_LENGTH + 2) show a window wider than PATTERN's rows on both
    sides of a query, and the holed one tells a window counted between row slots (Hugging Face's, over cache
    positions) from one counted between real tokens: the two differ at the query after the hole (W <= L // 2 + 1)
    or at the last query (and, for a window that looks ahead, at the first query).
    """
    probes = [torch.tensor(PATTERN, dtype=torch.bool)]
    window = window_constant([s.mask for s in masked])
    if window < 2:
        return probes
    length = max(window + 2, PATTERN_LENGTH + 2)
    _check_probe_length(length, window, masked[0], "key padding")
    long = torch.ones(3, length, dtype=torch.bool)
    long[1, length - 3:] = False
    long[2, length // 2] = False
    return [*probes, long]

def _check_probe_length(length: int, window: int, site: MaskUse, proof: str) -> None:
    """Refuse a window-like constant whose probe would be longer than MAX_PROBE_LENGTH tokens."""
    if length > MAX_PROBE_LENGTH:
        raise PassError(
            "varlen",
            f"the attention masks are built with the constant {window} (a sliding window or band?); proving them "
            f"{proof} needs a probe of {length} tokens, over the {MAX_PROBE_LENGTH} the pass runs",
            site.name, site.module_path or "<root>",
        )


def _probe_inputs(placeholders: set[fx.Node], symbols: TokenSymbols, batch: int, seq: int, device: torch.device,
                  given: fx.Node | None, value: torch.Tensor) -> dict[fx.Node, object]:
    """Inputs of the mask graph for a [batch, seq] probe: `value` for the `given` input, the probe's sizes for size
    inputs, zeros for every other tensor input."""
    inputs: dict[fx.Node, object] = {}
    for node in placeholders:
        val = tensor_meta(node)
        if val is None:
            inputs[node] = _size_value(node, symbols, batch, seq)
        elif node is given:
            inputs[node] = value.to(device=device, dtype=val.dtype)
        else:
            inputs[node] = torch.zeros(_concrete_shape(node, symbols, batch, seq), dtype=val.dtype, device=device)
    return inputs


@dataclass(frozen=True)
class MaskUse:
    """A node that reads an attention mask: its name, module, the mask and how to read it."""

    name: str
    module_path: str
    mask: fx.Node | None
    mask_negated: bool = False
    is_causal: bool = False

    @staticmethod
    def of_site(site: AttentionSite) -> MaskUse:
        return MaskUse(site.name, site.module_path, site.mask if isinstance(site.mask, fx.Node) else None,
                       site.mask_negated, site.is_causal)


@dataclass(frozen=True)
class MaskFacts:
    """What the probe proved: the padding input's polarity and each site's causality and window (by site node name).

    `window[name] = W`: the site's mask is key padding restricted to the last W keys (the query included) and the
    next `lookahead[name]` keys (0 when absent: causal), what `rewrite::sliding_window_attention(window=W,
    lookahead=A)` computes per sequence; a site with a lookahead is not causal. `window_in_slots` names the
    windowed sites whose mask counts those distances between the row's slots (Hugging Face counts them between
    cache positions) rather than between its real tokens: the two agree exactly on rows whose real tokens are
    contiguous (left or right padding), which the module checks at run time.
    """

    pads_are_true: bool
    causal: dict[str, bool]
    window: dict[str, int] = field(default_factory=dict)
    window_in_slots: frozenset[str] = frozenset()
    lookahead: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Verdict:
    causal: bool
    window: int | None = None
    in_slots: bool = False
    lookahead: int = 0


def _visible(mask: torch.Tensor, negated: bool) -> torch.Tensor | None:
    """Bool visibility of a mask, or None if a float mask holds values that are neither 0 nor hidden (a bias)."""
    if mask.dtype == torch.bool:
        return ~mask if negated else mask
    if negated:
        return mask == 0
    if holds_bias(mask):
        return None
    return mask == 0


def _concrete_shape(node: fx.Node, symbols: TokenSymbols, batch: int, seq: int) -> list[int]:
    val = tensor_meta(node)
    assert val is not None
    subs = {**{s: sympy.Integer(batch) for s in symbols.batch}, **{s: sympy.Integer(seq) for s in symbols.seq}}
    shape = []
    for d in val.shape:
        e = to_expr(d).xreplace(subs)
        if not isinstance(e, sympy.Integer) and isinstance(d, torch.SymInt) and d.node.hint is not None:
            e = sympy.Integer(int(d.node.hint))  # another dynamic dim (a feature size): its example value
        if not isinstance(e, sympy.Integer):
            raise PassError("varlen", f"input {node.name!r} has a dim of size {to_expr(d)} that is neither "
                            "batch nor sequence length; the mask probe cannot size it", node.name)
        shape.append(int(e))
    return shape


def _size_value(node: fx.Node, symbols: TokenSymbols, batch: int, seq: int) -> object:
    """A non-tensor input's probe value: a size placeholder (compile graphs) takes the probe's sizes."""
    val = node.meta.get("val")
    if isinstance(val, torch.SymInt):
        subs = {**{s: sympy.Integer(batch) for s in symbols.batch}, **{s: sympy.Integer(seq) for s in symbols.seq}}
        e = to_expr(val).xreplace(subs)
        return int(e) if isinstance(e, sympy.Integer) else int(val.node.hint)
    return val


def _evaluate(gm: fx.GraphModule, masks: list[fx.Node], inputs: dict[fx.Node, object]) -> list[torch.Tensor]:
    runner, order = subgraph_module(gm, masks)
    with torch.no_grad():
        values = runner(*[inputs[p] for p in order])
    return [v.cpu() if isinstance(v, torch.Tensor) else v for v in values]


def _probe_device(placeholders: set[fx.Node]) -> torch.device:
    """The device the captured graph runs on (a graph captured on CUDA may hold CUDA constants)."""
    for node in placeholders:
        val = tensor_meta(node)
        if val is not None:
            return val.device
    return torch.device("cpu")


def prove_padding_masks(
    gm: fx.GraphModule, sites: list[MaskUse], padding: fx.Node, symbols: TokenSymbols
) -> MaskFacts:
    """Run the mask graph on the probe; raise PassError naming the first site whose mask is neither key padding
    (optionally causal) nor key padding within a sliding window, causal or bidirectional, that the probe proves."""
    masked = [s for s in sites if isinstance(s.mask, fx.Node)]
    probes = _padding_probes(masked)
    placeholders = {p for s in masked for p in ancestor_placeholders(s.mask)}
    device = _probe_device(placeholders)
    failures: list[str] = []
    failing: MaskUse | None = None
    for pads_are_true in (False, True):
        seen: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        problem = None
        for index, keep in enumerate(probes):
            batch, seq = keep.shape
            inputs = _probe_inputs(placeholders, symbols, batch, seq, device, padding, ~keep if pads_are_true else keep)
            try:
                values = _evaluate(gm, [s.mask for s in masked], inputs)
            except Exception as exc:  # noqa: BLE001 - any failure means the masks are not built from this input alone
                problem = (None, f"running the mask graph failed: {type(exc).__name__}: {exc}")
                break
            for site, value in zip(masked, values):
                key = _mask_key(site)
                if len(seen.get(key, ())) > index:
                    continue  # another site reads the same mask the same way (layers share their mask)
                vis = _visibility(value, site, keep)
                if isinstance(vis, str):
                    problem = (site, vis)
                    break
                seen.setdefault(key, []).append((vis, keep))
            if problem is not None:
                break
        verdicts: dict[tuple, _Verdict | str] = {}
        if problem is None:
            for site in masked:
                key = _mask_key(site)
                if key not in verdicts:
                    verdicts[key] = _judge(seen[key], site)
                if isinstance(verdicts[key], str):
                    problem = (site, verdicts[key])
                    break
        if problem is None:
            found = {s.name: verdicts[_mask_key(s)] for s in masked}
            causal = {name: v.causal for name, v in found.items()}
            for site in sites:
                if site.mask is None:
                    causal[site.name] = site.is_causal
            return MaskFacts(pads_are_true, causal, {name: v.window for name, v in found.items() if v.window},
                             frozenset(name for name, v in found.items() if v.in_slots),
                             {name: v.lookahead for name, v in found.items() if v.lookahead})
        reading = "True = padding" if pads_are_true else "1 = real token"
        if problem[0] is None:
            failures.append(f"with {reading}: {problem[1]}")
            continue
        failing = failing or problem[0]
        failures.append(f"with {reading}: {problem[0].name} ({problem[0].module_path or '<root>'}): {problem[1]}")
    site = failing or (masked[0] if masked else None)
    raise PassError(
        "varlen",
        f"cannot prove the attention masks are key padding of input {padding.name!r} "
        f"(with 1 = real token, or True = padding): {'; '.join(failures)}. The varlen pass supports masks "
        "that hide padded keys, optionally with causality, and sliding windows, causal or bidirectional (each real "
        "query sees the last W real keys of its row, itself included, and the next A, counted between real tokens, "
        "or between row slots on rows without holes); other masks (biases, blocks, windows the probe cannot tie "
        "to a constant of the mask graph) are not token-wise once packed",
        site.name if site else None,
        (site.module_path or "<root>") if site else None,
    )


def _mask_key(site: MaskUse) -> tuple:
    """Sites that read the same mask node the same way get the same verdict."""
    return (site.mask, site.mask_negated, site.is_causal)


def _visibility(value: torch.Tensor, site: MaskUse, keep: torch.Tensor) -> torch.Tensor | str:
    """[batch, heads, seq, seq] bool: which keys each query sees (the site's own causality applied), or why none."""
    vis = _visible(value, site.mask_negated)
    if vis is None:
        return mask_bias_description(value) or "the additive mask holds bias values (neither 0 nor -inf)"
    batch, seq = keep.shape
    if vis.dim() == 3 and vis.shape[0] > batch and vis.shape[0] % batch == 0:
        vis = vis.view(batch, -1, *vis.shape[1:])  # heads folded into the batch dim ([B * H, L, L], bmm form)
    while vis.dim() < 4:
        vis = vis.unsqueeze(0)
    if vis.shape[0] not in (1, batch) or vis.shape[-1] != seq or vis.shape[-2] not in (1, seq):
        return f"mask of shape {tuple(vis.shape)} does not fit [batch, heads, seq, seq]"
    vis = vis.expand(batch, vis.shape[1], seq, seq)
    if site.is_causal:
        vis = vis & torch.ones(seq, seq, dtype=torch.bool).tril()
    return vis


def _band(length: int, window: int, lookahead: int = 0) -> torch.Tensor:
    """[length, length] bool: key j fewer than `window` before query i (i itself included) or at most `lookahead`
    after it (no integer L x L temporaries)."""
    ones = torch.ones(length, length, dtype=torch.bool)
    return ones.tril(lookahead) & ~ones.tril(-window)


def _window_keys(keep: torch.Tensor, window: int, in_slots: bool, lookahead: int = 0) -> torch.Tensor:
    """[batch, 1, seq, seq]: the real keys fewer than `window` before each query (itself included) or at most
    `lookahead` after it, counted in row slots or in real tokens (positions in the packed sequence)."""
    batch, seq = keep.shape
    if in_slots:
        return (keep[:, None, :] & _band(seq, window, lookahead))[:, None]
    out = torch.zeros(batch, seq, seq, dtype=torch.bool)
    for row in range(batch):
        real = keep[row].nonzero().squeeze(1)
        out[row, real[:, None], real[None, :]] = _band(real.numel(), window, lookahead)
    return out[:, None]


def _judge(seen: list[tuple[torch.Tensor, torch.Tensor]], site: MaskUse) -> _Verdict | str:
    """What the mask is on every probe (real queries only): causal key padding, key padding, key padding within a
    sliding window of W keys up to the query and A after it (A = 0: causal), or why it is none of them."""

    def shows(expected) -> bool:
        return not any(bool(((vis != expected(keep)) & keep[:, None, :, None]).any()) for vis, keep in seen)

    def tril(keep: torch.Tensor) -> torch.Tensor:
        return torch.ones(keep.shape[1], keep.shape[1], dtype=torch.bool).tril()

    def real(keep: torch.Tensor) -> torch.Tensor:
        return keep[:, None, :, None] & keep[:, None, None, :]

    if shows(lambda keep: keep[:, None, None, :] & tril(keep)):
        return _Verdict(True)
    if shows(lambda keep: keep[:, None, None, :]):
        return _Verdict(False)
    later = any(bool((vis & ~tril(keep) & real(keep)).any()) for vis, keep in seen)
    hidden = any(bool((~vis & tril(keep) & real(keep)).any()) for vis, keep in seen)
    hidden_later = later and any(bool((~vis & ~tril(keep) & real(keep)).any()) for vis, keep in seen)
    if not (hidden or hidden_later):
        return "on real queries it shows keys other than the real (earlier) tokens of the same row"
    # the widest reach seen on a real query: real keys up to it (itself included), and real keys after it
    window = max(int((vis & real(keep) & tril(keep)).sum(-1).max()) for vis, keep in seen)
    lookahead = max(int((vis & real(keep) & ~tril(keep)).sum(-1).max()) for vis, keep in seen)
    shape = (f"a bidirectional sliding window ({window - 1} keys before the query, {lookahead} after)" if later
             else f"a causal sliding window of {window} keys")
    by_tokens = window >= 1 and shows(lambda keep: _window_keys(keep, window, False, lookahead))
    by_slots = window >= 1 and shows(lambda keep: _window_keys(keep, window, True, lookahead))
    if not (by_tokens or by_slots):
        if later:
            return ("on real queries it shows later keys and hides some real keys of the same row, but not as a "
                    "sliding window (each query seeing the last W real keys of its row, itself included, and the "
                    "next A, counted between real tokens or between row slots)")
        return ("on real queries it hides earlier real keys of the same row, but not as a causal sliding window "
                "(each query seeing the last W real keys of its row, itself included, W counted between real tokens "
                "or between row slots)")
    constant = window_constant([site.mask]) if site.mask is not None else 0
    if max(window - 1, lookahead) not in (constant - 1, constant):
        return (f"it shows {shape} on the probe, but the window-like constant of its graph is {constant}, so the "
                "probe does not prove the window is the same on longer rows")
    # a window the probe cannot tell apart both ways is taken as counted in slots (checked at run time)
    return _Verdict(not later, window, in_slots=by_slots, lookahead=lookahead)

PACKED_POSITIONS = (0, 1, 2, 0, 1, 0, 0, 1, 2, 3)
"""Positions of the packed probe: sequences of 3, 2, 1 and 4 tokens in one row."""


def prove_packed_masks(
    gm: fx.GraphModule, sites: list[MaskUse], positions: fx.Node | None, symbols: TokenSymbols
) -> tuple[dict[str, bool], dict[str, int], dict[str, int]]:
    """(causality, sliding window W, lookahead A) of each site for already-packed input (windowed sites only in
    the last two); raise PassError for masks that are neither per-sequence (built from restarting `positions`),
    per-sequence within a sliding window of W keys up to the query and A after it (A = 0: causal), nor a plain
    causal / full / windowed mask over the row.

    A plain mask over the whole row is what a model that does not know about packing builds; the varlen
    kernel then keeps each sequence to itself, which is what packing asks for.
    """
    masked = [s for s in sites if isinstance(s.mask, fx.Node)]
    causal = {s.name: s.is_causal for s in sites if s.mask is None}
    windows: dict[str, int] = {}
    lookaheads: dict[str, int] = {}
    if not masked:
        return causal, windows, lookaheads
    constant = window_constant([s.mask for s in masked])
    longest = max(PACKED_POSITIONS) + 1
    extra = tuple(range(constant + 2)) if constant + 2 > longest else ()
    _check_probe_length(len(PACKED_POSITIONS) + len(extra), constant, masked[0], "per-sequence")
    pos = torch.tensor([PACKED_POSITIONS + extra])
    seq = pos.shape[1]
    segment = (pos[0] == 0).cumsum(0)
    same = segment[:, None] == segment[None, :]
    tril = torch.ones(seq, seq, dtype=torch.bool).tril()
    placeholders = {p for s in masked for p in ancestor_placeholders(s.mask)}
    inputs = _probe_inputs(placeholders, symbols, 1, seq, _probe_device(placeholders), positions, pos)
    try:
        values = _evaluate(gm, [s.mask for s in masked], inputs)
    except Exception as exc:  # noqa: BLE001 - the masks need inputs other than the packed ones
        raise PassError("varlen", f"cannot run the attention masks on a packed probe: {type(exc).__name__}: {exc}",
                        masked[0].name, masked[0].module_path) from exc
    whole_row = torch.ones(1, seq, dtype=torch.bool)
    for site, value in zip(masked, values):
        vis = _visibility(value, site, whole_row)
        verdict = None
        if not isinstance(vis, str):
            for candidate, is_causal in ((same & tril, True), (same, False), (tril, True),
                                         (torch.ones_like(tril), False)):
                if bool((vis == candidate).all()):
                    verdict = is_causal
                    break
            if verdict is None:  # a window within each sequence or over the row (slots and tokens agree here)
                window = int((vis & tril).sum(-1).max())
                lookahead = int((vis & ~tril).sum(-1).max())
                band = _band(seq, window, lookahead)
                site_constant = window_constant([site.mask])
                if window >= 1 and max(window - 1, lookahead) in (site_constant - 1, site_constant) and (
                        bool((vis == (same & band)).all()) or bool((vis == band).all())):
                    verdict = lookahead == 0
                    windows[site.name] = window
                    if lookahead:
                        lookaheads[site.name] = lookahead
        if verdict is None:
            raise PassError(
                "varlen",
                "the attention mask on packed input is neither per-sequence (from restarting position ids, optionally "
                "within a causal or bidirectional sliding window) nor a plain causal, full or windowed mask; the "
                "varlen pass cannot keep it",
                site.name, site.module_path,
            )
        causal[site.name] = verdict
    return causal, windows, lookaheads
