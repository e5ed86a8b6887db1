"""Layer skipping on the GPU: latency of prefill and of a decode-sized step against the ideal saving.

A Llama-shaped model (hidden 2048, 16 layers, 32 q / 8 kv heads, bf16, random init) gets the
`layer_skip` pass. Decisions are fixed with `skip_controls(skip_mask=...)` so every variant skips
exactly the fraction it names:

- `none`: decisions held, nothing skipped (the routing overhead), checked equal to the original;
- `none, routers deciding`: the routers run (fused kernel, one row-count read per block), none skip;
- `all`: every block skipped (embeddings + final norm; the floor);
- `f=<x> spread`: every sequence skips x of the blocks, a different set per sequence, so each block
  runs on part of the batch (gather, compute, scatter);
- `f=<x> shared`: every sequence skips the same blocks, so those blocks are not launched.

ideal ms = none - x * (none - all); `of ideal` = (none - measured) / (none - ideal), the share of the
ideal saving obtained (goal: >= 0.8). Skipped variants are checked against the original model run
with the same blocks replaced by the identity, per sequence. The decode-sized step is one token per
sequence with held decisions and no cache; the real decode step runs the `stateful` program of the
causal LM after a prefill of `--decode-context` tokens (KV caches, decisions held from the prefill),
next to the unrouted program's step. A decode step's attention alone (the fused SDPA call over a full
KV cache of `--decode-context` slots) is timed at all, 3/4, 1/2 and 1/4 of the decode batch's rows, next to
the split-KV kernel `rewrite::kv_cache_attention` on the same inputs (GPU only; what the decode sites run by
default, `rewrite.decode.sites.KV_CACHE_ATTENTION_KERNEL`), with its error against SDPA.
The fused router kernel is timed against its PyTorch reference as well.

Run: python -m benchmarks.layer_skip [--batch 8] [--lengths 2048,8192] [--fractions 0.25,0.5] --out runs/layer_skip.json
(`--kv-cache-kernel`: each graphed real decode step both with SDPA and with the split-KV kernel, side by side;
without it, with the sites' default; `--compile-step`: each real decode step also compiled by Inductor;
`--fused-row-gather`: each graphed routed step also with a routed block's gathers by one launch;
`--fused-row-scatter`: also with those and its residual sum scattered by one launch;
`--profile-step`: each graphed step's kernels printed; `--attention-only`: only the decode attention rows and
`--kv-kernel-variants`' launch sweep; `--decode-only [--decode-variants "none,all,f=0.5 spread"]`: only those real
decode steps; `--kv-kernel-set`: one launch of the split-KV kernel for the whole run; `--fusions norms,rotary`: the
real decode steps' programs built with exactly those decode fusions; without it, with none.)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import os
import warnings
from typing import Any

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # 17 GB states come and go: no fragments

import torch  # noqa: E402

import rewrite  # noqa: E402
from benchmarks.runner import Measurement, environment, kernel_breakdown, measure, write_results  # noqa: E402
from benchmarks.variants import apply_changes, fusion_names, restore  # noqa: E402
from rewrite.decode.fusion_switches import fusions_only  # noqa: E402
from rewrite.kernels.router import route  # noqa: E402
from rewrite.kernels.router.reference import route_reference  # noqa: E402
from rewrite.routing import skip_controls  # noqa: E402

FAILURES: list[str] = []
"""Correctness checks that failed; the table is still printed, then the script exits with status 1."""


def release_memory() -> None:
    """Give the last mode's freed states back to the device before the next one prefills (its cache fragments)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_model(layers: int, hidden: int, device: str, dtype: torch.dtype) -> torch.nn.Module:
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), vocab_size=32000,
        max_position_embeddings=131072, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return transformers.LlamaModel(cfg).to(device=device, dtype=dtype).eval()


def spread_mask(batch: int, layers: int, fraction: float) -> torch.Tensor:
    """Each sequence skips round(fraction * layers) blocks, shifted per sequence so blocks see part of the batch."""
    k = round(fraction * layers)
    mask = torch.zeros(batch, layers, dtype=torch.bool)
    stride = max(1, layers // max(1, batch))
    for b in range(batch):
        for j in range(k):
            mask[b, (b * stride + j * max(1, layers // max(1, k))) % layers] = True
    return mask


def shared_mask(batch: int, layers: int, fraction: float) -> torch.Tensor:
    """Every sequence skips the same evenly spaced blocks."""
    k = round(fraction * layers)
    mask = torch.zeros(batch, layers, dtype=torch.bool)
    if k:
        mask[:, torch.linspace(0, layers - 1, k).round().long()] = True
    return mask


def skipped_reference(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The original model, one sequence at a time, with the masked layers replaced by the identity."""

    def identity(module, args, kwargs, out):
        hidden = args[0] if args else kwargs["hidden_states"]
        return hidden if isinstance(out, torch.Tensor) else (hidden, *out[1:])

    outs = []
    for b in range(ids.shape[0]):
        handles = [model.layers[j].register_forward_hook(identity, with_kwargs=True) for j in range(mask.shape[1]) if mask[b, j]]
        try:
            outs.append(model(input_ids=ids[b : b + 1]).last_hidden_state)
        finally:
            for h in handles:
                h.remove()
    return torch.cat(outs)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def call_with(om: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with skip_controls(skip_mask=mask):
        return om(input_ids=ids).last_hidden_state


def call_routed(om: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The routers decide (fused router kernel and one row count read per block); threshold 1: none skip."""
    with skip_controls(threshold=1.0):
        return om(input_ids=ids).last_hidden_state


def time_shape(model, om, batch: int, length: int, fractions: list[float], runs: int, label: str, check: bool) -> list[Measurement]:
    device = next(model.parameters()).device
    layers = len(model.layers)
    ids = torch.randint(0, 32000, (batch, length), device=device)
    variants = {"none": torch.zeros(batch, layers, dtype=torch.bool), "all": torch.ones(batch, layers, dtype=torch.bool)}
    for f in fractions:
        variants[f"f={f} spread"] = spread_mask(batch, layers, f)
        variants[f"f={f} shared"] = shared_mask(batch, layers, f)
    rows: list[Measurement] = []
    with torch.inference_mode():
        original = model(input_ids=ids).last_hidden_state
        rows.append(measure(f"{label} original", functools.partial(model, input_ids=ids), {"B": batch, "L": length}, warmup=2, runs=runs))
        timed: dict[str, float] = {}
        for name, mask in variants.items():  # masks stay on the host: launching needs no device sync
            out = call_with(om, ids, mask)
            err = None
            if name == "none":
                err = relative_error(out, original)
                if err > 1e-3:
                    FAILURES.append(f"{label} {name}: routed output differs from the original (rel err {err:.2e})")
            elif check and name != "all":
                err = relative_error(out, skipped_reference(model, ids, mask))
                if err > 2e-2:
                    FAILURES.append(f"{label} {name}: output differs from the skipped reference (rel err {err:.2e})")
            row = measure(f"{label} {name}", functools.partial(call_with, om, ids, mask), {"B": batch, "L": length}, warmup=2, runs=runs)
            row.extra["skipped"] = f"{mask.float().mean().item():.0%}"
            if err is not None:
                row.extra["rel err"] = f"{err:.1e}"
            timed[name] = row.median_ms
            rows.append(row)
        decided = measure(
            f"{label} none, routers deciding", functools.partial(call_routed, om, ids), {"B": batch, "L": length},
            warmup=2, runs=runs,
        )
        decided.extra["skipped"] = "0%"
        rows.append(decided)
        for row in rows[-len(variants) - 1 : -1]:
            name = row.name.removeprefix(f"{label} ")
            if name in ("none", "all"):
                continue
            fraction = float(name.split()[0].removeprefix("f="))
            ideal = timed["none"] - fraction * (timed["none"] - timed["all"])
            row.extra["ideal ms"] = f"{ideal:.3f}"
            saved, ideal_saved = timed["none"] - row.median_ms, timed["none"] - ideal
            row.extra["of ideal"] = f"{saved / ideal_saved:.2f}" if ideal_saved > 0 else "n/a"
    return rows


PREFILL_TOKENS = 65536
"""Prompt tokens (batch x chunk) per prefill call of the decode timing: long contexts at batch 32 fit."""


def time_decode(layers: int, hidden: int, batch: int, context: int, fractions: list[float], runs: int, device: str,
                dtype: torch.dtype, kv_cache_kernel: bool = False, compile_step: bool = False,
                profile_step: bool = False, only: set[str] | None = None,
                fused_row_gather: bool = False, fused_row_scatter: bool = False) -> list[Measurement]:
    """One real decode step (KV caches filled by a prefill of `context` tokens, decisions held from it) of the
    routed causal LM, per skip variant, next to the same step of the unrouted program; with `kv_cache_kernel`,
    each graphed step also with the decode sites' attention by the split-KV kernel
    (`rewrite.decode.sites.KV_CACHE_ATTENTION_KERNEL`), side by side with SDPA's (else with the sites' default);
    with `compile_step`, each step also compiled by Inductor (graphed on CUDA), where the running rows' gathers and
    scatters can fuse with their neighbours; with `fused_row_gather`, each graphed step also with a routed block's
    gathers made by one `rewrite::gather_rows` launch (`rewrite.routing.runtime.FUSED_ROW_GATHER`); with
    `fused_row_scatter`, also with those gathers and the residual sum scattered by one `rewrite::add_rows_into_`
    launch (`FUSED_ROW_SCATTER`; the other graphed steps scatter by add and `index_copy_`); with
    `profile_step` (CUDA), each replay's kernels are printed too;
    `only`: the variants to run (default all)."""
    import transformers

    import rewrite.decode.sites as sites
    import rewrite.routing.runtime as routing_runtime
    from rewrite.decode import decode_program
    from rewrite.decode.compiled import CompiledStep
    from rewrite.decode.cuda_graph import GraphedStep

    base = build_model(layers, hidden, device, dtype)
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(base.config).to(device=device, dtype=dtype).eval()
    lm.model.load_state_dict(base.state_dict())
    del base
    example = {"input_ids": torch.randint(0, 32000, (2, 64), device=device)}
    programs = {
        "unrouted": decode_program(rewrite.optimize(lm, ["attention_normalize", "stateful"], example_kwargs=example)),
        "routed": decode_program(rewrite.optimize(lm, ["attention_normalize", "layer_skip", "stateful"],
                                                  example_kwargs=example)),
    }
    prompt = torch.randint(0, 32000, (batch, context), device=device)
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    variants = {"none": torch.zeros(batch, layers, dtype=torch.bool), "all": torch.ones(batch, layers, dtype=torch.bool)}
    for f in fractions:
        variants[f"f={f} spread"] = spread_mask(batch, layers, f)
        variants[f"f={f} shared"] = shared_mask(batch, layers, f)
    params = {"B": batch, "context": context}
    rows: list[Measurement] = []
    timed: dict[str, float] = {}
    steps: dict[str, torch.Tensor] = {}

    chunk = max(1, min(context, PREFILL_TOKENS // batch))

    def prefilled(program, mask):
        """The state after the prompt, prefilled `chunk` tokens a call (the routed program's decisions are the
        held mask: every chunk runs the same blocks per sequence, as one call would)."""
        state = program.new_state(batch, context + 4 * (runs + 8) + 8)
        for start in range(0, context, chunk):
            stop = min(context, start + chunk)
            state.begin(stop - start)
            with skip_controls(skip_mask=mask) if mask is not None else contextlib.nullcontext():
                program(prompt[:, start:stop], torch.arange(start, stop, device=device).expand(batch, -1), state)
            state.advance()
        return state

    def step(program, state):
        state.begin(1)
        out = program(token, torch.full((batch, 1), state.length, device=device), state)
        state.advance()
        return out

    def graphed_step(graphed, state):
        state.begin(1)
        out = graphed(token, torch.full((batch, 1), state.length, device=device))
        state.advance()
        return out

    graphs = torch.device(device).type == "cuda"
    with torch.inference_mode():
        for name, mask in [("unrouted", None), *variants.items()]:
            if only is not None and name not in only:
                continue
            program = programs["unrouted" if mask is None else "routed"]
            state = prefilled(program, mask)
            steps[name] = step(program, state)
            row = measure(f"decode step (KV cache) {name}", functools.partial(step, program, state), params,
                          warmup=3, runs=runs)
            if mask is not None:
                row.extra["skipped"] = f"{mask.float().mean().item():.0%}"
            timed[name] = row.median_ms
            rows.append(row)
            print(f"{row.name}: {row.median_ms:.3f} ms", flush=True)  # what a later failure would lose
            del state
            modes = [] if not graphs else [  # (how, key, split-KV kernel, compiled, fused row gather, fused scatter)
                ("CUDA graph, split-KV kernel", "kernel", True, False, False, False) if kernel else
                ("CUDA graph, SDPA", "graph", False, False, False, False)
                for kernel in ([False, True] if kv_cache_kernel else [sites.KV_CACHE_ATTENTION_KERNEL])]
            default = sites.KV_CACHE_ATTENTION_KERNEL
            if fused_row_gather and graphs and mask is not None:  # the unrouted program gathers nothing
                modes.append(("CUDA graph, fused row gather", "gather", default, False, True, False))
            if fused_row_scatter and graphs and mask is not None:
                modes.append(("CUDA graph, fused row gather and scatter", "scatter", default, False, True, True))
            if compile_step:
                modes.append(("CUDA graph + compiled" if graphs else "compiled", "compiled", default, True, False, False))
            for how, key, kernel, compiled, gather, scatter in modes:
                versus_sdpa = kernel and graphs and not compiled  # the kernel's bf16 difference from SDPA's step
                state, twin = prefilled(program, mask), prefilled(program, mask)
                sdpa_twin = prefilled(program, mask) if versus_sdpa else None
                before, sites.KV_CACHE_ATTENTION_KERNEL = sites.KV_CACHE_ATTENTION_KERNEL, kernel
                gather_before, routing_runtime.FUSED_ROW_GATHER = routing_runtime.FUSED_ROW_GATHER, gather
                scatter_before, routing_runtime.FUSED_ROW_SCATTER = routing_runtime.FUSED_ROW_SCATTER, scatter
                try:
                    if graphs:
                        graphed = GraphedStep(program, state, compiled=compiled)
                        graphed.start()
                    else:  # the CPU: the compiled step called each time
                        state.start_static()
                        graphed = CompiledStep(program, state)
                    for _ in range(2):  # warm-up, then capture and replay: checked against the same eager step
                        got, want = graphed_step(graphed, state), step(program, twin)
                        if sdpa_twin is not None:
                            sites.KV_CACHE_ATTENTION_KERNEL = False
                            sdpa = step(program, sdpa_twin)
                            sites.KV_CACHE_ATTENTION_KERNEL = kernel
                    err = relative_error(got, want)
                    if err > 1e-2 and not compiled:  # a compiled step's own bf16 rounding is reported, not checked
                        FAILURES.append(f"decode step {name} ({how}): the replay differs from the eager step ({err:.2e})")
                    row = measure(f"decode step (KV cache, {how}) {name}", functools.partial(graphed_step, graphed, state),
                                  params, warmup=3, runs=runs)
                    if profile_step and graphs:  # where a replay's time goes: its kernels, their count and time
                        lines = kernel_breakdown(f"decode step (KV cache, {how}) {name}",
                                                 functools.partial(graphed_step, graphed, state), warmup=0, top=25)
                        print("\n".join(lines), flush=True)
                        row.extra["kernels"] = lines[0].split(": ", 1)[1]
                finally:
                    sites.KV_CACHE_ATTENTION_KERNEL = before
                    routing_runtime.FUSED_ROW_GATHER = gather_before
                    routing_runtime.FUSED_ROW_SCATTER = scatter_before
                row.extra["rel err"] = f"{err:.1e}"
                if versus_sdpa:  # bf16 rounding of another attention kernel, carried through the layers
                    row.extra["vs SDPA step"] = f"{relative_error(got, sdpa):.1e}"
                if mask is not None:
                    row.extra["skipped"] = f"{mask.float().mean().item():.0%}"
                timed[f"{key} {name}"] = row.median_ms
                if kernel and not compiled and f"graph {name}" in timed:
                    row.extra["vs SDPA"] = f"{row.median_ms / timed[f'graph {name}']:.2f}x"
                rows.append(row)
                print(f"{row.name}: {row.median_ms:.3f} ms", flush=True)
                del state, twin, sdpa_twin, graphed
                release_memory()
    err = relative_error(steps["none"], steps["unrouted"]) if {"none", "unrouted"} <= steps.keys() else 0.0
    if err > 1e-3:
        FAILURES.append(f"decode step: routed with nothing skipped differs from the unrouted program ({err:.2e})")
    for row in rows:
        name = row.name.split(") ", 1)[1]
        prefix = ("compiled " if "compiled" in row.name else "kernel " if "split-KV kernel" in row.name
                  else "scatter " if "and scatter" in row.name else "gather " if "fused row gather" in row.name
                  else "graph " if "CUDA graph" in row.name else "")
        if name.startswith("f=") and prefix + "none" in timed and prefix + "all" in timed:
            fraction = float(name.split()[0].removeprefix("f="))
            none, floor = timed[prefix + "none"], timed[prefix + "all"]
            ideal = none - fraction * (none - floor)
            saved, ideal_saved = none - row.median_ms, none - ideal
            row.extra["ideal ms"] = f"{ideal:.3f}"
            row.extra["of ideal"] = f"{saved / ideal_saved:.2f}" if ideal_saved > 0 else "n/a"
    return rows


KV_KERNEL_CONSTANTS = ("BLOCK_N", "TARGET_PROGRAMS", "MAX_SPLITS", "MERGE_CHUNK", "NUM_WARPS", "NUM_STAGES",
                       "SKIP_EMPTY_TILES", "MASK_UNSEEN_KEYS")
"""The split-KV kernel's launch constants (`rewrite.kernels.kv_cache_attention.triton_decode`) a variant may set."""


BOOLEAN_CONSTANTS = ("SKIP_EMPTY_TILES", "MASK_UNSEEN_KEYS")


def kv_kernel_variants(text: str) -> list[tuple[str, list[tuple[str, str, Any]]]]:
    """[(label, changes)] from "NAME=value,NAME=value;..." (`--kv-kernel-variants`), ints and 0 / 1 booleans."""
    variants = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        changes = []
        for pair in filter(None, (p.strip() for p in item.split(","))):
            name, sep, value = pair.partition("=")
            if not sep or name not in KV_KERNEL_CONSTANTS or not value.isdigit():
                raise SystemExit(f"--kv-kernel-variants: expected NAME=integer with NAME one of {KV_KERNEL_CONSTANTS}, "
                                 f"got {pair!r}")
            changes.append(("triton_decode", name, bool(int(value)) if name in BOOLEAN_CONSTANTS else int(value)))
        variants.append((item, changes))
    return variants


def time_decode_attention(batch: int, context: int, hidden: int, runs: int, device: str,
                          dtype: torch.dtype, kernel_variants: str = "") -> list[Measurement]:
    """A decode step's attention alone over a full KV cache of `context` slots (the model's heads), for all,
    3/4, 1/2 and 1/4 of `batch` rows: the fused SDPA call a routed block makes for its running rows (whether its
    time follows the rows; docs/layer_skip.md, "Decode: where a partly skipped block's time goes"), and on a GPU
    the split-KV kernel `rewrite::kv_cache_attention` on the same inputs (rel err against the SDPA output), once
    more per launch variant in `kernel_variants` (`kv_kernel_variants`)."""
    import rewrite.decode.sites as sites
    from rewrite.kernels.kv_cache_attention import kv_cache_attention

    def sdpa_attention(*args: Any) -> torch.Tensor:
        """The sites' grouped attention with the split-KV switch off: the fused SDPA call."""
        before, sites.KV_CACHE_ATTENTION_KERNEL = sites.KV_CACHE_ATTENTION_KERNEL, False
        try:
            return sites._grouped_attention(*args)
        finally:
            sites.KV_CACHE_ATTENTION_KERNEL = before

    heads, kv_heads = hidden // 64, max(1, hidden // 256)  # build_model's
    dim = hidden // heads
    rows_out: list[Measurement] = []
    for rows in sorted({batch, batch * 3 // 4, batch // 2, max(1, batch // 4)}, reverse=True):
        q = torch.randn(rows, heads, 1, dim, device=device, dtype=dtype)
        keys, values = (torch.randn(rows, kv_heads, context, dim, device=device, dtype=dtype) for _ in range(2))
        visible = torch.ones(rows, 1, 1, context, dtype=torch.bool, device=device)
        params = {"rows": rows, "context": context}
        fused = measure("decode attention: fused SDPA", functools.partial(sdpa_attention, q, keys, values, visible,
                                                                         None), params, warmup=3, runs=runs)
        fused.extra["cache GB"] = f"{2 * keys.nbytes / 1e9:.2f}"
        rows_out.append(fused)
        if device == "cuda":  # on the CPU the op is its PyTorch reference: nothing to time
            want = sdpa_attention(q, keys, values, visible, None)
            err = relative_error(kv_cache_attention(q, keys, values, visible), want)
            if err > 2e-2:
                FAILURES.append(f"split-KV decode attention differs from SDPA at {rows} rows (rel err {err:.2e})")
            split = measure("decode attention: split-KV kernel", functools.partial(kv_cache_attention, q, keys, values,
                                                                                  visible), params, warmup=3, runs=runs)
            split.extra["cache GB"] = fused.extra["cache GB"]
            split.extra["rel err"] = f"{err:.1e}"
            split.extra["speed-up vs SDPA"] = f"{fused.median_ms / split.median_ms:.2f}x"
            rows_out.append(split)
            for label, changes in kv_kernel_variants(kernel_variants):
                undo = apply_changes("rewrite.kernels.kv_cache_attention", changes)
                try:
                    err = relative_error(kv_cache_attention(q, keys, values, visible), want)
                    if err > 2e-2:
                        FAILURES.append(f"split-KV decode attention [{label}] differs from SDPA at {rows} rows "
                                        f"(rel err {err:.2e})")
                    row = measure(f"decode attention: split-KV kernel [{label}]",
                                  functools.partial(kv_cache_attention, q, keys, values, visible), params, warmup=3,
                                  runs=runs)
                finally:
                    restore(undo)
                row.extra.update({"cache GB": fused.extra["cache GB"], "rel err": f"{err:.1e}",
                                  "speed-up vs SDPA": f"{fused.median_ms / row.median_ms:.2f}x"})
                rows_out.append(row)
                print(f"{rows} rows [{label}]: {row.median_ms:.3f} ms, {row.extra['speed-up vs SDPA']} SDPA", flush=True)
        del q, keys, values
    return rows_out


def time_router(batch: int, length: int, hidden: int, device: str, dtype: torch.dtype, runs: int) -> list[Measurement]:
    x = torch.randn(batch, length, hidden, device=device, dtype=dtype)
    w = torch.randn(hidden, device=device, dtype=dtype) / hidden**0.5
    b = torch.zeros(1, device=device, dtype=dtype)
    prob, order, count = route(x, w, b, 0.5)
    want = route_reference(x, w, b, 0.5)
    err = relative_error(prob, want[0])
    if err > 1e-2 or int(count) != int(want[2]):
        FAILURES.append(f"router kernel differs from the reference (rel err {err:.2e})")
    params = {"B": batch, "L": length}
    fused = measure("router: fused rewrite::route", functools.partial(route, x, w, b, 0.5), params, warmup=3, runs=runs)
    eager = measure("router: PyTorch reference", functools.partial(route_reference, x, w, b, 0.5), params, warmup=3, runs=runs)
    fused.extra["rel err"] = f"{err:.1e}"
    return [fused, eager]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lengths", default="2048,8192")
    parser.add_argument("--decode-batch", type=int, default=32)
    parser.add_argument("--fractions", default="0.25,0.5")
    parser.add_argument("--decode-context", type=int, default=2048, help="prompt tokens before the timed decode step")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--no-check", action="store_true", help="skip the per-sequence reference check")
    parser.add_argument("--out", default="runs/layer_skip.json")
    parser.add_argument("--kv-cache-kernel", action="store_true",
                        help="time each graphed decode step both with SDPA and with the split-KV kernel over the KV "
                             "caches (rewrite.decode.sites.KV_CACHE_ATTENTION_KERNEL; without it, the sites' default)")
    parser.add_argument("--compile-step", action="store_true",
                        help="also time each real decode step compiled by Inductor (graphed on CUDA)")
    parser.add_argument("--profile-step", action="store_true",
                        help="profile one replay of each graphed real decode step: its kernels, their count and time")
    parser.add_argument("--kv-kernel-variants", default="",
                        help="';'-separated launch variants of the split-KV kernel timed on the attention rows, e.g. "
                             "'BLOCK_N=128;TARGET_PROGRAMS=2048,MAX_SPLITS=128;NUM_WARPS=8'")
    parser.add_argument("--kv-kernel-set", default="",
                        help="launch constants of the split-KV kernel for the whole run, e.g. 'BLOCK_N=128,NUM_WARPS=8' "
                             "(one variant of --kv-kernel-variants' form)")
    parser.add_argument("--decode-only", action="store_true",
                        help="time only the real decode steps (no prefill, no-cache step, attention rows or router)")
    parser.add_argument("--decode-variants", default="",
                        help="comma-separated real decode variants to run (unrouted, none, all, 'f=0.5 spread', "
                             "'f=0.5 shared'; default all; 'of ideal' needs none and all)")
    parser.add_argument("--attention-only", action="store_true",
                        help="time only the decode attention rows (SDPA, the split-KV kernel and its variants)")
    parser.add_argument("--fused-row-gather", action="store_true",
                        help="also time each graphed real decode step with a routed block's gathers by one "
                             "rewrite::gather_rows launch (rewrite.routing.runtime.FUSED_ROW_GATHER)")
    parser.add_argument("--fused-row-scatter", action="store_true",
                        help="also time each graphed real decode step with the gathers above and a routed block's "
                             "residual sum scattered by one rewrite::add_rows_into_ launch "
                             "(rewrite.routing.runtime.FUSED_ROW_SCATTER)")
    parser.add_argument("--fusions", default="",
                        help="comma-separated decode fusions (projections, norms, rotary, gated_activation, kv_write) for the "
                             "whole run: the real decode steps' programs are built with exactly these (none without it)")
    args = parser.parse_args(argv)
    kv_kernel_variants(args.kv_kernel_variants)  # a malformed variant fails before the models are built
    kernel_set = kv_kernel_variants(args.kv_kernel_set.replace(";", ","))
    fractions = [float(f) for f in args.fractions.split(",")]
    only = {v.strip() for v in args.decode_variants.split(",") if v.strip()} or None
    known = {"unrouted", "none", "all"} | {f"f={f} {kind}" for f in fractions for kind in ("spread", "shared")}
    if only is not None and not only <= known:
        raise SystemExit(f"--decode-variants: {sorted(only - known)} not among {sorted(known)}")
    fusions = fusion_names(args.fusions)
    undo = apply_changes("rewrite.kernels.kv_cache_attention", kernel_set[0][1]) if kernel_set else []
    if kernel_set:
        print(f"split-KV kernel launch for this run: {kernel_set[0][0]}", flush=True)
    if fusions:
        print(f"decode fusions for this run: {', '.join(fusions)}", flush=True)
    try:
        with fusions_only(fusions):
            run(args, fractions, only)
    finally:
        restore(undo)


def run(args: argparse.Namespace, fractions: list[float], only: set[str] | None) -> None:
    """Every measurement `main`'s arguments ask for, written to `args.out` and printed."""
    warnings.filterwarnings("ignore")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.attention_only:
        rows = time_decode_attention(args.decode_batch, args.decode_context, args.hidden, max(args.runs, 30), device,
                                     dtype, args.kv_kernel_variants)
        print(write_results(args.out, "Layer skipping: decode attention", rows, environment()))
        if FAILURES:
            raise SystemExit("correctness checks failed:\n  " + "\n  ".join(FAILURES))
        return
    rows: list[Measurement] = []
    if not args.decode_only:
        model = build_model(args.layers, args.hidden, device, dtype)
        example = {"input_ids": torch.randint(0, 32000, (2, 64), device=device)}
        om = rewrite.optimize(model, {"passes": ["attention_normalize", {"layer_skip": {}}]}, example_kwargs=example)
        for length in (int(x) for x in args.lengths.split(",")):
            rows += time_shape(model, om, args.batch, length, fractions, args.runs, "prefill", not args.no_check)
        rows += time_shape(model, om, args.decode_batch, 1, fractions, max(args.runs, 30), "decode step",
                           not args.no_check)
        del model, om
        rows += time_decode_attention(args.decode_batch, args.decode_context, args.hidden, max(args.runs, 30), device,
                                      dtype, args.kv_kernel_variants)
    rows += time_decode(args.layers, args.hidden, args.decode_batch, args.decode_context, fractions, max(args.runs, 30),
                        device, dtype, args.kv_cache_kernel, args.compile_step, args.profile_step, only,
                        args.fused_row_gather, args.fused_row_scatter)
    if not args.decode_only:
        rows += time_router(args.batch, max(int(x) for x in args.lengths.split(",")), args.hidden, device, dtype,
                            args.runs)
    print(write_results(args.out, "Layer skipping: latency against the ideal saving", rows, environment()))
    if FAILURES:
        raise SystemExit("correctness checks failed:\n  " + "\n  ".join(FAILURES))


if __name__ == "__main__":
    main()
