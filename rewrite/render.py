"""Render pipeline stages as text (code with changes marked), a node table, Graphviz DOT, SVG or JSON.

A stage is shown against the one before it: a node is *added* when its name is new or its op
changed (a pass that retargets a node in place), *removed* when its name is gone or its op changed.
The SVG is laid out here, in pure Python (layers by topological depth, one barycenter sweep to
order each layer); no Graphviz binary is needed. Feed the DOT output to `dot` for a better layout.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape

import torch
import torch.fx as fx

from rewrite.analysis import GraphAnalysis, analyze
from rewrite.analysis.nodes import module_path, op_name, value
from rewrite.cost_model import GraphHolder, Shapes
from rewrite.passes.base import PassResult

FORMATS = ("text", "table", "dot", "svg", "json")


@dataclass
class Removed:
    """A node of the previous stage that this stage no longer has (or has with another op)."""

    name: str
    op: str
    line: str


@dataclass
class StageView:
    """One stage ready to render: its graph, analysis and what changed since the previous stage."""

    name: str
    graph: fx.Graph
    code: str
    analysis: GraphAnalysis
    added: set[str] = field(default_factory=set)
    removed: list[Removed] = field(default_factory=list)
    removed_anchor: dict[str | None, list[Removed]] = field(default_factory=dict)
    result: PassResult | None = None
    has_previous: bool = False

    @property
    def shapes(self) -> Shapes:
        return Shapes(self.analysis, self.graph)


_ASSIGN = re.compile(r"^\s+(\w+)(?:, )?\s*=\s")


def _code_lines(code: str) -> dict[str, str]:
    """{node name: the code line that computes it} (FX writes one `name = ...` line per node)."""
    out: dict[str, str] = {}
    for line in code.splitlines():
        m = _ASSIGN.match(line)
        if m and m.group(1) not in out:
            out[m.group(1)] = line.split(";  ")[0]
    return out


def stage_views(stages: list[Any], results: list[PassResult] | None = None) -> list[StageView]:
    """StageViews for pipeline stages (they need `.graph`: run the pipeline with keep_stages=True)."""
    results = list(results or [])
    views: list[StageView] = []
    seen: dict[str, int] = {}
    prev: StageView | None = None
    pass_index = 0
    for stage in stages:
        if stage.graph is None:
            raise ValueError(f"stage {stage.name!r} kept no graph: run the pipeline with keep_stages=True")
        seen[stage.name] = seen.get(stage.name, 0) + 1
        label = stage.name if seen[stage.name] == 1 else f"{stage.name}#{seen[stage.name]}"
        result = None
        if stage.name not in ("captured", "final") and pass_index < len(results):
            result, pass_index = results[pass_index], pass_index + 1
        view = StageView(label, stage.graph, stage.code, analyze(GraphHolder(stage.graph)), result=result)
        if prev is not None:
            _diff(prev, view)
        views.append(view)
        prev = view
    return views


def _diff(prev: StageView, cur: StageView) -> None:
    before = {n.name: op_name(n) for n in prev.graph.nodes}
    after = {n.name: op_name(n) for n in cur.graph.nodes}
    cur.has_previous = True
    cur.added = {name for name, op in after.items() if before.get(name) != op}
    old_lines = _code_lines(prev.code)
    anchor: str | None = None
    for node in prev.graph.nodes:
        if after.get(node.name) == before[node.name]:
            anchor = node.name
            continue
        gone = Removed(node.name, before[node.name], old_lines.get(node.name, f"    {node.name} = ..."))
        cur.removed.append(gone)
        cur.removed_anchor.setdefault(anchor, []).append(gone)


def select(views: list[StageView], stage: str) -> list[StageView]:
    """The views named by `stage` (`all`, `captured`, a pass name, `final`); KeyError lists the names."""
    if stage == "all":
        return views
    picked = [v for v in views if v.name == stage]
    if not picked:
        raise KeyError(f"no stage {stage!r}; stages: all, {', '.join(v.name for v in views)}")
    return picked


# --- per-node facts -------------------------------------------------------------------------


def node_roles(view: StageView) -> dict[str, str]:
    """{node name: role} for inputs, state, output, attention nodes and their q/k/v/mask/projections."""
    roles: dict[str, str] = {}
    for node in view.graph.nodes:
        if node.op == "placeholder":
            roles[node.name] = "state" if node.meta.get("state_name") else "input"
        elif node.op == "get_attr":
            roles[node.name] = "state"
        elif node.op == "output":
            roles[node.name] = "output"
    for site in view.analysis.sites:
        for n in site.chain:
            roles.setdefault(n.name, "attention chain")
        for tag, proj in (("q_proj", site.q_projection), ("k_proj", site.k_projection), ("v_proj", site.v_projection)):
            if proj is not None:
                roles[proj.node.name] = tag if proj.node.name not in roles else roles[proj.node.name] + "+" + tag
        for tag, n in (("q", site.q), ("k", site.k), ("v", site.v), ("mask", site.mask)):
            if isinstance(n, fx.Node):
                roles[n.name] = tag
        roles[site.node.name] = f"attention ({'causal' if site.causal else 'bidirectional'})"
    return roles


def module_of(node: fx.Node) -> str:
    """The node's module path; '' for export's placeholder stack on shape nodes."""
    path = module_path(node)
    return "" if path.startswith("_empty_nn_module_stack") else path


def shape_text(node: fx.Node, shapes: Shapes) -> str:
    """`[batch, seq, 64]`, a tuple of such, a symbolic scalar, or ''."""
    val = value(node)

    def one(v: Any) -> str:
        if isinstance(v, torch.Tensor):
            return "[" + ", ".join(str(shapes.expr(d)) for d in v.shape) + "]"
        if isinstance(v, torch.SymInt):
            return str(shapes.expr(v))
        if isinstance(v, list | tuple):
            return "(" + ", ".join(one(x) for x in v) + ")"
        return ""

    return one(val)


def dtype_text(node: fx.Node) -> str:
    val = value(node)
    if isinstance(val, list | tuple) and val and isinstance(val[0], torch.Tensor):
        val = val[0]
    return str(val.dtype).replace("torch.", "") if isinstance(val, torch.Tensor) else ""


def _blocks_of(view: StageView) -> dict[str, tuple[int, str]]:
    """{node name: (block index, block label)}."""
    out: dict[str, tuple[int, str]] = {}
    for i, block in enumerate(view.analysis.blocks):
        label = block.path + (f" ({block.cls})" if block.cls else "")
        for n in block.nodes:
            out.setdefault(n.name, (i, label))
    return out


def _header(view: StageView) -> str:
    parts = [f"stage: {view.name}"]
    if view.result is not None:
        parts.append(f"matched {view.result.matched}, changed {len(view.result.changed)}")
        diff = view.result.op_count_diff()
        if diff:
            parts.append(", ".join(f"{op} {d:+d}" for op, d in diff.items()))
    if view.has_previous:
        parts.append(f"+{len(view.added)} -{len(view.removed)} nodes")
    return " | ".join(parts)


# --- text and table ------------------------------------------------------------------------


def render_text(view: StageView) -> str:
    """The stage's code; after the first stage, a 2-column gutter marks added (+) and removed (-) lines."""
    head = f"# === {_header(view)} ==="
    if not view.has_previous:
        return head + "\n" + view.code.strip("\n") + "\n"
    out = [head]
    lines = view.code.strip("\n").splitlines()
    pending = list(view.removed_anchor.get(None, []))
    for line in lines:
        m = _ASSIGN.match(line)
        name = m.group(1) if m else None
        if pending and name is not None:
            out.extend(f"- {r.line}" for r in pending)
            pending = []
        out.append(("+ " if name in view.added else "  ") + line)
        if name is not None:
            out.extend(f"- {r.line}" for r in view.removed_anchor.get(name, []))
    out.extend(f"- {r.line}" for r in pending)
    return "\n".join(out) + "\n"


def render_table(view: StageView) -> str:
    """One row per node: change mark, name, op, module path, symbolic shape, dtype, role."""
    roles, shapes = node_roles(view), view.shapes
    rows = [("", "name", "op", "module", "shape", "dtype", "role")]
    for node in view.graph.nodes:
        mark = "+" if node.name in view.added else ""
        rows.append((mark, node.name, op_name(node), module_of(node), shape_text(node, shapes),
                     dtype_text(node), roles.get(node.name, "")))
    rows.extend(("-", r.name, r.op, "", "", "", "removed") for r in view.removed)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join(("-" if i else " ") * w for i, w in enumerate(widths)))
    return f"# {_header(view)}\n" + "\n".join(lines) + "\n"


# --- DOT ---------------------------------------------------------------------------------------


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _style(node: fx.Node, view: StageView, roles: dict[str, str]) -> dict[str, str]:
    role = roles.get(node.name, "")
    style = {"fillcolor": "white"}
    if role in ("input", "output"):
        style.update(shape="ellipse", fillcolor="#dbe9ff")
    elif role == "state":
        style.update(shape="note", fillcolor="#eeeeee", fontsize="8")
    elif role.startswith("attention ("):
        style.update(fillcolor="#ffd8a8")
    if node.name in view.added:
        style.update(fillcolor="#b2f2bb", penwidth="2", color="#2b8a3e")
    return style


def render_dot(view: StageView) -> str:
    """A Graphviz digraph: nodes clustered by block and by module inside it, changes highlighted."""
    roles, shapes, blocks = node_roles(view), view.shapes, _blocks_of(view)
    lines = [f"digraph {_q(view.name)} {{", f"  label={_q(_header(view))}; labelloc=t; rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
             '  edge [color="#888888", arrowsize=0.6];']
    clusters: dict[str, list[str]] = {}
    for node in view.graph.nodes:
        label = f"{node.name}\n{op_name(node)}\n{shape_text(node, shapes)}".rstrip()
        attrs = ", ".join(f"{k}={_q(v)}" for k, v in {"label": label, **_style(node, view, roles)}.items())
        line = f"    {_q(node.name)} [{attrs}];"
        key = ""
        if node.name in blocks:
            index, block_label = blocks[node.name]
            block_path = view.analysis.blocks[index].path
            sub = module_of(node)[len(block_path):].strip(".").split(".")[0]
            key = block_label + ("\0" + sub if sub and module_of(node).startswith(block_path) else "")
        elif module_of(node):
            key = module_of(node)
        clusters.setdefault(key, []).append(line)
    by_block: dict[str, dict[str, list[str]]] = {}
    for key, node_lines in clusters.items():
        outer, _, inner = key.partition("\0")
        by_block.setdefault(outer, {})[inner] = node_lines
    for ci, (outer, inners) in enumerate(by_block.items()):
        if not outer:
            lines.extend(line[2:] for line in inners.get("", []))
            continue
        lines.append(f"  subgraph cluster_{ci} {{ label={_q(outer)}; style=filled; fillcolor=\"#f6f6f6\";")
        for si, (inner, node_lines) in enumerate(inners.items()):
            if inner:
                lines.append(f"    subgraph cluster_{ci}_{si} {{ label={_q(inner)}; fillcolor=\"#ececec\";")
                lines.extend("  " + x for x in node_lines)
                lines.append("    }")
            else:
                lines.extend(node_lines)
        lines.append("  }")
    if view.removed:
        lines.append('  subgraph cluster_removed { label="removed by this stage"; style=dashed; color="#c92a2a";')
        for r in view.removed:
            lines.append(f"    {_q('removed:' + r.name)} [label={_q(r.name + chr(10) + r.op)}, "
                         'style="dashed", color="#c92a2a", fontcolor="#c92a2a"];')
        lines.append("  }")
    for node in view.graph.nodes:
        for arg in node.all_input_nodes:
            lines.append(f"  {_q(arg.name)} -> {_q(node.name)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


# --- SVG ---------------------------------------------------------------------------------------

_W, _H, _HGAP, _VGAP, _MARGIN = 190, 46, 18, 36, 20
_PALETTE = ["#e7f5ff", "#fff4e6", "#f3f0ff", "#ebfbee", "#fff0f6", "#e3fafc", "#fff9db", "#f8f0fc"]


def layout(graph: fx.Graph) -> dict[str, tuple[int, int]]:
    """{node name: (layer, position in layer)}: layer = longest path from an input; sources sit just
    above their first user; each layer ordered by the mean position of its inputs."""
    nodes = list(graph.nodes)
    depth: dict[fx.Node, int] = {}
    for node in nodes:
        ins = node.all_input_nodes
        depth[node] = 1 + max(depth[a] for a in ins) if ins else 0
    for node in reversed(nodes):
        if not node.all_input_nodes and node.users:
            depth[node] = max(0, min(depth[u] for u in node.users) - 1)
    layers: dict[int, list[fx.Node]] = {}
    for node in nodes:
        layers.setdefault(depth[node], []).append(node)
    pos: dict[fx.Node, float] = {}
    for d in sorted(layers):
        row = layers[d]
        order = {n: i for i, n in enumerate(row)}

        def key(n: fx.Node, order: dict = order) -> tuple[float, int]:
            placed = [pos[a] for a in n.all_input_nodes if a in pos]
            return (sum(placed) / len(placed) if placed else order[n], order[n])

        row.sort(key=key)
        for i, n in enumerate(row):
            pos[n] = float(i)
    return {n.name: (depth[n], int(pos[n])) for n in nodes}


def _fit(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def svg_body(view: StageView) -> tuple[list[str], int, int]:
    """SVG elements of one stage and the width and height they need."""
    roles, shapes, blocks = node_roles(view), view.shapes, _blocks_of(view)
    places = layout(view.graph)
    widths: dict[int, int] = {}
    for layer, _ in places.values():
        widths[layer] = widths.get(layer, 0) + 1
    widest = max(widths.values(), default=1)
    width = 2 * _MARGIN + widest * (_W + _HGAP)
    top = _MARGIN + 30
    xy: dict[str, tuple[float, float]] = {}
    for name, (layer, i) in places.items():
        offset = (widest - widths[layer]) * (_W + _HGAP) / 2
        xy[name] = (_MARGIN + offset + i * (_W + _HGAP), top + layer * (_H + _VGAP))
    layers = max(widths, default=0) + 1
    height = top + layers * (_H + _VGAP) + _MARGIN
    out = [f'<text x="{_MARGIN}" y="{_MARGIN + 12}" font-size="14" font-weight="bold">{escape(_header(view))}</text>']
    for node in view.graph.nodes:
        x2, y2 = xy[node.name]
        for arg in node.all_input_nodes:
            x1, y1 = xy[arg.name]
            a, b = (x1 + _W / 2, y1 + _H), (x2 + _W / 2, y2)
            mid = (a[1] + b[1]) / 2
            color = "#2b8a3e" if node.name in view.added else "#999999"
            out.append(f'<path d="M{a[0]:.0f},{a[1]:.0f} C{a[0]:.0f},{mid:.0f} {b[0]:.0f},{mid:.0f} '
                       f'{b[0]:.0f},{b[1]:.0f}" fill="none" stroke="{color}" marker-end="url(#arrow)"/>')
    for node in view.graph.nodes:
        x, y = xy[node.name]
        role = roles.get(node.name, "")
        fill = _PALETTE[blocks[node.name][0] % len(_PALETTE)] if node.name in blocks else "#ffffff"
        stroke, sw = "#555555", 1
        if role == "state":
            fill = "#eeeeee"
        elif role.startswith("attention ("):
            fill = "#ffd8a8"
        if node.name in view.added:
            fill, stroke, sw = "#b2f2bb", "#2b8a3e", 2.5
        shape = shape_text(node, shapes)
        tip = "\n".join(x for x in (node.name, op_name(node), module_of(node), shape, role) if x)
        out.append(
            f'<g><title>{escape(tip)}</title><rect x="{x:.0f}" y="{y:.0f}" width="{_W}" height="{_H}" rx="6" '
            f'fill="{fill}" stroke="{stroke}" stroke-width="{sw}"/>'
            f'<text x="{x + 6:.0f}" y="{y + 15:.0f}" font-size="11" font-weight="bold">{escape(_fit(node.name, 28))}</text>'
            f'<text x="{x + 6:.0f}" y="{y + 28:.0f}" font-size="10">{escape(_fit(op_name(node), 30))}</text>'
            f'<text x="{x + 6:.0f}" y="{y + 40:.0f}" font-size="9" fill="#555555">{escape(_fit(shape, 34))}</text></g>'
        )
    return out, int(width), int(height)


_DEFS = ('<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" '
         'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#999999"/></marker></defs>')


def render_svg(views: list[StageView]) -> str:
    """One self-contained SVG document; several stages sit side by side."""
    parts, x, height = [], 0, 0
    for view in views:
        body, w, h = svg_body(view)
        parts.append(f'<svg x="{x}" y="0" width="{w}" height="{h}">' + "\n".join(body) + "</svg>")
        x, height = x + w, max(height, h)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{x}" height="{height}" '
            f'font-family="Helvetica, Arial, sans-serif">\n{_DEFS}\n' + "\n".join(parts) + "\n</svg>\n")


# --- JSON --------------------------------------------------------------------------------------


def _jsonable(x: Any, shapes: Shapes) -> Any:
    if isinstance(x, fx.Node):
        return f"%{x.name}"
    if isinstance(x, list | tuple):
        return [_jsonable(v, shapes) for v in x]
    if isinstance(x, dict):
        return {str(k): _jsonable(v, shapes) for k, v in x.items()}
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, bool | int | float | str) or x is None:
        return x
    if isinstance(x, torch.SymInt):
        return str(shapes.expr(x))
    return str(x)


def result_data(result: PassResult) -> dict[str, Any]:
    """A pass result as plain data."""
    return {"name": result.name, "matched": result.matched, "changed": list(result.changed),
            "added_parameters": list(result.added_parameters), "messages": list(result.messages),
            "op_count_diff": result.op_count_diff(), "seconds": round(result.seconds, 6)}


def stage_data(view: StageView) -> dict[str, Any]:
    """Nodes (name, op, target, args, kwargs, module, shape, dtype, role, added), edges, removed, sites."""
    roles, shapes = node_roles(view), view.shapes
    nodes = [
        {"name": n.name, "op": op_name(n), "kind": n.op, "target": str(n.target),
         "args": _jsonable(n.args, shapes), "kwargs": _jsonable(dict(n.kwargs), shapes),
         "module": module_of(n), "shape": shape_text(n, shapes), "dtype": dtype_text(n),
         "role": roles.get(n.name, ""), "added": n.name in view.added}
        for n in view.graph.nodes
    ]
    edges = [[a.name, n.name] for n in view.graph.nodes for a in n.all_input_nodes]
    sites = [{"node": s.name, "form": s.form, "module": s.module_path, "q_heads": s.q_heads,
              "kv_heads": s.kv_heads, "head_dim": s.head_dim, "causal": s.causal} for s in view.analysis.sites]
    blocks = [{"path": b.path, "class": b.cls, "nodes": [n.name for n in b.nodes]} for b in view.analysis.blocks]
    return {"name": view.name, "result": result_data(view.result) if view.result else None,
            "nodes": nodes, "edges": edges, "removed": [r.__dict__ for r in view.removed],
            "sites": sites, "blocks": blocks, "code": view.code}


def render_json(views: list[StageView], results: list[PassResult] | None = None, **extra: Any) -> str:
    """{"stages": [...], "passes": [...], **extra} as indented JSON."""
    data = {**extra, "stages": [stage_data(v) for v in views], "passes": [result_data(r) for r in results or []]}
    return json.dumps(data, indent=1) + "\n"


def render(views: list[StageView], fmt: str, *, results: list[PassResult] | None = None, **extra: Any) -> str:
    """Render `views` in `fmt` (one of FORMATS); several stages are concatenated (one SVG, one JSON)."""
    if fmt == "svg":
        return render_svg(views)
    if fmt == "json":
        return render_json(views, results, **extra)
    one = {"text": render_text, "table": render_table, "dot": render_dot}.get(fmt)
    if one is None:
        raise ValueError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
    return "\n".join(one(v) for v in views)


__all__ = [
    "FORMATS",
    "Removed",
    "StageView",
    "layout",
    "node_roles",
    "render",
    "render_dot",
    "render_json",
    "render_svg",
    "render_table",
    "render_text",
    "result_data",
    "select",
    "shape_text",
    "stage_data",
    "stage_views",
]
