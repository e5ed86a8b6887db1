"""Linearize a built-in model: replace softmax attention by a linear mixer and compare the outputs.

    python -m examples.linearize                      # tiny Llama, kind auto (gla), every layer
    python -m examples.linearize --target bert        # an encoder: kind auto picks bidirectional
    python -m examples.linearize --target llama --kind retention --layers 1:

Without any training the outputs differ from the original (softmax attention is not linear); the
`distill` recipe is what recovers quality. This example shows what changed and by how much.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F

import rewrite
import rewrite.passes.mixer  # noqa: F401  (registers the pass until rewrite/passes/__init__ imports it)
from examples.models import TARGETS
from rewrite.mixers.common import FEATURE_MAPS
from rewrite.passes.mixer import KIND_CHOICES


def main_tensor(out: Any) -> torch.Tensor:
    """The tensor a model output is about: logits, last hidden state, or the output itself."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"no tensor in model output of type {type(out).__name__}")


def _call(model: torch.nn.Module, inputs: Any) -> torch.Tensor:
    with torch.no_grad():
        out = model(*inputs) if isinstance(inputs, tuple) else model(**inputs)
    return main_tensor(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="llama", choices=sorted(t for t in TARGETS if t != "llama_base"))
    parser.add_argument("--kind", default="auto", choices=KIND_CHOICES)
    parser.add_argument("--layers", default="all", help="layer selector: 'all', '1:', '0', 'model.layers.*'")
    parser.add_argument("--feature-map", default="elu1", choices=list(FEATURE_MAPS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=16)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> rewrite.OptimizedModule:
    """Linearize the chosen target, print the layers that changed and how the outputs moved."""
    args = parse_args(argv)
    model, inputs = TARGETS[args.target](batch=args.batch, length=args.length)
    before = _call(model, inputs)
    plan = [{"mixer": {"kind": args.kind, "layers": args.layers, "feature_map": args.feature_map}}]
    call_args, call_kwargs = (inputs, {}) if isinstance(inputs, tuple) else ((), inputs)
    om = rewrite.optimize(model, plan, call_args, example_kwargs=call_kwargs)
    result = om.report.results[-1]
    print(f"{args.target}: {result.summary()}")
    for line in result.changed:
        print(f"  changed {line}")
    for name in result.added_parameters:
        print(f"  new parameter {name} {tuple(om.get_parameter(name).shape)}")
    for message in result.messages:
        print(f"  note: {message}")
    after = _call(om, inputs)
    cosine = F.cosine_similarity(before.flatten(1).double(), after.flatten(1).double(), dim=-1)
    print(f"  output {tuple(after.shape)}: finite {bool(torch.isfinite(after).all())}, "
          f"max |diff| {float((after - before).abs().max()):.4g}, cosine to original "
          f"{', '.join(f'{c:.3f}' for c in cosine.tolist())} (per row; untrained mixers)")
    return om


if __name__ == "__main__":
    main()
