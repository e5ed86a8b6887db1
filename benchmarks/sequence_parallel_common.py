"""What the sequence-parallel benchmarks share: the Llama-shaped models, their plans, the predicted bytes.

Two models: *linearized* (every layer's attention replaced by `gla`) and *hybrid* (a quarter of the
layers keep softmax attention: layers 3, 7, 11, ...). `--tiny` shrinks them for the CPU.
"""

from __future__ import annotations

import argparse
from typing import Any

import sympy
import torch

from rewrite.distributed import cost

BASE = {"hidden": 2048, "intermediate": 5632, "layers": 16, "heads": 32, "kv_heads": 8, "vocab": 32000}
TINY = {"hidden": 64, "intermediate": 128, "layers": 4, "heads": 8, "kv_heads": 4, "vocab": 128}
MODELS = ("linearized", "hybrid")


def add_strategy_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments both benchmarks take: --models, the --softmax / --linear strategies and the --layout."""
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--softmax", default="ulysses", choices=["ulysses", "ring", "ulysses_ring"])
    parser.add_argument("--ulysses-size", type=int, default=None,
                        help="ulysses_ring: ranks of each inner Ulysses group (default: the pass's choice)")
    parser.add_argument("--linear", default="lasp2", choices=["lasp2", "allscan"])
    parser.add_argument("--layout", default="contiguous", choices=["contiguous", "zigzag"])


def build_model(shape: dict[str, int], device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A randomly initialised Hugging Face Llama body of the given shape (seeded: every rank builds the same)."""
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=shape["hidden"], intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
        max_position_embeddings=1 << 20, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return transformers.LlamaModel(cfg).to(device=device, dtype=dtype).eval()


def softmax_layers(model_name: str, layers: int) -> list[int]:
    """Layers that keep softmax attention: none (linearized) or every fourth (hybrid)."""
    return [] if model_name == "linearized" else list(range(3, layers, 4))


def sp_options(args: argparse.Namespace) -> dict[str, Any]:
    """The sequence_parallel options the strategy arguments ask for (group and sizes added by the caller)."""
    sp: dict[str, Any] = {"strategy": {"softmax": args.softmax, "linear": args.linear}, "layout": args.layout}
    if args.ulysses_size is not None:
        sp["ulysses_size"] = args.ulysses_size
    return sp


def plans(model_name: str, layers: int, sp: dict[str, Any] | None) -> dict[str, Any]:
    """The plan of a model: the mixer pass on its linear layers, then (if given) sequence_parallel."""
    keep = set(softmax_layers(model_name, layers))
    passes: list[Any] = [{"mixer": {"kind": "gla", "layers": [i for i in range(layers) if i not in keep]}}]
    if sp is not None:
        passes.append({"sequence_parallel": sp})
    return {"passes": passes}


def predicted_bytes(model_name: str, shape: dict[str, int], size: int, seq: int, batch: int,
                    element_size: int, softmax_strategy: str, linear_strategy: str, rank: int | None = None,
                    masked: bool = False, ulysses_size: int | None = None) -> int:
    """Bytes the cost model predicts one rank receives in one forward (rank None: the busiest rank).

    gla with the default elu1 feature map normalises, so each state carries one extra value column.
    `masked`: the softmax layers get a mask from the model (their key validity is gathered).
    `ulysses_size`: the inner size of ulysses_ring (default: the pass's, `default_inner_size`).
    """
    from rewrite.distributed.softmax_attention import default_inner_size

    head_dim = shape["hidden"] // shape["heads"]
    n_softmax = len(softmax_layers(model_name, shape["layers"]))
    n_linear = shape["layers"] - n_softmax
    attn = cost.AttentionShape(shape["heads"], shape["kv_heads"], head_dim, head_dim, element_size, True)
    if softmax_strategy == "ulysses_ring":
        inner = ulysses_size or default_inner_size(shape["heads"], shape["kv_heads"], size)
        softmax = cost.ulysses_ring_bytes(attn, inner, size, masked)
    else:
        softmax = {"ulysses": cost.ulysses_bytes, "ring": cost.ring_bytes}[softmax_strategy](attn, size, masked)
    if linear_strategy == "lasp2":
        linear = cost.lasp2_bytes(shape["kv_heads"], head_dim, head_dim + 1, size)
    else:
        linear = cost.allscan_bytes(shape["kv_heads"], head_dim, head_dim + 1) if rank != 0 else 0
    total = sympy.sympify(n_softmax * softmax + n_linear * linear)
    return int(total.subs({cost.SEQ: seq, cost.BATCH: batch, cost.P: size}))


def has_masked_softmax(module: Any) -> bool:
    """Whether any split softmax site of an optimized module receives a mask."""
    from rewrite.distributed.graph_functions import sp_attention

    return any(n.target is sp_attention and len(n.args) > 3 and n.args[3] is not None
               for n in module.program.graph.nodes)
