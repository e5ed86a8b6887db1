"""GPU speed of a linearized Llama-shaped model next to the original and the attention-free floor.

Llama-shaped body (hidden 2048, intermediate 5632, 16 layers, 32 q / 8 kv heads), bf16, batch 1,
random init, three variants side by side in one run:

- `original`: Hugging Face with SDPA;
- `floor`: the same weights with attention made free (q passed through): the time no mixer can beat;
- `gla`: `rewrite.optimize` with the `gla` mixer on every layer (`--plans` adds others).

Phases: `prefill` (forward under inference mode) and `train` (forward + backward of a scalar loss
with gradients for every parameter); modes: `eager` and `compile` (torch.compile; the linearized
model through the `rewrite` backend). Each row gives the median and spread of `--runs` runs, the
seconds of the first call (the compilation in compile mode), the peak GPU memory of a later call,
and the ratio to the floor at the same length, phase and mode. Before timing, the script checks
the mixer's CUDA kernels against the CPU reference on a small case; in compile mode it reports each
variant's compiled-vs-eager difference (bf16 drift of the untouched models next to the linearized one).

Run: python -m benchmarks.mixer_speed --out benchmarks/results/mixer_speed.json
     [--lengths 8192,32768,131072] [--phases prefill,train] [--modes eager,compile] [--layers 16]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

import rewrite
from benchmarks.runner import Measurement, environment, measure, write_results
from benchmarks.variants import apply_changes, restore

PLANS: dict[str, dict[str, Any]] = {
    "gla": {"passes": [{"mixer": {"kind": "gla", "feature_map": "identity", "normalize": False}}]},
    "gla_elu_normalized": {"passes": [{"mixer": {"kind": "gla", "feature_map": "elu1", "normalize": True}}]},
    "gated_deltanet": {"passes": [{"mixer": {"kind": "gated_deltanet", "feature_map": "identity"}}]},
    "hybrid_swa": {"passes": [{"mixer": {"kind": "hybrid_swa", "window": 512, "sinks": 4, "feature_map": "elu1"}}]},
}
FREE = "attention_free"


def _free_attention(module, query, key, value, attention_mask, **kwargs):
    """An attention that costs nothing: the queries pass through as the output ([B, L, H, D])."""
    return query.transpose(1, 2), None


def build_model(layers: int, attn: str) -> torch.nn.Module:
    import transformers

    if attn == FREE:
        transformers.AttentionInterface.register(FREE, _free_attention)
    cfg = transformers.LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=262144, attn_implementation=attn,
    )
    torch.manual_seed(0)
    return transformers.LlamaModel(cfg).to(device="cuda", dtype=torch.bfloat16).eval()


def check_kernels() -> str:
    """Max relative error of the gla mixer on CUDA (bf16) against the CPU reference (fp32), small case."""
    from rewrite.mixers.gla import gla_mixer

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 1024, 128, generator=g) for h in (8, 2, 2))
    want = gla_mixer(q, k, v, scale=128**-0.5)
    got = gla_mixer(*(x.cuda().bfloat16() for x in (q, k, v)), scale=128**-0.5).float().cpu()
    err = ((got - want).norm() / want.norm()).item()
    if not err < 2e-2:
        raise SystemExit(f"gla kernel disagrees with the CPU reference: rel err {err:.2e}")
    return f"{err:.1e}"


def _prefill(fn: Callable[..., Any], ids: torch.Tensor) -> Callable[[], Any]:
    def run() -> Any:
        with torch.inference_mode():
            return fn(input_ids=ids)

    return run


def _train(fn: Callable[..., Any], model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], Any]:
    params = [p for p in model.parameters() if p.requires_grad]

    def run() -> None:
        for p in params:
            p.grad = None
        out = fn(input_ids=ids).last_hidden_state
        out.float().square().mean().backward()

    return run


def _first_call(fn: Callable[[], Any]) -> float:
    """Seconds of the first call (with torch.compile, the compilation)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def _peak(fn: Callable[[], Any]) -> float:
    """Peak GPU GiB of one call after the first (steady state: compilation is not counted)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def _failed_row(name: str, params: dict[str, Any], why: str) -> Measurement:
    row = Measurement(name, params, float("nan"), float("nan"), float("nan"), 0)
    row.extra["peak GiB"] = why
    return row


def kernel_changes(name: str) -> list:
    """The (module, attribute, value) changes of `benchmarks.linear_attention`'s sweep variant `name`."""
    from benchmarks.linear_attention import SWEEP

    if name not in SWEEP:
        raise SystemExit(f"unknown kernel variant {name!r}; choose from {list(SWEEP)}")
    return SWEEP[name]


def main(argv: list[str] | None = None) -> list[Measurement]:
    """Check, time every variant at every length / phase / mode, print the table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="8192,32768,131072")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--plans", default="gla", help=f"comma-separated, from {list(PLANS)}")
    parser.add_argument("--phases", default="prefill,train")
    parser.add_argument("--modes", default="eager,compile")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--kernel-variants", default="",
                        help="comma-separated names of benchmarks.linear_attention's sweep variants: each adds a row "
                             "per plan timed with that variant's kernel constants (same model, same compilation)")
    parser.add_argument("--out", default="runs/mixer_speed.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("mixer_speed needs a CUDA GPU")
    warnings.filterwarnings("ignore")
    env = environment()
    env["gla kernel rel err vs CPU reference"] = check_kernels()
    original = build_model(args.layers, "sdpa")
    floor = build_model(args.layers, FREE)
    floor.load_state_dict(original.state_dict())
    example = {"input_ids": torch.randint(0, 32000, (1, 256), device="cuda")}
    variants: dict[str, dict[str, Any]] = {
        "floor (attention free)": {"model": floor},
        "original (SDPA)": {"model": original},
    }
    for name in args.plans.split(","):
        source = copy.deepcopy(original)
        om = rewrite.optimize(source, PLANS[name], example_kwargs=example)
        variants[f"{name} (rewrite)"] = {"model": source, "eager": om, "plan": PLANS[name]}
        for kernels in filter(None, args.kernel_variants.split(",")):
            variants[f"{name} (rewrite) [{kernels}]"] = {"model": source, "eager": om, "plan": PLANS[name],
                                                         "changes": kernel_changes(kernels),
                                                         "base": f"{name} (rewrite)"}
    modes, phases = args.modes.split(","), args.phases.split(",")
    rows: list[Measurement] = []
    for length in [int(x) for x in args.lengths.split(",")]:
        ids = torch.randint(0, 32000, (1, length), device="cuda")
        for mode in modes:
            compiled: dict[str, Callable[..., Any]] = {}
            for name, v in variants.items():
                if mode == "eager":
                    compiled[name] = v.get("eager", v["model"])
                elif "base" in v:  # the kernels' constants are read at each launch: one compilation serves
                    compiled[name] = compiled[v["base"]]
                elif "plan" in v:
                    compiled[name] = torch.compile(v["model"], backend="rewrite", options={"plan": v["plan"]})
                else:
                    compiled[name] = torch.compile(v["model"])
            for phase in phases:
                floor_ms = None
                agree = {}
                for name, v in variants.items():
                    fn = compiled[name]
                    params = {"L": length, "phase": phase, "mode": mode}
                    run = _prefill(fn, ids) if phase == "prefill" else _train(fn, v["model"], ids)
                    undo = apply_changes("rewrite.kernels.linear_attention", v.get("changes", []))
                    try:
                        first = _first_call(run)  # compiles in compile mode: kept out of the peak and the timing
                        peak = _peak(run)
                        row = measure(name, run, params, warmup=1, runs=args.runs if length <= 32768 else 3)
                    except torch.cuda.OutOfMemoryError:
                        rows.append(_failed_row(name, params, "OOM"))
                        print(f"{name:28s} L={length:6d} {phase:7s} {mode:7s} out of memory", flush=True)
                        torch.cuda.empty_cache()
                        continue
                    except Exception as exc:  # one failing variant must not lose the others' numbers
                        rows.append(_failed_row(name, params, f"error: {type(exc).__name__}: {str(exc)[:120]}"))
                        print(f"{name:28s} L={length:6d} {phase:7s} {mode:7s} failed: {exc!r}"[:300], flush=True)
                        torch.cuda.empty_cache()
                        continue
                    finally:
                        restore(undo)
                    row.extra["peak GiB"] = f"{peak:.1f}"
                    row.extra["first call s"] = f"{first:.1f}"
                    if name.startswith("floor"):
                        floor_ms = row.median_ms
                    row.extra["x floor"] = f"{row.median_ms / floor_ms:.2f}" if floor_ms else "-"
                    if phase == "prefill" and ("plan" in v or mode == "compile"):
                        with torch.inference_mode():
                            agree[name] = fn(input_ids=ids).last_hidden_state.float()
                    rows.append(row)
                    print(f"{name:28s} L={length:6d} {phase:7s} {mode:7s} {row.median_ms:9.2f} ms  "
                          f"peak {peak:5.1f} GiB  x floor {row.extra['x floor']}", flush=True)
                    for p in v["model"].parameters():
                        p.grad = None
                    torch.cuda.empty_cache()
                for name, out in agree.items():
                    finite = bool(torch.isfinite(out).all())
                    if not finite:
                        raise SystemExit(f"{name} gave non-finite outputs at L={length} ({mode})")
                    if mode == "compile":
                        with torch.inference_mode():
                            eager = variants[name].get("eager", variants[name]["model"])(
                                input_ids=ids).last_hidden_state.float()
                        err = ((out - eager).norm() / eager.norm()).item()
                        env[f"{name} compile vs eager rel err L={length}"] = f"{err:.1e}"
            with contextlib.suppress(Exception):
                torch._dynamo.reset()
    title = f"Llama-shaped body ({args.layers} layers), bf16, batch 1: original vs linearized vs attention-free floor"
    print(write_results(args.out, title, rows, env))
    return rows


if __name__ == "__main__":
    main()
