"""Time against sequence length from a benchmark results JSON, as a standalone SVG (no plotting library).

Reads the format of `benchmarks.runner.write_results` ({"title", "env", "rows": [{"name", "params",
"median_ms", ...}]}), keeps the rows of one batch size and one pass, and draws one line per variant
on log-log axes (time in ms against L).
Run: python -m benchmarks.plot_times [RESULTS.json] [--pass fwd+bwd] [--batch 1] [--out FILE.svg]
     [--extra "NAME=L:ms,L:ms,..."]...
Without RESULTS.json the newest benchmarks/results/linear_attention_*.json is used. --extra adds a
dashed line of numbers measured elsewhere (say another library's times from another run).
"""

from __future__ import annotations

import argparse
import json
import math
from html import escape
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
WIDTH, HEIGHT = 820, 480
LEFT, RIGHT, TOP, BOTTOM = 70, 280, 50, 60


def newest(pattern: str = "linear_attention_*.json", folder: Path = RESULTS) -> Path:
    """The most recently modified results file matching `pattern`."""
    files = sorted(folder.glob(pattern), key=lambda p: (p.stat().st_mtime, p.name))
    if not files:
        raise FileNotFoundError(f"no {pattern} under {folder}")
    return files[-1]


def series(data: dict, pass_: str, batch: int) -> dict[str, list[tuple[int, float]]]:
    """{variant: [(L, median ms), ...] sorted by L} for rows of this pass and batch size."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in data["rows"]:
        params = row.get("params", {})
        if "L" not in params or params.get("pass", pass_) != pass_ or params.get("B", batch) != batch:
            continue
        out.setdefault(row["name"], []).append((int(params["L"]), float(row["median_ms"])))
    return {name: sorted(points) for name, points in out.items()}


def _decades(low: float, high: float) -> list[float]:
    """Powers of ten spanning [low, high]."""
    return [10.0**e for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)]


def _length_label(length: int) -> str:
    return f"{length // 1024}K" if length >= 1024 and length % 1024 == 0 else str(length)


def parse_extra(spec: str) -> tuple[str, list[tuple[int, float]]]:
    """("NAME", [(L, ms), ...]) from "NAME=L:ms,L:ms"."""
    name, _, points = spec.rpartition("=")
    if not name:
        raise ValueError(f"--extra needs NAME=L:ms,..., got {spec!r}")
    pairs = [p.split(":") for p in points.split(",") if p]
    return name, sorted((int(length), float(ms)) for length, ms in pairs)


def render(
    lines: dict[str, list[tuple[int, float]]],
    title: str,
    subtitle: str = "",
    dashed: frozenset[str] = frozenset(),
) -> str:
    """An SVG document: log-log time (ms) against L, one polyline and legend entry per variant
    (dashed for the names in `dashed`)."""
    if not lines:
        raise ValueError("nothing to plot")
    lengths = sorted({length for pts in lines.values() for length, _ in pts})
    times = [ms for pts in lines.values() for _, ms in pts if ms > 0]
    y_ticks = _decades(min(times), max(times))
    x_lo, x_hi = math.log2(lengths[0]), math.log2(lengths[-1])
    y_lo, y_hi = math.log10(y_ticks[0]), math.log10(y_ticks[-1])
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x_of(length: float) -> float:
        span = x_hi - x_lo or 1.0
        return LEFT + (math.log2(length) - x_lo) / span * plot_w

    def y_of(ms: float) -> float:
        span = y_hi - y_lo or 1.0
        return TOP + plot_h - (math.log10(ms) - y_lo) / span * plot_h

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{LEFT}" y="22" font-size="15" font-weight="bold">{escape(title)}</text>',
        f'<text x="{LEFT}" y="38" fill="#555">{escape(subtitle)}</text>',
    ]
    for ms in y_ticks:
        y = y_of(ms)
        out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + plot_w}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{ms:g}</text>')
    for length in lengths:
        x = x_of(length)
        out.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{TOP + plot_h}" stroke="#eee"/>')
        out.append(
            f'<text x="{x:.1f}" y="{TOP + plot_h + 18}" text-anchor="middle">{_length_label(length)}</text>'
        )
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>')
    out.append(
        f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 15}" text-anchor="middle">sequence length L</text>'
    )
    out.append(
        f'<text x="18" y="{TOP + plot_h / 2}" text-anchor="middle" '
        f'transform="rotate(-90 18 {TOP + plot_h / 2})">median time (ms, log scale)</text>'
    )
    for i, (name, points) in enumerate(lines.items()):
        color = COLORS[i % len(COLORS)]
        coords = " ".join(f"{x_of(length):.1f},{y_of(ms):.1f}" for length, ms in points if ms > 0)
        dash = ' stroke-dasharray="6 4"' if name in dashed else ""
        out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        for length, ms in points:
            if ms > 0:
                out.append(
                    f'<circle cx="{x_of(length):.1f}" cy="{y_of(ms):.1f}" r="3" fill="{color}">'
                    f"<title>{escape(name)} L={length}: {ms:.3f} ms</title></circle>"
                )
        ly = TOP + 10 + 20 * i
        lx = LEFT + plot_w + 15
        out.append(
            f'<line x1="{lx}" y1="{ly}" x2="{lx + 24}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/>'
        )
        out.append(f'<text x="{lx + 30}" y="{ly + 4}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", help="results JSON (default: newest linear_attention_*.json)")
    parser.add_argument("--pass", dest="pass_", default="fwd+bwd", help="fwd or fwd+bwd")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "linear_attention_time_vs_length.svg"))
    parser.add_argument("--extra", action="append", default=[], help='dashed line "NAME=L:ms,L:ms,..."')
    args = parser.parse_args(argv)
    path = Path(args.results) if args.results else newest()
    data = json.loads(path.read_text())
    env = data.get("env", {})
    subtitle = f"{args.pass_}, B={args.batch}; {env.get('device', '?')}, {env.get('date', '?')}; {path.name}"
    lines = series(data, args.pass_, args.batch)
    extra = dict(parse_extra(spec) for spec in args.extra)
    lines.update(extra)
    svg = render(lines, data.get("title", path.stem), subtitle, frozenset(extra))
    Path(args.out).write_text(svg)
    print(f"wrote {args.out} from {path}")


if __name__ == "__main__":
    main()
