"""Padding-free (varlen pass) vs the padded Hugging Face model with SDPA, on long-tail length batches.

Scenarios (fp16 on CUDA, fp32 on CPU):
  bert      BERT-base shape, random init, batch 32, max 512, mean length ~0.3 x max
  minilm    the pretrained all-MiniLM-L6-v2, batch 32, max 512, mean ~0.3 x max
  bytetrans BERT-base shape, batch 16, max 1024, mean ~0.6 x max (ByteTransformer's A100 setting)
  llama     Llama-shaped decoder prefill (hidden 2048, 32 q / 8 kv heads), batch 16, max 2048, mean ~0.3 x max
For each: the padded model, the varlen module with each attention backend (PyTorch's varlen flash where
present, our Triton kernel, auto), eagerly and replayed from CUDA graphs (`cuda_graphs`), and the ideal (padded time x real tokens / padded tokens). Outputs on real
tokens are checked against the padded model first. Then the attention kernels alone (forward and
forward+backward) on the same packed shapes.
Run: python -m benchmarks.varlen_bert [--scenarios bert,minilm,bytetrans,llama] [--runs 50] [--compile]
     [--out runs/varlen_bert.json]
"""

from __future__ import annotations

import argparse
import functools
import traceback
import warnings

import torch

import rewrite
from benchmarks.runner import Measurement, environment, measure, write_results

SCENARIOS = {
    "bert": dict(kind="bert", batch=32, max_len=512, mean=0.3),
    "minilm": dict(kind="minilm", batch=32, max_len=512, mean=0.3),
    "bytetrans": dict(kind="bert", batch=16, max_len=1024, mean=0.6),
    "llama": dict(kind="llama", batch=16, max_len=2048, mean=0.3),
}
VARIANTS = [("kernel", "never"), ("torch", "never"), ("auto", "never"), ("kernel", "auto"), ("torch", "auto"),
            ("auto", "auto")]
"""(attention backend, cuda_graphs) of the varlen rows: each backend eagerly and replayed from CUDA graphs."""
TINY = {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 128}


def long_tail_lengths(batch: int, max_len: int, mean_fraction: float, seed: int = 0) -> list[int]:
    """Log-normal lengths in [1, max_len] with mean ~ mean_fraction x max_len; the first row is max_len long."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.exp(torch.randn(batch, generator=g) * 0.9)
    target = mean_fraction * max_len
    scale = target / raw.mean().item()
    for _ in range(50):  # clipping lowers the mean: rescale until it sits on the target
        lengths = (raw * scale).round().clamp(1, max_len)
        lengths[0] = max_len
        got = lengths.mean().item()
        if abs(got - target) < 0.5:
            break
        scale *= target / got
    return [int(n) for n in lengths]


def padded_batch(lengths: list[int], max_len: int, vocab: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (len(lengths), max_len), generator=g)
    mask = (torch.arange(max_len)[None, :] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def build(kind: str, max_len: int, tiny: bool, layers: int | None):
    import transformers

    torch.manual_seed(0)
    if kind == "minilm":
        from examples.models import minilm_path

        return transformers.BertModel.from_pretrained(str(minilm_path()), attn_implementation="sdpa"), 30522
    if kind == "bert":
        size = dict(hidden_size=TINY["hidden"], intermediate_size=TINY["intermediate"],
                    num_hidden_layers=TINY["layers"], num_attention_heads=TINY["heads"]) if tiny else {}
        if layers:
            size["num_hidden_layers"] = layers
        cfg = transformers.BertConfig(max_position_embeddings=max(512, max_len), attn_implementation="sdpa", **size)
        return transformers.BertModel(cfg, add_pooling_layer=False), cfg.vocab_size
    size = dict(hidden_size=TINY["hidden"], intermediate_size=TINY["intermediate"], num_hidden_layers=TINY["layers"],
                num_attention_heads=TINY["heads"], num_key_value_heads=TINY["kv_heads"]) if tiny else dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8)
    if layers:
        size["num_hidden_layers"] = layers
    cfg = transformers.LlamaConfig(vocab_size=32000, max_position_embeddings=max(4096, max_len),
                                   attn_implementation="sdpa", **size)
    return transformers.LlamaModel(cfg), cfg.vocab_size


def relative_error(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor) -> float:
    keep = mask.bool()
    a, b = got[keep].float(), want[keep].float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def run_scenario(name: str, spec: dict, args, device: str, dtype: torch.dtype) -> list[Measurement]:
    max_len = spec["max_len"] if not args.tiny else min(spec["max_len"], 64)
    batch = spec["batch"] if not args.tiny else 4
    model, vocab = build(spec["kind"], max_len, args.tiny, args.layers)
    model = model.to(device=device, dtype=dtype).eval()
    lengths = long_tail_lengths(batch, max_len, spec["mean"])
    inputs = padded_batch(lengths, max_len, vocab, device)
    real, padded_tokens = sum(lengths), batch * max_len
    params = {"scenario": name, "B": batch, "max": max_len, "mean": round(real / batch, 1),
              "real %": round(100 * real / padded_tokens, 1)}
    small = padded_batch(long_tail_lengths(2, 16, 0.5, seed=3), 16, vocab, device)
    rows: list[Measurement] = []
    with torch.inference_mode():
        want = model(**inputs).last_hidden_state
        base = measure("padded HF (SDPA)", functools.partial(model, **inputs), params,
                       warmup=args.warmup, runs=args.runs)
        base.extra.update({"x padded": "1.00", "x ideal": f"{real / padded_tokens:.2f}"})
        rows.append(base)
        ideal_ms = base.median_ms * real / padded_tokens
        for backend, graphs in VARIANTS:
            plan = {"passes": [{"varlen": {"attention_backend": backend, "cuda_graphs": graphs}}]}
            label = f"varlen ({backend}, {'eager' if graphs == 'never' else 'CUDA graphs'})"
            try:
                om = rewrite.optimize(model, plan, example_kwargs=small)
                got = om(**inputs).last_hidden_state
                got = om(**inputs).last_hidden_state  # with graphs: the second call captures and replays
            except Exception as exc:  # noqa: BLE001 - a backend missing here is a row that says so
                print(f"  {name}: {label} unavailable: {type(exc).__name__}: {str(exc)[:160]}")
                print("    " + "".join(traceback.format_exception(exc)[-6:]).replace("\n", "\n    "))
                continue
            err = relative_error(got, want, inputs["attention_mask"])
            if err > 2e-2:
                print(f"  WARNING {name}: {label} differs from the padded model on real tokens: {err:.2e}")
            row = measure(label, functools.partial(om, **inputs), params, warmup=args.warmup, runs=args.runs)
            row.extra.update({"x padded": f"{base.median_ms / row.median_ms:.2f}",
                              "x ideal": f"{ideal_ms / row.median_ms:.2f}", "rel err": f"{err:.1e}"})
            rows.append(row)
        if args.compile:
            rows.extend(compiled_rows(model, small, inputs, want, base, ideal_ms, params, args, name))
        ideal = Measurement("ideal (padded x real / padded)", params, ideal_ms, ideal_ms, ideal_ms, 0)
        ideal.extra.update({"x padded": f"{padded_tokens / real:.2f}", "x ideal": "1.00"})
        rows.append(ideal)
    rows.extend(kernel_rows(model, lengths, params, args, device, dtype))
    return rows


def compiled_rows(model, small, inputs, want, base, ideal_ms, params, args, name) -> list[Measurement]:
    """The varlen module under torch.compile (Inductor): fewer launches and no per-op Python overhead."""
    import torch._dynamo

    torch._dynamo.config.capture_dynamic_output_shape_ops = True  # unpadding has a data-dependent size
    torch._dynamo.config.capture_scalar_outputs = True
    rows = []
    try:
        om = rewrite.optimize(model, {"passes": ["varlen"]}, example_kwargs=small)
        compiled = torch.compile(om, dynamic=True)
        got = compiled(**inputs).last_hidden_state
    except Exception as exc:  # noqa: BLE001 - report and go on
        print(f"  {name}: varlen + torch.compile unavailable: {type(exc).__name__}: {str(exc)[:200]}")
        return rows
    err = relative_error(got, want, inputs["attention_mask"])
    row = measure("varlen (auto) + torch.compile", functools.partial(compiled, **inputs), params,
                  warmup=args.warmup, runs=args.runs)
    row.extra.update({"x padded": f"{base.median_ms / row.median_ms:.2f}",
                      "x ideal": f"{ideal_ms / row.median_ms:.2f}", "rel err": f"{err:.1e}"})
    rows.append(row)
    return rows


def kernel_rows(model, lengths: list[int], params: dict, args, device: str, dtype: torch.dtype) -> list[Measurement]:
    """The varlen attention kernels alone on this scenario's packed shapes (one layer), fwd and fwd+bwd."""
    from rewrite.kernels.varlen_attention import varlen_attention

    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", heads) or heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    causal = cfg.model_type == "llama"
    total = sum(lengths)
    q = torch.randn(total, heads, dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(total, kv_heads, dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(total, kv_heads, dim, device=device, dtype=dtype, requires_grad=True)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    longest = max(lengths)
    rows = []
    for backend in ("kernel", "torch"):
        call = functools.partial(varlen_attention, q, k, v, cu, longest, causal=causal, backend=backend,
                                 check_bounds=False)
        try:
            o = call()
        except Exception as exc:  # noqa: BLE001
            print(f"  kernel ({backend}) unavailable: {type(exc).__name__}: {str(exc)[:160]}")
            continue
        do = torch.randn_like(o)

        def forward_backward(call=call, do=do):
            torch.autograd.grad(call(), (q, k, v), do)

        kp = {**params, "attention": f"{'causal' if causal else 'bidir'} H{heads}/{kv_heads} D{dim}"}
        with torch.no_grad():
            rows.append(measure(f"kernel fwd ({backend})", call, kp, warmup=args.warmup, runs=args.runs))
        rows.append(measure(f"kernel fwd+bwd ({backend})", forward_backward, kp, warmup=args.warmup, runs=args.runs))
    return rows


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default="bert,minilm,bytetrans,llama")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--layers", type=int, default=None, help="override the layer count (llama: 16)")
    parser.add_argument("--tiny", action="store_true", help="tiny configs and batches (a CPU smoke run)")
    parser.add_argument("--compile", action="store_true", help="also time the varlen module under torch.compile")
    parser.add_argument("--out", default="runs/varlen_bert.json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    rows: list[Measurement] = []
    for name in args.scenarios.split(","):
        if name not in SCENARIOS:
            raise SystemExit(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
        print(f"== {name}", flush=True)
        try:
            rows.extend(run_scenario(name, SCENARIOS[name], args, device, dtype))
        except ImportError as exc:  # the pretrained MiniLM ships in a package that may be missing here
            print(f"  skipped {name}: {exc}")
        if device == "cuda":
            torch.cuda.empty_cache()
        # written after every scenario, so a run cut short keeps what it measured
        table = write_results(args.out, "Padding-free varlen vs padded Hugging Face (SDPA)", rows, environment())
        print("\n".join(line for line in table.splitlines() if f"| {name} |" in line), flush=True)
    print(table)
    return table


if __name__ == "__main__":
    main()
