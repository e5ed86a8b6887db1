"""The `rewrite` command: `dump` graphs, `explain` a plan's cost, list `passes`, `distill`, `layer-skip`.

    rewrite dump llama --plan '{passes: [attention_normalize]}' --stage all --format text
    rewrite dump 'llama?batch=1,length=64' --plan plan.yaml --format svg -o llama.svg
    rewrite explain llama --plan attention_normalize --seq 2048,32k --batch 1
    rewrite passes

TARGET is a built-in name, `path/to/file.py:factory`, `package.module:factory`, or a folder holding
a Hugging Face config.json (and weights) or such a config file, with synthesized inputs (see
rewrite.targets and rewrite.hf_targets; `path/to/model?batch=2,length=64,padding=right`). PLAN is a plan file, inline YAML, or a comma-separated list of pass names.
Errors in the plan, the target or the capture print one message and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
import time
import typing
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rewrite.analysis import GraphAnalysis, analyze
from rewrite.capture import capture
from rewrite.cost_model import Cost, CostReport, estimate, summed
from rewrite.errors import PlanError, RewriteError
from rewrite.pipeline import PipelineReport, run_pipeline
from rewrite.plan import Plan
from rewrite.render import FORMATS, render, select, stage_views
from rewrite.targets import LoadedTarget, resolve_target

PLAN_SUFFIXES = (".yaml", ".yml", ".toml", ".json", ".py")
SUFFIX_FORMATS = {".svg": "svg", ".dot": "dot", ".gv": "dot", ".json": "json", ".txt": "text", ".py": "text"}
Log = Callable[[str], None]
TARGET_HELP = ("built-in name, path/file.py:factory, module:factory, or a Hugging Face model folder / config.json "
               "(?key=value,...: the factory's arguments; for a folder batch, length, padding, seed, attn, dtype)")


@dataclass
class Prepared:
    """A target captured and rewritten: the model, the final graph module and the pipeline's report."""

    target: str
    model: torch.nn.Module
    gm: torch.fx.GraphModule
    report: PipelineReport
    plan: Plan
    notes: list[str] = dataclasses.field(default_factory=list)


def parse_plan(text: str | None) -> Plan:
    """A plan from a file path, inline YAML/JSON, or `pass_a,pass_b`; PlanError when it is not one."""
    if text is None or not text.strip():
        return Plan()
    return Plan.parse(text, comma_names=True)


def stage_labels(plan: Plan) -> list[str]:
    """Names of the stages a run of `plan` keeps; a pass that runs again is `name#2`, `name#3`, ..."""
    labels, seen = ["captured"], {}
    for spec in plan.enabled_passes:
        seen[spec.name] = seen.get(spec.name, 0) + 1
        labels.append(spec.name if seen[spec.name] == 1 else f"{spec.name}#{seen[spec.name]}")
    return [*labels, "final"]


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Silence torch's own log lines (dim specialization notes) while capturing."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def load_announced(target: str, log: Log, *, uses_example_inputs: bool = True) -> LoadedTarget:
    """Load the target; its notes (random weights; synthesized inputs, when the command uses them) go to
    stderr even with --quiet."""
    log(f"loading target {target}")
    loaded = resolve_target(target)
    notes = [*loaded.notes, *([loaded.inputs_note] if uses_example_inputs and loaded.inputs_note else [])]
    for note in notes:
        print(f"note: {note}", file=sys.stderr, flush=True)
    return loaded


def prepare(target: str, plan: Plan, log: Log) -> Prepared:
    """Load the target, capture it and run the plan, keeping every stage's graph."""
    start = time.perf_counter()
    loaded = load_announced(target, log)
    model, args, kwargs = loaded.model, loaded.args, loaded.kwargs
    n_params = sum(p.numel() for p in model.parameters())
    log(f"capturing {type(model).__name__} ({n_params / 1e6:.2f} M parameters)")
    with warnings.catch_warnings(), _quiet_loggers("torch._export", "torch.export", "torch.fx.experimental"):
        warnings.simplefilter("ignore")
        captured = capture(model, args, kwargs)
    gm = captured.graph_module
    log(f"captured {len(gm.graph.nodes)} nodes in {time.perf_counter() - start:.1f} s")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = run_pipeline(gm, plan, keep_stages=True, source=model)
    for result in report.results:
        log(f"pass {result.summary()}")
    for w in caught:  # shown even with --quiet: a pass that matched nothing is worth knowing
        if issubclass(w.category, UserWarning):
            print(f"warning: {w.message}", file=sys.stderr)
    if report.lowered:
        log(f"lowered {len(report.lowered)} nodes")
    notes = [*loaded.notes, *([loaded.inputs_note] if loaded.inputs_note else [])]
    return Prepared(target, model, gm, report, plan, notes)


# --- dump ----------------------------------------------------------------------------------------


def cmd_dump(args: argparse.Namespace, log: Log) -> int:
    """`rewrite dump`: render one stage (or all) of the target rewritten by the plan."""
    plan = parse_plan(args.plan)
    names = stage_labels(plan)
    if args.stage != "all" and args.stage not in names:
        raise PlanError("--stage", f"no stage {args.stage!r} in this plan", ["all", *names])
    fmt = args.format or (SUFFIX_FORMATS.get(Path(args.output).suffix.lower(), "text") if args.output else "text")
    prepared = prepare(args.target, plan, log)
    views = stage_views(prepared.report.stages, prepared.report.results)
    picked = select(views, args.stage)
    log(f"rendering {len(picked)} stage(s) as {fmt}")
    text = render(picked, fmt, results=prepared.report.results, target=args.target,
                  plan=plan.to_data(), target_notes=prepared.notes)
    if fmt == "text" and prepared.notes:
        text = "".join(f"# {note}\n" for note in prepared.notes) + text
    _emit(text, args.output, log)
    return 0


def _emit(text: str, output: str | None, log: Log) -> None:
    if output:
        Path(output).write_text(text)
        log(f"wrote {output} ({len(text)} characters)")
    else:
        sys.stdout.write(text)


# --- explain -------------------------------------------------------------------------------------


def parse_lengths(text: str) -> list[int]:
    """`2048,32k` -> [2048, 32768] (k = 1024)."""
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        scale = 1024 if item.endswith("k") else 1
        try:
            out.append(int(item.rstrip("k")) * scale)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a length: {item!r} (use e.g. 2048,32k)") from None
        if out[-1] < 1:
            raise argparse.ArgumentTypeError(f"not a length: {item!r} (lengths are >= 1)")
    if not out:
        raise argparse.ArgumentTypeError("give at least one length")
    return out


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def human(x: float, unit: str) -> str:
    """1.5e9 FLOP -> '1.50 GFLOP'; bytes use powers of 1024 (KiB, MiB, ...)."""
    base, prefixes = (1024.0, ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]) if unit == "B" else (
        1000.0, ["", "k", "M", "G", "T", "P", "E"])
    i = 0
    while abs(x) >= base and i < len(prefixes) - 1:
        x, i = x / base, i + 1
    return f"{x:.3g} {prefixes[i]}{unit}"


QUANTITIES = (("flops", "FLOPs", "FLOP"), ("bytes", "bytes moved", "B"), ("activations", "activations", "B"))


def _group_blocks(cost: CostReport) -> list[tuple[str, Cost]]:
    """Consecutive blocks of equal cost collapse into one row labelled `first .. last (n x, each)`."""
    rows: list[tuple[list[str], str, Cost]] = []
    for block in cost.blocks:
        if rows and block.path and rows[-1][1] == block.cls and rows[-1][0][0] and rows[-1][2] == block.cost:
            rows[-1][0].append(block.label)
        else:
            rows.append(([block.label], block.cls, block.cost))
    out = []
    for labels, cls, c in rows:
        label = labels[0] if len(labels) == 1 else f"{labels[0]} .. {labels[-1]} ({len(labels)} blocks, each)"
        out.append((label + (f" [{cls}]" if cls else ""), c))
    return out


def _cost_lines(label: str, cost: Cost, lengths: list[int], batch: int) -> list[str]:
    lines = [label]
    for key, name, unit in QUANTITIES:
        values = "   ".join(f"seq={n}: {human(cost.evaluate(n, batch)[key], unit)}" for n in lengths)
        lines.append(f"    {name:<12} {getattr(cost, key)}")
        lines.append(f"    {'':<12} {values}")
    return lines


def _attention_cost(cost: CostReport, analysis: GraphAnalysis) -> Cost:
    """The cost of the attention nodes (for unfused sites, every node of the matmul-softmax chain)."""
    names = {n.name for s in analysis.sites for n in (s.chain or [s.node])}
    return summed(c for name, c in cost.node_costs.items() if name in names)


def _site_lines(analysis: GraphAnalysis) -> list[str]:
    lines = [f"attention sites ({len(analysis.sites)}):"]
    for s in analysis.sites:
        heads = f"{s.q_heads} q / {s.kv_heads} kv heads" if s.q_heads else "heads ?"
        lines.append(f"  {s.module_path or '<root>'}: {s.form}, {heads}, head dim {s.head_dim}, "
                     f"{'causal' if s.causal else 'not causal'} (node {s.name})")
    return lines


def _fixed_dim_notes(cost: CostReport) -> list[str]:
    symbols = {str(x) for key, _, _ in QUANTITIES for x in getattr(cost.total, key).free_symbols}
    return [
        f"note: no cost depends on {name}: the capture fixed it (an example input of size 1 there, "
        "or a model that needs a fixed size)"
        for name in ("batch", "seq") if name not in symbols
    ]


def explain_data(prepared: Prepared, lengths: list[int], batch: int) -> dict[str, Any]:
    """The explain report as plain data: sites, per-block and total formulas and values."""
    analysis = analyze(prepared.gm)
    cost = estimate(prepared.gm, analysis)
    captured = prepared.report.stage("captured").graph
    before = estimate(captured, root=prepared.gm) if prepared.plan.enabled_passes else None

    def cost_data(c: Cost) -> dict[str, Any]:
        return {k: {"formula": str(getattr(c, k)), "values": {str(n): c.evaluate(n, batch)[k] for n in lengths}}
                for k, _, _ in QUANTITIES}

    return {
        "target": prepared.target, "target_notes": prepared.notes, "plan": prepared.plan.to_data(),
        "batch": batch, "seq": lengths,
        "sites": [{"module": s.module_path, "form": s.form, "q_heads": s.q_heads, "kv_heads": s.kv_heads,
                   "head_dim": s.head_dim, "causal": s.causal, "node": s.name} for s in analysis.sites],
        "blocks": [{"path": b.path, "class": b.cls, **cost_data(b.cost)} for b in cost.blocks],
        "attention": cost_data(_attention_cost(cost, analysis)),
        "total": cost_data(cost.total),
        "total_before_plan": cost_data(before.total) if before else None,
        "pass_messages": {r.name: list(r.messages) for r in prepared.report.results},
    }


def cmd_explain(args: argparse.Namespace, log: Log) -> int:
    """`rewrite explain`: attention sites, per-block and total cost formulas and values."""
    plan = parse_plan(args.plan)
    prepared = prepare(args.target, plan, log)
    log("estimating costs")
    if args.json:
        _emit(json.dumps(explain_data(prepared, args.seq, args.batch), indent=1) + "\n", args.output, log)
        return 0
    analysis = analyze(prepared.gm)
    cost = estimate(prepared.gm, analysis)
    model = prepared.model
    passes = ", ".join(p.name for p in plan.enabled_passes) or "(none)"
    lines = [
        f"target: {args.target} ({type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters)",
        *prepared.notes,
        f"plan: {passes}",
        f"formulas in batch and seq; values at batch={args.batch}",
        *_fixed_dim_notes(cost),
        "",
        *_site_lines(analysis),
        "",
        "per block (FLOPs, bytes moved by unfused ops, activations kept for backward):",
    ]
    for label, c in _group_blocks(cost):
        lines.extend("  " + x for x in _cost_lines(label, c, args.seq, args.batch))
    lines.append("")
    lines.extend(_cost_lines("total", cost.total, args.seq, args.batch))
    attn = _attention_cost(cost, analysis)
    if analysis.sites:
        shares = "   ".join(
            f"seq={n}: {100 * attn.evaluate(n, args.batch)['flops'] / max(cost.total.evaluate(n, args.batch)['flops'], 1):.1f}%"
            for n in args.seq
        )
        lines += ["", f"attention FLOPs  {attn.flops}", f"  share of total  {shares}"]
    if plan.enabled_passes:
        before = estimate(prepared.report.stage("captured").graph, root=prepared.gm).total
        lines += ["", *_cost_lines("total before the plan (captured graph)", before, args.seq, args.batch)]
    notes = [f"  {r.name}: {m}" for r in prepared.report.results for m in r.messages]
    if notes:  # per-layer choices the passes made (e.g. sequence_parallel's strategy per layer)
        lines += ["", "what the passes decided:", *notes]
    _emit("\n".join(lines) + "\n", args.output, log)
    return 0


# --- passes --------------------------------------------------------------------------------------


def pass_docs() -> list[dict[str, Any]]:
    """Every registered pass: name, summary, options (name, type, default, choices, help)."""
    from rewrite.passes import PASSES

    out = []
    for name, cls in sorted(PASSES.items()):
        hints = typing.get_type_hints(cls.Options)
        options = []
        for field in dataclasses.fields(cls.Options):
            default = field.default if field.default is not dataclasses.MISSING else (
                field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
            hint = hints.get(field.name)
            options.append({"name": field.name, "type": getattr(hint, "__name__", str(hint)),
                            "default": default, "choices": field.metadata.get("choices"),
                            "help": field.metadata.get("help", "")})
        out.append({"name": name, "summary": cls.summary, "options": options})
    return out


def cmd_passes(args: argparse.Namespace, log: Log) -> int:
    """`rewrite passes`: every registered pass with its summary and options."""
    docs = pass_docs()
    if args.json:
        sys.stdout.write(json.dumps(docs, indent=1, default=str) + "\n")
        return 0
    lines = []
    for doc in docs:
        lines += [doc["name"], f"    {doc['summary']}"]
        for opt in doc["options"]:
            text = f"    --{opt['name']}: {opt['type']} = {opt['default']!r}"
            if opt["choices"]:
                text += f"  (choices: {', '.join(map(repr, opt['choices']))})"
            if opt["help"]:
                text += f"  {opt['help']}"
            lines.append(text)
        if not doc["options"]:
            lines.append("    (no options)")
        lines.append("")
    sys.stdout.write("\n".join(lines))
    return 0


# --- entry point ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `rewrite` command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    parser = argparse.ArgumentParser(prog="rewrite", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{dump,explain,passes,distill,layer-skip}")

    dump = sub.add_parser("dump", parents=[common], help="print the graph before/after each pass")
    dump.add_argument("target", help=TARGET_HELP)
    dump.add_argument("--plan", default=None, help="plan file, inline YAML, or pass names (default: no passes)")
    dump.add_argument("--stage", default="final", help="captured, a pass name, final (default) or all")
    dump.add_argument("--format", choices=FORMATS, default=None, help="default: from -o's suffix, else text")
    dump.add_argument("-o", "--output", default=None, help="write to this file instead of stdout")
    dump.set_defaults(run=cmd_dump)

    explain = sub.add_parser("explain", parents=[common], help="FLOPs, bytes and activation memory of a plan")
    explain.add_argument("target", help=TARGET_HELP)
    explain.add_argument("--plan", default=None)
    explain.add_argument("--seq", type=parse_lengths, default=[2048, 32768], help="lengths, e.g. 2048,32k")
    explain.add_argument("--batch", type=positive_int, default=1)
    explain.add_argument("--json", action="store_true", help="machine-readable output")
    explain.add_argument("-o", "--output", default=None)
    explain.set_defaults(run=cmd_explain)

    passes = sub.add_parser("passes", parents=[common], help="list every pass and its options")
    passes.add_argument("--json", action="store_true")
    passes.set_defaults(run=cmd_passes)

    from rewrite.distill.cli import add_distill_command  # the recipe's command lives with the recipe

    add_distill_command(sub, common)

    from rewrite.routing.cli import add_layer_skip_command  # layer skip: train routers, report decisions

    add_layer_skip_command(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 for errors in the plan, target, capture or arguments)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed its message
        return int(exc.code or 0)
    start = time.perf_counter()

    def log(message: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - start:6.1f}s] {message}", file=sys.stderr, flush=True)

    try:
        return args.run(args, log)
    except RewriteError as exc:
        print(f"rewrite {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"rewrite {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
