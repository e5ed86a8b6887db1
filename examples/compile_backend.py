"""Use the rewriter as a `torch.compile` backend: passes on Dynamo's graph, then Inductor or eager.

Run: python -m examples.compile_backend [--target llama] [--plan '{passes: [attention_normalize]}'] [--inductor]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from examples.models import TARGETS
from rewrite.compile_backend import CompileReport


def _first_tensor(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def main(argv: list[str] | None = None) -> CompileReport:
    """Compile a tiny model with the `rewrite` backend, check it against eager, print what changed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="llama", choices=sorted(TARGETS))
    parser.add_argument("--plan", default="{passes: [attention_normalize]}")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--inductor", action="store_true", help="compile with Inductor (slow on a CPU)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    model, example = TARGETS[args.target](batch=args.batch, length=args.length)
    call_args, call_kwargs = (example, {}) if isinstance(example, tuple) else ((), dict(example))
    if getattr(model, "config", None) is not None:
        call_kwargs["use_cache"] = False
    reports: list[CompileReport] = []
    options = {"plan": args.plan, "inductor": args.inductor, "on_report": reports.append}
    compiled = torch.compile(model, backend="rewrite", options=options)

    t0 = time.perf_counter()
    out = _first_tensor(compiled(*call_args, **call_kwargs))
    print(f"compiled {type(model).__name__} in {time.perf_counter() - t0:.2f} s with plan {args.plan}")
    report = reports[-1]
    print(report.summary())
    print(f"graph inputs: {len(report.state_names)} parameters/buffers, e.g. {report.state_names[:2]}")

    out.float().pow(2).mean().backward()
    compiled_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    ref = _first_tensor(model(*call_args, **call_kwargs))
    ref.float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    out_err = (out - ref).abs().max().item()
    grad_err = max((a - b).abs().max().item() for a, b in zip(compiled_grads, grads))
    print(f"max |compiled - eager|: output {out_err:.2e}, gradients {grad_err:.2e}")

    print("\nthe rewritten program (first lines):")
    print("\n".join(report.code.strip().splitlines()[:8]))
    return report


if __name__ == "__main__":
    main()
