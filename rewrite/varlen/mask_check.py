"""Prove that every attention mask is key padding (plus causality) of one padding-mask input.

The graph that builds the masks is run on a padding pattern with right and left padding, a full
row, a one-token row and a row with holes. A site's mask is accepted when, on every real query,
it shows exactly the real keys (all of them, or those up to the query when causal) and nothing
else. The padding input's polarity is found the same way: 1 marks real tokens (Hugging Face's
attention_mask) or True marks padding (`key_padding_mask`).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch
import torch.fx as fx

from rewrite.analysis import AttentionSite
from rewrite.analysis.graph_utils import ancestor_placeholders, subgraph_module
from rewrite.analysis.mask_probe import window_constant
from rewrite.analysis.nodes import tensor_meta
from rewrite.errors import PassError
from rewrite.varlen.symbols import TokenSymbols, expr_of

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
    """The padding patterns to run: PATTERN, plus two long rows (full, right-padded) when the mask graph
    holds a window-like constant too large for PATTERN's rows to show."""
    probes = [torch.tensor(PATTERN, dtype=torch.bool)]
    window = window_constant([s.mask for s in masked])
    length = window + 2
    if length <= PATTERN_LENGTH:
        return probes
    if length > MAX_PROBE_LENGTH:
        site = masked[0]
        raise PassError(
            "varlen",
            f"the attention masks are built with the constant {window} (a sliding window or band?); proving them "
            f"key padding needs a probe of {length} tokens, over the {MAX_PROBE_LENGTH} the pass runs",
            site.name, site.module_path or "<root>",
        )
    long = torch.ones(2, length, dtype=torch.bool)
    long[1, length - 3:] = False
    return [*probes, long]

HIDDEN_BELOW = -1e4
"""An additive mask value at or below this hides its key."""


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
    """What the probe proved: the padding input's polarity and each site's causality (by site node name)."""

    pads_are_true: bool
    causal: dict[str, bool]


def _visible(mask: torch.Tensor, negated: bool) -> torch.Tensor | None:
    """Bool visibility of a mask, or None if a float mask holds values that are neither 0 nor hidden (a bias)."""
    if mask.dtype == torch.bool:
        return ~mask if negated else mask
    if negated:
        return mask == 0
    if bool(((mask != 0) & (mask > HIDDEN_BELOW)).any()):
        return None
    return mask == 0


def _concrete_shape(node: fx.Node, symbols: TokenSymbols, batch: int, seq: int) -> list[int]:
    val = tensor_meta(node)
    assert val is not None
    subs = {**{s: sympy.Integer(batch) for s in symbols.batch}, **{s: sympy.Integer(seq) for s in symbols.seq}}
    shape = []
    for d in val.shape:
        e = expr_of(d).xreplace(subs)
        if not isinstance(e, sympy.Integer) and isinstance(d, torch.SymInt) and d.node.hint is not None:
            e = sympy.Integer(int(d.node.hint))  # another dynamic dim (a feature size): its example value
        if not isinstance(e, sympy.Integer):
            raise PassError("varlen", f"input {node.name!r} has a dim of size {expr_of(d)} that is neither "
                            "batch nor sequence length; the mask probe cannot size it", node.name)
        shape.append(int(e))
    return shape


def _size_value(node: fx.Node, symbols: TokenSymbols, batch: int, seq: int) -> object:
    """A non-tensor input's probe value: a size placeholder (compile graphs) takes the probe's sizes."""
    val = node.meta.get("val")
    if isinstance(val, torch.SymInt):
        subs = {**{s: sympy.Integer(batch) for s in symbols.batch}, **{s: sympy.Integer(seq) for s in symbols.seq}}
        e = expr_of(val).xreplace(subs)
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
    """Run the mask graph on the probe; raise PassError naming the first site whose mask is not key padding."""
    masked = [s for s in sites if isinstance(s.mask, fx.Node)]
    probes = _padding_probes(masked)
    placeholders = {p for s in masked for p in ancestor_placeholders(s.mask)}
    device = _probe_device(placeholders)
    failures: list[str] = []
    for pads_are_true in (False, True):
        causal: dict[str, bool] = {}
        problem = None
        for keep in probes:
            batch, seq = keep.shape
            inputs: dict[fx.Node, object] = {}
            for node in placeholders:
                val = tensor_meta(node)
                if val is None:
                    inputs[node] = _size_value(node, symbols, batch, seq)
                elif node is padding:
                    marks = ~keep if pads_are_true else keep
                    inputs[node] = marks.to(device=device, dtype=val.dtype)
                else:
                    inputs[node] = torch.zeros(_concrete_shape(node, symbols, batch, seq), dtype=val.dtype,
                                               device=device)
            try:
                values = _evaluate(gm, [s.mask for s in masked], inputs)
            except Exception as exc:  # noqa: BLE001 - any failure means the masks are not built from this input alone
                problem = (None, f"running the mask graph failed: {type(exc).__name__}: {exc}")
                break
            for site, value in zip(masked, values):
                verdict = _judge(value, site, keep)
                if isinstance(verdict, str) or causal.get(site.name, verdict) != verdict:
                    problem = (site, verdict if isinstance(verdict, str) else
                               f"it is {'causal' if causal[site.name] else 'not causal'} on a {PATTERN_LENGTH}-token "
                               f"probe and {'causal' if verdict else 'not causal'} on a {seq}-token one")
                    break
                causal[site.name] = verdict
            if problem is not None:
                break
        if problem is None:
            for site in sites:
                if site.mask is None:
                    causal[site.name] = site.is_causal
            return MaskFacts(pads_are_true, causal)
        if problem[0] is None:
            failures.append(problem[1])
            continue
        failures.append(f"{problem[0].name} ({problem[0].module_path or '<root>'}): {problem[1]}")
    site = masked[0] if masked else None
    raise PassError(
        "varlen",
        f"cannot prove the attention masks are key padding of input {padding.name!r} "
        f"(with 1 = real token, or True = padding): {'; '.join(failures)}. The varlen pass supports masks "
        "that hide padded keys, optionally with causality; other masks (windows, biases, blocks) are not "
        "token-wise once packed",
        site.name if site else None,
        (site.module_path or "<root>") if site else None,
    )


def _judge(value: torch.Tensor, site: MaskUse, keep: torch.Tensor) -> bool | str:
    """True (causal key padding), False (key padding) or why the mask is neither."""
    vis = _visible(value, site.mask_negated)
    if vis is None:
        return "the additive mask holds bias values (neither 0 nor -inf)"
    while vis.dim() < 4:
        vis = vis.unsqueeze(0)
    batch, seq = keep.shape
    if vis.shape[0] not in (1, batch) or vis.shape[-1] != seq or vis.shape[-2] not in (1, seq):
        return f"mask of shape {tuple(vis.shape)} does not fit [batch, heads, seq, seq]"
    vis = vis.expand(batch, vis.shape[1], seq, seq)
    if site.is_causal:
        vis = vis & torch.ones(seq, seq, dtype=torch.bool).tril()
    rows = keep[:, None, :, None]
    pad_keys = keep[:, None, None, :].expand_as(vis)
    causal_keys = pad_keys & torch.ones(seq, seq, dtype=torch.bool).tril()
    if not bool(((vis != causal_keys) & rows).any()):
        return True
    if not bool(((vis != pad_keys) & rows).any()):
        return False
    return "on real queries it shows keys other than the real (earlier) tokens of the same row"


PACKED_POSITIONS = (0, 1, 2, 0, 1, 0, 0, 1, 2, 3)
"""Positions of the packed probe: sequences of 3, 2, 1 and 4 tokens in one row."""


def prove_packed_masks(
    gm: fx.GraphModule, sites: list[MaskUse], positions: fx.Node | None, symbols: TokenSymbols
) -> dict[str, bool]:
    """Causality of each site for already-packed input; raise PassError for masks that are neither per-sequence
    (built from restarting `positions`) nor a plain causal / full mask over the row.

    A plain mask over the whole row is what a model that does not know about packing builds; the varlen
    kernel then keeps each sequence to itself, which is what packing asks for.
    """
    masked = [s for s in sites if isinstance(s.mask, fx.Node)]
    causal = {s.name: s.is_causal for s in sites if s.mask is None}
    if not masked:
        return causal
    window = window_constant([s.mask for s in masked])
    longest = max(PACKED_POSITIONS) + 1
    extra = tuple(range(window + 2)) if window + 2 > longest else ()
    if len(PACKED_POSITIONS) + len(extra) > MAX_PROBE_LENGTH:
        raise PassError("varlen", f"the attention masks are built with the constant {window} (a sliding window or "
                        f"band?); proving them per-sequence needs a probe longer than the {MAX_PROBE_LENGTH} "
                        "tokens the pass runs", masked[0].name, masked[0].module_path)
    pos = torch.tensor([PACKED_POSITIONS + extra])
    seq = pos.shape[1]
    segment = (pos[0] == 0).cumsum(0)
    same = segment[:, None] == segment[None, :]
    tril = torch.ones(seq, seq, dtype=torch.bool).tril()
    inputs: dict[fx.Node, object] = {}
    placeholders = {p for s in masked for p in ancestor_placeholders(s.mask)}
    device = _probe_device(placeholders)
    for node in placeholders:
        val = tensor_meta(node)
        if val is None:
            inputs[node] = _size_value(node, symbols, 1, seq)
        elif node is positions:
            inputs[node] = pos.to(device=device, dtype=val.dtype)
        else:
            inputs[node] = torch.zeros(_concrete_shape(node, symbols, 1, seq), dtype=val.dtype, device=device)
    try:
        values = _evaluate(gm, [s.mask for s in masked], inputs)
    except Exception as exc:  # noqa: BLE001 - the masks need inputs other than the packed ones
        raise PassError("varlen", f"cannot run the attention masks on a packed probe: {type(exc).__name__}: {exc}",
                        masked[0].name, masked[0].module_path) from exc
    for site, value in zip(masked, values):
        vis = _visible(value, site.mask_negated)
        verdict = None
        if vis is not None:
            while vis.dim() < 4:
                vis = vis.unsqueeze(0)
            vis = vis.expand(1, vis.shape[1], seq, seq)
            if site.is_causal:
                vis = vis & tril
            for candidate, is_causal in ((same & tril, True), (same, False), (tril, True),
                                         (torch.ones_like(tril), False)):
                if bool((vis == candidate).all()):
                    verdict = is_causal
                    break
        if verdict is None:
            raise PassError(
                "varlen",
                "the attention mask on packed input is neither per-sequence (from restarting position ids) nor a "
                "plain causal or full mask; the varlen pass cannot keep it",
                site.name, site.module_path,
            )
        causal[site.name] = verdict
    return causal
