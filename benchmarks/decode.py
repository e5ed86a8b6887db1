"""Decode speed and state memory: a linearized Llama-shaped model (OptimizedModule.generate's decode
program) next to the original with an SDPA KV cache.

Llama-shaped causal LM (hidden 2048, intermediate 5632, 16 layers, 32 q / 8 kv heads, vocab 32000),
bf16, random init. Checks first that token-by-token logits equal the full forward (both models) and
that the CUDA-graph step equals the eager one. Then, per context length and batch:

- linearized: the prompt is prefilled for real (in chunks) and one decode step is timed, replayed
  from a CUDA graph (and eagerly); with --compile-step also the step compiled by torch.compile
  (Inductor) and replayed from a CUDA graph (on the CPU: called), after a check that its logits
  equal the eager step's;
- original (HF, SDPA, DynamicCache): the KV cache is filled with random keys / values of the context
  length (values do not change the time) and one decode step is timed; where the cache does not fit
  in the free GPU memory the row says so instead of running;
- rewrite softmax (the original through the stateful pass, KV cache, CUDA graph), same random fill.

With --sliding-window W the model is Mistral-shaped instead (the same sizes, every layer seeing its last W
tokens; Llama has no window in transformers): the rewrite softmax rows run over ring caches of W slots
(the decode sites' `_windowed_attention`; the contexts should pass W so the rings wrap), the original keeps
HF's sliding-window DynamicCache (its last W - 1 tokens, as generate() does), the "step vs full" checks
decode past W (a prompt of W + 32 tokens), and the linearized model is built with the mixer pass's
check_masks off (its linear mixers see the whole prefix: the window is dropped).

With --fusions (names from rewrite.decode.fusion_switches: projections, norms, rotary, gated_activation,
kv_write; --fuse-projections is --fusions projections), each linearized variant is also timed (on the same state)
with a decode program built with exactly those decode fusions (sibling projections read as one weight, RMSNorms, rotary
embeddings and gated MLP activations as one kernel each, a KV-cache site's keys and values written by one launch;
rewrite.decode.fuse_projections / fuse_norms / fuse_rotary / fuse_gated_mlp, rewrite.decode.state.FUSED_KV_WRITE),
after a check that its token-by-token logits equal the full
forward, and the rewrite softmax step is timed with them too. The unlabelled programs have no decode fusion (the
library turns norms, rotary, gated_activation and kv_write on by default).

Also: the linearized decode state's bytes at two context lengths, and the time to read the weights
once at the measured copy bandwidth next to the batch-1 decode step.
Run: python -m benchmarks.decode [--lengths 8192,32768] [--batches 1,64] [--out runs/decode.json] [--tiny]
[--compile-step] [--inplace-step] [--fusions projections,norms,rotary] [--profile-step] [--sdpa-attention-too] [--sliding-window W]
"""

from __future__ import annotations

import argparse
import functools
import time
import warnings
from typing import Any

import torch

import rewrite
from benchmarks.runner import Measurement, environment, kernel_breakdown, measure, write_results
from benchmarks.variants import apply_changes, fusion_names, restore
from rewrite.decode import decode_program, sites
from rewrite.decode.compiled import CompiledStep
from rewrite.decode.cuda_graph import GraphedStep
from rewrite.decode.fusion_switches import fusions_on, fusions_only
from rewrite.decode.program import model_window
from rewrite.decode.state import RingKVCache


def build_model(tiny: bool, device: str, dtype: torch.dtype, window: int | None = None) -> Any:
    """The Llama-shaped model, or with `window` a Mistral-shaped one of the same sizes whose layers see their last
    `window` tokens."""
    import transformers

    size = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=32000)
    if tiny:
        size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    if window is not None:
        cfg = transformers.MistralConfig(**size, head_dim=size["hidden_size"] // size["num_attention_heads"],
                                         sliding_window=window, max_position_embeddings=131072,
                                         attn_implementation="sdpa")
        return transformers.MistralForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    cfg = transformers.LlamaConfig(**size, max_position_embeddings=131072, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def hf_cache(model: Any) -> Any:
    """An empty DynamicCache as generate() makes it (sliding-window layers keep their last window - 1 tokens)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config) if model_window(model)[0] is not None else DynamicCache()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def fused_program(om: Any, fusions: list[str]) -> Any:
    """A decode program of `om` built with the decode fusions `fusions` on, beside the default one (which
    `decode_program(om)` keeps returning)."""
    with fusions_on(fusions):
        return decode_program_copy(om)


def optioned_program(om: Any, text: str, fusions: list[str]) -> Any:
    """A decode program of `om` built beside the default one, whose step compiles with the Inductor options
    `text` ("name=value,...") and with the decode fusions `fusions` on."""
    from rewrite.decode import program as program_module

    program_module.STEP_INDUCTOR_OPTIONS = inductor_options(text)
    return fused_program(om, fusions) if fusions else decode_program_copy(om)


def decode_program_copy(om: Any) -> Any:
    """A decode program of `om` built beside the one `decode_program(om)` returns (its own compiled step)."""
    from rewrite.decode.program import DecodeProgram

    return DecodeProgram(om.source, om.plan, dict(om.named_parameters()))


def fused_label(fusions: list[str]) -> str:
    """How a fused program's rows say which fusions it has: "fused projections", "fused norms + rotary"."""
    return "fused " + " + ".join(fusions)


def fused_name(name: str, fusions: list[str]) -> str:
    """A variant's name with its fusions added ("linearized (graph)" -> "linearized (graph, fused norms)")."""
    label = fused_label(fusions)
    return f"{name[:-1]}, {label})" if name.endswith(")") else f"{name} ({label})"


def check(model: Any, lin: Any, soft: Any, device: str, compile_step: bool = False,
          fused: Any = None, soft_fused: Any = None, label: str = "fused") -> dict[str, str]:
    """Relative errors of token-by-token decoding against the full forward, graph vs eager, and (with
    `compile_step`) the compiled step vs the eager one; with `fused` / `soft_fused` (programs of `lin` / `soft`
    with decode fusions, named by `label`) the same for them. With a sliding window the prompt passes it, so the
    ring caches have wrapped."""
    out = {}
    prompt = 32 + (model_window(model)[0] or 0)
    ids = torch.randint(0, model.config.vocab_size, (2, prompt + 16), device=device)
    programs = [("linearized", lin, decode_program(lin)), ("rewrite softmax", soft, decode_program(soft))]
    if fused is not None:
        programs.append((f"linearized ({label})", lin, fused))
    if soft_fused is not None:
        programs.append((f"rewrite softmax ({label})", soft, soft_fused))
    for name, om, program in programs:
        full = om(input_ids=ids).logits
        state = program.new_state(2, ids.shape[1])
        state.begin(prompt)
        steps = [program(ids[:, :prompt], torch.arange(prompt, device=device).expand(2, -1), state)]
        state.advance()
        for t in range(prompt, ids.shape[1]):
            state.begin(1)
            steps.append(program(ids[:, t : t + 1], torch.full((2, 1), t, device=device), state))
            state.advance()
        out[f"{name}: step vs full rel err"] = f"{rel_err(torch.cat(steps, 1), full):.1e}"
    cache = hf_cache(model)
    ref = model(input_ids=ids).logits
    first = model(input_ids=ids[:, :prompt], past_key_values=cache, use_cache=True).logits
    rest = [model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits
            for t in range(prompt, ids.shape[1])]
    out["original: KV cache vs full rel err"] = f"{rel_err(torch.cat([first, *rest], 1), ref):.1e}"
    if device == "cuda":
        eager = lin.generate(ids[:, :prompt], max_new_tokens=16, cuda_graph="never")
        graphed = lin.generate(ids[:, :prompt], max_new_tokens=16, cuda_graph="always")
        out["linearized: graph tokens == eager tokens"] = str(bool(torch.equal(eager, graphed)))
    if compile_step:
        program = decode_program(lin)
        logits = [torch.cat(static_steps(program, ids, prompt, device, compiled), 1) for compiled in (False, True)]
        out["linearized: compiled step vs eager step rel err"] = f"{rel_err(logits[1], logits[0]):.1e}"
        if fused is not None:
            mine = torch.cat(static_steps(fused, ids, prompt, device, True), 1)
            out[f"linearized: compiled step ({label}) vs eager step rel err"] = f"{rel_err(mine, logits[0]):.1e}"
    return out


def static_steps(program: Any, ids: torch.Tensor, prompt: int, device: str, compiled: bool) -> list[torch.Tensor]:
    """Logits of one static-mode step per token of `ids` after the first `prompt` (eager, or compiled and,
    on CUDA, replayed from a CUDA graph)."""
    batch = ids.shape[0]
    state = program.new_state(batch, ids.shape[1])
    state.begin(prompt)
    program(ids[:, :prompt], torch.arange(prompt, device=device).expand(batch, -1), state)
    state.advance()
    state.start_static()
    if compiled and device == "cuda":
        step: Any = GraphedStep(program, state, compiled=True)
    else:
        step = CompiledStep(program, state) if compiled else (lambda i, p: program(i, p, state))
    out = []
    for t in range(prompt, ids.shape[1]):
        state.begin(1)
        out.append(step(ids[:, t : t + 1], torch.full((batch, 1), t, device=device)).clone())
        state.advance()
    return out


def prefill(program: Any, batch: int, length: int, chunk: int, device: str, vocab: int) -> Any:
    """A decode state of `batch` rows after a real prefill of `length` random tokens, in chunks."""
    state = program.new_state(batch, length + 256)
    for start in range(0, length, chunk):
        stop = min(length, start + chunk)
        ids = torch.randint(0, vocab, (batch, stop - start), device=device)
        state.begin(stop - start)
        program(ids, torch.arange(start, stop, device=device).expand(batch, -1), state)
        state.advance()
    return state


def random_kv(program: Any, batch: int, length: int, device: str, vocab: int) -> Any:
    """A decode state whose KV caches hold `length` random keys / values (allocated by a 1-token call); a ring
    cache of W slots holds the last W of them."""
    state = program.new_state(batch, length + 256)
    state.begin(1)
    program(torch.zeros(batch, 1, dtype=torch.long, device=device), torch.zeros(batch, 1, dtype=torch.long,
                                                                               device=device), state)
    for cache in state.layers.values():
        for t in (cache.keys, cache.values):
            t[:, :, :length].normal_()
        if isinstance(cache, RingKVCache):  # slot s lives at s % W
            size = cache.keys.shape[2]
            slots = torch.arange(max(0, length - size), length, device=cache.slot.device)
            cache.slot.index_copy_(0, slots % size, slots)
            cache.valid[:, slots % size] = True
    if state.valid is not None:  # a program with full KV caches keeps the slot mask
        state.valid[:, :length] = True
    state.counts.fill_(length)
    state.length = length
    return state


def time_step(program: Any, state: Any, graphed: bool, device: str, runs: int,
              compiled: bool = False, profile: bool = False) -> Measurement:
    """One decode step: eager, replayed from a CUDA graph, compiled (static state), or both; with `profile` (CUDA),
    its kernels too (printed; their count and time in the row)."""
    ids = torch.zeros(state.batch, 1, dtype=torch.long, device=device)
    step: Any = None
    if graphed:
        step = GraphedStep(program, state, compiled=compiled)
        step.start()
    elif compiled:
        state.start_static()
        step = CompiledStep(program, state)

    def one() -> None:
        state.begin(1)
        pos = torch.full((state.batch, 1), state.length, device=device)
        if step is not None:
            step(ids, pos)
        else:
            program(ids, pos, state)
        state.advance()

    row = measure("", one, warmup=3, runs=runs)
    if profile and device == "cuda":
        lines = kernel_breakdown(f"decode step batch {state.batch}", one, warmup=0, top=40)
        print("\n".join(lines), flush=True)
        row.extra["kernels"] = lines[0].split(": ", 1)[1]
    return row


ORIGINAL = "original (HF, SDPA, DynamicCache)"


def failed(name: str, params: dict[str, Any], exc: BaseException) -> Measurement:
    """A row for a variant that could not run, saying why."""
    return Measurement(name, params, float("nan"), float("nan"), float("nan"), 0,
                       {"note": f"failed: {type(exc).__name__}: {str(exc)[:160]}"})


def attempt(name: str, params: dict[str, Any], fn: Any, *args: Any) -> Measurement:
    """`fn(*args)`'s Measurement named `name`, or a failed row (the run goes on with the other variants)."""
    try:
        row = fn(*args)
    except Exception as exc:  # noqa: BLE001 - report it in the table
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return failed(name, params, exc)
    row.name, row.params = name, params
    return row


def with_rate(row: Measurement, batch: int) -> Measurement:
    if row.runs:
        row.extra["tokens/s"] = f"{batch / row.median_ms * 1e3:.0f}"
    return row


def time_random_kv(program: Any, batch: int, length: int, graphed: bool, device: str, vocab: int,
                   runs: int) -> Measurement:
    """One decode step of a softmax program over `length` random cached keys / values."""
    return time_step(program, random_kv(program, batch, length, device, vocab), graphed, device, runs)


def kv_bytes(model: Any, batch: int, length: int) -> int:
    """Bytes of the original's KV cache (bf16) of `length` tokens (with a sliding window: of the window)."""
    cfg = model.config
    length = min(length, model_window(model)[0] or length)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * head_dim * length * 2


def time_original(model: Any, batch: int, length: int, device: str, runs: int) -> Measurement | str:
    """One HF decode step over a DynamicCache of `length` random keys / values, or why it cannot run; with a
    sliding window, over the sliding layers' last window - 1 of them (the step keeps them at that size)."""
    need = kv_bytes(model, batch, length)
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        if need > 0.85 * free:
            return f"KV cache {need / 2**30:.1f} GiB does not fit ({free / 2**30:.1f} GiB free)"
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    window = model_window(model)[0]
    cache = hf_cache(model)
    try:
        for layer in range(cfg.num_hidden_layers):
            k = torch.randn(batch, cfg.num_key_value_heads, min(length, window or length), head_dim, device=device,
                            dtype=model.dtype)
            cache.update(k, torch.randn_like(k), layer)
        ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        pos = torch.full((batch, 1), length, device=device)

        def one() -> None:
            model(input_ids=ids, past_key_values=cache, position_ids=pos, use_cache=True)
            if window is None:
                cache.crop(-1)  # back to `length` tokens

        return measure("", one, warmup=2, runs=runs)
    except torch.cuda.OutOfMemoryError:
        return f"out of memory with a {need / 2**30:.1f} GiB KV cache"
    finally:
        cache = None  # free the cache before the next variant
        if device == "cuda":
            torch.cuda.empty_cache()


def bandwidth_gbs(device: str) -> float:
    """Copy bandwidth (bytes read + written per second) of a 1 GiB buffer, in GB/s."""
    n = (1 << 30) // 2 if device == "cuda" else (1 << 24)
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    row = measure("copy", lambda: dst.copy_(src), warmup=3, runs=20)
    return 2 * src.nbytes / (row.median_ms / 1e3) / 1e9


def inductor_options(text: str) -> dict[str, bool | int | str]:
    """{name: value} from "name=value,..." (1 / 0 / true / false are booleans, other digits ints)."""
    options: dict[str, bool | int | str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--step-inductor-options: expected name=value, got {item!r}")
        low = value.lower()
        options[name] = (low in ("1", "true")) if low in ("0", "1", "true", "false") else (
            int(value) if value.isdigit() else value)
    return options


def main(argv: list[str] | None = None) -> None:
    with fusions_only([]):  # the unlabelled programs have no decode fusion; --fusions' programs exactly those
        run(argv)


def run(argv: list[str] | None) -> None:
    """Every measurement `main`'s arguments ask for, printed and written to --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="8192,32768")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--memory-lengths", default="1024,65536")
    parser.add_argument("--kind", default="gla")
    parser.add_argument("--feature-map", default="elu1", help="mixer feature map (elu1 normalises: V + 1 state columns)")
    parser.add_argument("--chunk-tokens", type=int, default=65536, help="prefill tokens per call (batch x chunk)")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="tiny model and lengths (a CPU smoke run)")
    parser.add_argument("--compile-step", action="store_true",
                        help="also time the linearized step compiled by torch.compile (Inductor), graphed on CUDA")
    parser.add_argument("--inplace-step", action="store_true",
                        help="write recurrent states in place and normalise inside the step kernel "
                             "(rewrite.decode.steps.INPLACE_STATE, rewrite.mixers.common.FUSED_STEP_NORMALIZE)")
    parser.add_argument("--fusions", default="",
                        help="comma-separated decode fusions (projections, norms, rotary, kv_write): also time each linearized "
                             "variant and the rewrite softmax step with a program built with them on")
    parser.add_argument("--fuse-projections", action="store_true", help="the same as --fusions projections")
    parser.add_argument("--step-inductor-options", default="",
                        help="Inductor options of the compiled step, e.g. max_autotune=1,coordinate_descent_tuning=1 "
                             "(rewrite.decode.program.STEP_INDUCTOR_OPTIONS)")
    parser.add_argument("--step-inductor-variants", default="",
                        help="';'-separated Inductor option sets (each as --step-inductor-options): the compiled, "
                             "graphed linearized step (with --fusions' fusions) timed once more per set")
    parser.add_argument("--profile-step", action="store_true",
                        help="profile one step of each graphed linearized variant: its kernels, their count and time")
    parser.add_argument("--sdpa-attention-too", action="store_true",
                        help="time the softmax program's step with SDPA as well as with the split-KV kernel the decode "
                             "sites run by default (rewrite.decode.sites.KV_CACHE_ATTENTION_KERNEL)")
    parser.add_argument("--sliding-window", type=int, default=None, metavar="W",
                        help="a Mistral-shaped model whose layers see their last W tokens: the softmax program's step "
                             "runs over ring caches of W slots (give contexts longer than W)")
    parser.add_argument("--out", default="runs/decode.json")
    args = parser.parse_args(argv)
    fusions = fusion_names(args.fusions)
    if args.fuse_projections and "projections" not in fusions:
        fusions.insert(0, "projections")
    if args.step_inductor_options:
        from rewrite.decode import program

        program.STEP_INDUCTOR_OPTIONS = inductor_options(args.step_inductor_options)
    if args.inplace_step:
        from rewrite.decode import steps
        from rewrite.mixers import common

        steps.INPLACE_STATE, common.FUSED_STEP_NORMALIZE = True, True
    option_sets = [part.strip() for part in args.step_inductor_variants.split(";") if part.strip()]
    for text in option_sets:
        inductor_options(text)  # a malformed set fails before the model is built
    warnings.filterwarnings("ignore")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.tiny:
        args.lengths, args.batches, args.memory_lengths, args.runs = "64,128", "1,4", "32,256", 3
    window = args.sliding_window
    if window is not None and window < 1:
        raise SystemExit(f"--sliding-window: expected a positive number of tokens, got {window}")
    model = build_model(args.tiny, device, dtype, window)
    vocab = model.config.vocab_size
    example = {"input_ids": torch.randint(0, vocab, (1, 64), device=device)}
    t0 = time.perf_counter()
    mixer = {"kind": args.kind, "feature_map": args.feature_map}
    if window is not None:  # the window dropped: the linear mixers see the whole prefix
        mixer["check_masks"] = False
    lin = rewrite.optimize(model, [{"mixer": mixer}, "stateful"], example_kwargs=example)
    soft = rewrite.optimize(model, ["stateful"], example_kwargs=example)
    lin_program, soft_program = decode_program(lin), decode_program(soft)
    fused = fused_program(lin, fusions) if fusions else None
    soft_fused = fused_program(soft, fusions) if fusions else None
    label = fused_label(fusions)
    env = environment()
    env["optimize + decode programs s"] = f"{time.perf_counter() - t0:.1f}"
    if args.inplace_step:
        env["step"] = "in-place state, normalised in the kernel"
    if args.step_inductor_options:
        env["step Inductor options"] = args.step_inductor_options
    if fused is not None and "projections" in fusions:
        env["fused projection groups"] = str(len(fused.fused.groups))
    for name, attr in (("norms", "fused_norms"), ("rotary", "fused_rotations"),
                       ("gated_activation", "fused_gated_activations")):
        if name in fusions:  # how many calls each fused program holds (linearized / rewrite softmax)
            env[f"fused {name} (linearized / softmax)"] = f"{getattr(fused, attr)} / {getattr(soft_fused, attr)}"
    if window is not None:
        env["sliding window"] = f"{window} tokens (rewrite softmax: ring caches; linearized: window dropped)"
    with torch.inference_mode():
        env.update(check(model, lin, soft, device, args.compile_step, fused, soft_fused, label))
        print("\n".join(f"{k}: {v}" for k, v in env.items()), flush=True)
        rows: list[Measurement] = []
        graphs = device == "cuda"
        for length in [int(x) for x in args.lengths.split(",")]:
            for batch in [int(x) for x in args.batches.split(",")]:
                params = {"context": length, "batch": batch, **({"window": window} if window is not None else {})}
                chunk = max(1, min(length, args.chunk_tokens // batch))
                lin_ms = float("nan")
                try:
                    state = prefill(lin_program, batch, length, chunk, device, vocab)
                except Exception as exc:  # noqa: BLE001 - a failed variant is a row, not the end of the run
                    rows.append(failed("linearized (prefill)", params, exc))
                    state = None
                variants = [("linearized (graph)", True, False), ("linearized (eager)", False, False)]
                if not graphs:
                    variants = [("linearized", False, False)]
                if args.compile_step:  # (name, graphed, compiled)
                    compiled = ("linearized (graph + compiled)", True, True) if graphs else (
                        "linearized (compiled)", False, True)
                    variants.insert(1, compiled)
                runs: list[tuple[str, Any, bool, bool]] = [
                    (name, lambda: lin_program, graphed, compiled) for name, graphed, compiled in variants]
                if fused is not None:  # the same state: the fused program has the same sites
                    runs += [(fused_name(name, fusions), lambda: fused, graphed, compiled)
                             for name, graphed, compiled in variants]
                for text in option_sets:  # a fresh program each: made when timed, then dropped
                    how = "graph + compiled" if graphs else "compiled"
                    runs.append((f"linearized ({how}{', ' + label if fused else ''}) [{text}]",
                                 functools.partial(optioned_program, lin, text, fusions), graphs, True))
                for name, make_program, graphed, compiled in runs if state is not None else []:
                    row = attempt(name, params, time_step, make_program(), state, graphed, device, args.runs, compiled,
                                  args.profile_step and graphed)
                    row.extra["state GiB"] = f"{sum(state.nbytes().values()) / 2**30:.3f}"
                    rows.append(with_rate(row, batch))
                    lin_ms = row.median_ms if lin_ms != lin_ms else min(lin_ms, row.median_ms)
                    print(rows[-1], flush=True)
                state = None
                original = time_original(model, batch, length, device, args.runs)
                if isinstance(original, str):
                    rows.append(Measurement(ORIGINAL, params, float("nan"), float("nan"), float("nan"), 0,
                                            {"note": original}))
                else:
                    original.name, original.params = ORIGINAL, params
                    with_rate(original, batch).extra["linearized speedup"] = f"{original.median_ms / lin_ms:.1f}x"
                    rows.append(original)
                print(rows[-1], flush=True)
                free = torch.cuda.mem_get_info()[0] if graphs else 1 << 34
                cache = "KV cache" if window is None else "ring KV cache"
                attentions = [(f"rewrite softmax ({cache})", sites.KV_CACHE_ATTENTION_KERNEL, soft_program)]
                if soft_fused is not None:
                    attentions.append((f"rewrite softmax ({cache}, {label})", sites.KV_CACHE_ATTENTION_KERNEL,
                                       soft_fused))
                if args.sdpa_attention_too and sites.KV_CACHE_ATTENTION_KERNEL:
                    attentions.append((f"rewrite softmax ({cache}, SDPA)", False, soft_program))
                for name, kernel, program in attentions if kv_bytes(model, batch, length) < 0.6 * free else []:
                    undo = apply_changes("rewrite.decode", [("sites", "KV_CACHE_ATTENTION_KERNEL", kernel)])
                    try:
                        row = attempt(name, params, time_random_kv, program, batch, length, graphs, device, vocab,
                                      args.runs)
                    finally:
                        restore(undo)
                    rows.append(with_rate(row, batch))
                    print(rows[-1], flush=True)
                if device == "cuda":
                    torch.cuda.empty_cache()
        for length in [int(x) for x in args.memory_lengths.split(",")]:
            state = prefill(lin_program, 1, length, min(length, args.chunk_tokens), device, vocab)
            sizes = state.nbytes()
            env[f"linearized state bytes at {length} (recurrent / validity)"] = f"{sizes['recurrent']} / {sizes['valid']}"
            env[f"original KV cache bytes at {length}"] = str(kv_bytes(model, 1, length))
            del state
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        embed = model.get_input_embeddings().weight
        if embed is not model.get_output_embeddings().weight:
            weights -= embed.numel() * embed.element_size()  # a step reads one row of the input embedding
        bandwidth = bandwidth_gbs(device)
        floor_ms = weights / (bandwidth * 1e9) * 1e3
        env["weights read per step GB"] = f"{weights / 1e9:.2f}"
        env["copy bandwidth GB/s"] = f"{bandwidth:.0f}"
        env["read weights once ms"] = f"{floor_ms:.3f}"
        batch1 = [r for r in rows if r.params.get("batch") == 1 and r.name.startswith("linearized") and r.runs]
        if batch1:
            best = min(r.median_ms for r in batch1)
            env["batch-1 linearized step / weight read"] = f"{best / floor_ms:.2f}x"
        for which, fused_rows in (("unfused", False), (label, True)):
            mine = [r for r in batch1 if (label in r.name) == fused_rows]
            if fused is not None and mine:
                env[f"batch-1 linearized step / weight read ({which})"] = (
                    f"{min(r.median_ms for r in mine) / floor_ms:.2f}x")
    shape = "Llama-shaped" if window is None else f"Mistral-shaped (sliding window {window})"
    title = f"Decode step, {shape} {'(tiny) ' if args.tiny else ''}model, linearized ({args.kind}) vs original"
    print(write_results(args.out, title, rows, env))


if __name__ == "__main__":
    main()
