"""Fused RMSNorms in a decode program.

A Hugging Face RMSNorm is captured decomposed: a cast to float32, pow, mean, add eps, rsqrt, mul, and the
casts and weight product of its family, about 8 small kernels per norm and 2 or more norms per layer.
Each such chain whose intermediate values nothing else reads becomes one `rewrite::rms_norm_cast` call
(one Triton kernel on CUDA) that keeps the family's cast order:

- Llama, Mistral, Qwen2 / Qwen3 (q / k norms too), Phi-3, Granite: `weight * normed.to(x.dtype)`;
- Gemma, Gemma2, Gemma3: `(normed * (1.0 + weight.float())).type_as(x)`;
- OLMo2: `(weight * normed).to(x.dtype)`.

Anything else (LayerNorm, a norm with other casts or another eps placement) is left as it is. Off by
default (`FUSE_RMS_NORMS`): the time it saves has not been measured on a GPU yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

import rewrite.kernels.rms_norm  # noqa: F401  (registers rewrite::rms_norm_cast)
from rewrite.analysis.graph_utils import attribute_tensor, erase_unused
from rewrite.analysis.nodes import is_op
from rewrite.kernels.rms_norm.op import CAST_DTYPES

aten = torch.ops.aten

FUSE_RMS_NORMS = False
"""Whether a decode program built from now on fuses its RMSNorms (read when `DecodeProgram` is built;
`rewrite.decode.decode_program` builds the program again when this changes). Off until a GPU run times it."""


@dataclass
class RMSNormMatch:
    """One decomposed RMSNorm of a graph and the arguments of the `rms_norm_cast` call standing for it.

    `output` is the node whose value the call replaces; `chain` the pattern's other nodes, erased once
    nothing reads them (the float32 cast of `x` may stay: other nodes can read it).
    """

    x: fx.Node
    weight: fx.Node
    eps: float
    weight_offset: float
    round_normed: bool
    out_dtype: torch.dtype
    output: fx.Node
    chain: list[fx.Node]


def _dtype(node: object) -> torch.dtype | None:
    """The dtype of the tensor a node computes (from its metadata), None when unknown."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None


def _readers(node: fx.Node) -> list[fx.Node]:
    """The users of `node` other than metadata asserts."""
    return [u for u in node.users if not is_op(u, aten._assert_tensor_metadata.default)]


def _only_reader(node: fx.Node) -> fx.Node | None:
    """The one user of `node` (metadata asserts aside), None when there are more or none."""
    readers = _readers(node)
    return readers[0] if len(readers) == 1 else None


def _cast_to(node: object, dtype: torch.dtype | None = None) -> fx.Node | None:
    """The input of `node` when it is a plain `aten.to(input, dtype)` (to `dtype` when given), else None."""
    if not is_op(node, aten.to.dtype) or node.kwargs:
        return None
    if any(node.args[2:]) or (dtype is not None and node.args[1] != dtype):
        return None
    source = node.args[0]
    return source if isinstance(source, fx.Node) else None


def _other(node: fx.Node, one: fx.Node) -> object | None:
    """The other factor of a binary `mul` / `add` node that has `one` as a factor, None otherwise."""
    if len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    return b if a is one else a if b is one else None


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _weight_tensor(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    """The tensor a norm's weight node stands for: a parameter or buffer of `gm`, or (in a routed block's body,
    which takes the block's parameters as inputs) the value an input placeholder carries."""
    tensor = attribute_tensor(gm, node)
    if tensor is None and isinstance(node, fx.Node) and node.op == "placeholder":
        value = node.meta.get("val")
        tensor = value if isinstance(value, torch.Tensor) else None
    return tensor


def _weight(gm: fx.GraphModule, node: object, width: int) -> fx.Node | None:
    """`node` when it is a parameter, buffer or input of `gm` of shape [width] and a dtype the op takes."""
    tensor = _weight_tensor(gm, node)
    if tensor is None or tuple(tensor.shape) != (width,) or tensor.dtype not in CAST_DTYPES:
        return None
    assert isinstance(node, fx.Node)
    return node


def match_rms_norm(gm: fx.GraphModule, rsqrt: fx.Node) -> RMSNormMatch | None:
    """The Hugging Face RMSNorm whose `aten.rsqrt` is `rsqrt`, or None when the chain around it is not
    exactly one of the supported cast orders or an intermediate value has other readers."""
    if not is_op(rsqrt, aten.rsqrt.default):
        return None
    add_eps = rsqrt.args[0]
    if not is_op(add_eps, aten.add.Tensor) or add_eps.kwargs or len(add_eps.args) != 2:
        return None
    mean, eps = add_eps.args
    if not is_op(mean, aten.mean.dim) or not _is_number(eps) or mean.kwargs:
        return None
    if len(mean.args) != 3 or mean.args[2] is not True:
        return None
    square = mean.args[0]
    if not is_op(square, aten.pow.Tensor_Scalar) or square.kwargs or square.args[1] != 2:
        return None
    xf = square.args[0]
    x = _cast_to(xf, torch.float32)
    x_dtype, val = _dtype(x), x.meta.get("val") if x is not None else None
    if x is None or x_dtype not in CAST_DTYPES or not isinstance(val, torch.Tensor) or val.dim() == 0:
        return None
    if list(mean.args[1]) not in ([-1], [val.dim() - 1]):
        return None
    width = val.shape[-1]
    if isinstance(width, torch.SymInt):  # a dim export left symbolic but fixed to a number
        width = width.node.maybe_as_int()
    if not isinstance(width, int):
        return None
    normed = _only_reader(rsqrt)
    if normed is None or not is_op(normed, aten.mul.Tensor) or _other(normed, rsqrt) is not xf:
        return None
    if any(_only_reader(n) is None for n in (add_eps, mean, square)):
        return None
    chain = [square, mean, add_eps, rsqrt, normed]
    tail = _only_reader(normed)
    if tail is None:
        return None

    found = _llama_tail(gm, normed, tail, x_dtype, width) or _olmo2_tail(gm, normed, tail, x_dtype, width) \
        or _gemma_tail(gm, normed, tail, x_dtype, width)
    if found is None:
        return None
    weight, weight_offset, round_normed, output, more = found
    out_dtype = _dtype(output)
    if out_dtype not in CAST_DTYPES:
        return None
    return RMSNormMatch(x, weight, float(eps), weight_offset, round_normed, out_dtype, output,
                        chain + more + [xf])


_Tail = tuple[fx.Node, float, bool, fx.Node, list[fx.Node]]
"""(weight, weight offset, whether normed is rounded first, output node, the tail's inner nodes)."""


def _llama_tail(gm: fx.GraphModule, normed: fx.Node, tail: fx.Node, x_dtype: torch.dtype,
                width: int) -> _Tail | None:
    """`weight * normed.to(x.dtype)`, in the promoted dtype of weight and x."""
    if _cast_to(tail, x_dtype) is not normed:
        return None
    product = _only_reader(tail)
    if product is None or not is_op(product, aten.mul.Tensor):
        return None
    weight = _weight(gm, _other(product, tail), width)
    tensor = _weight_tensor(gm, weight)
    if weight is None or tensor is None or _dtype(product) != torch.promote_types(tensor.dtype, x_dtype):
        return None
    return weight, 0.0, True, product, [tail]


def _olmo2_tail(gm: fx.GraphModule, normed: fx.Node, tail: fx.Node, x_dtype: torch.dtype,
                width: int) -> _Tail | None:
    """`(weight * normed).to(x.dtype)`, the product in float32."""
    if not is_op(tail, aten.mul.Tensor):
        return None
    weight = _weight(gm, _other(tail, normed), width)
    output = _only_reader(tail)
    if weight is None or _dtype(tail) != torch.float32 or output is None or _cast_to(output, x_dtype) is not tail:
        return None
    return weight, 0.0, False, output, [tail]


def _gemma_tail(gm: fx.GraphModule, normed: fx.Node, tail: fx.Node, x_dtype: torch.dtype,
                width: int) -> _Tail | None:
    """`(normed * (offset + weight.float())).type_as(x)` (Gemma's offset is 1), the product in float32."""
    if not is_op(tail, aten.mul.Tensor):
        return None
    scale = _other(tail, normed)
    if not is_op(scale, aten.add.Tensor) or len(scale.args) != 2 or scale.kwargs or _only_reader(scale) is not tail:
        return None
    a, b = scale.args
    weight_float, offset = (a, b) if _is_number(b) else (b, a)
    if not _is_number(offset) or not isinstance(weight_float, fx.Node) or _dtype(weight_float) != torch.float32:
        return None
    inner = [scale]
    source = _cast_to(weight_float, torch.float32)
    if source is not None:
        if _only_reader(weight_float) is not scale:
            return None
        inner.append(weight_float)
        weight_float = source
    weight = _weight(gm, weight_float, width)
    output = _only_reader(tail)
    if weight is None or _dtype(tail) != torch.float32 or output is None:
        return None
    if not (is_op(output, aten.type_as.default) and output.args[0] is tail or _cast_to(output, x_dtype) is tail):
        return None
    if _dtype(output) != x_dtype:
        return None
    return weight, float(offset), False, output, [tail, *inner]


def rms_norm_matches(gm: fx.GraphModule) -> list[RMSNormMatch]:
    """Every Hugging Face RMSNorm of `gm`'s graph that `fuse_rms_norms` would fuse, in graph order."""
    found = (match_rms_norm(gm, node) for node in gm.graph.nodes if is_op(node, aten.rsqrt.default))
    return [m for m in found if m is not None]


def fuse_rms_norms(gm: fx.GraphModule) -> int:
    """Replace every match of `rms_norm_matches(gm)` by one `rewrite::rms_norm_cast` call, recompile `gm`,
    and return how many norms were fused."""
    matches = rms_norm_matches(gm)
    graph = gm.graph
    for m in matches:
        with graph.inserting_before(m.output):
            fused = graph.call_function(torch.ops.rewrite.rms_norm_cast.default,
                                        (m.x, m.weight, m.eps, m.weight_offset, m.round_normed, m.out_dtype))
        fused.meta = dict(m.output.meta)
        val = m.output.meta.get("val")
        if isinstance(val, torch.Tensor):  # the op's output is contiguous
            fused.meta["val"] = val.new_empty(val.shape)
        m.output.replace_all_uses_with(fused)
        erase_unused(graph, [m.output, *reversed(m.chain)])
    if matches:
        graph.lint()
        gm.recompile()
    return len(matches)
