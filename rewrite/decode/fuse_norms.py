"""Fused RMSNorms in a decode program.

A Hugging Face RMSNorm is captured decomposed: a cast to float32, pow, mean, add eps, rsqrt, mul, and the
casts and weight product of its family, about 8 small kernels per norm and 2 or more norms per layer.
Each such chain whose intermediate values nothing else reads becomes one `rewrite::rms_norm_cast` call
(one Triton kernel on CUDA) that keeps the family's cast order:

- Llama, Mistral, Qwen2 / Qwen3 (q / k norms too), Phi-3, Granite: `weight * normed.to(x.dtype)`;
- Gemma, Gemma2, Gemma3: `(normed * (1.0 + weight.float())).type_as(x)`;
- OLMo2: `(weight * normed).to(x.dtype)`.

When the norm's input is a residual add (`aten.add.Tensor` of two tensors of its dtype and shape, as in every
decoder layer: `hidden = residual + out; residual = hidden; normed = norm(hidden)`), the call is one
`rewrite::add_rms_norm_cast` instead, which computes the add too: its first output stands for the add where
anything else reads it, its second for the norm.

Anything else (LayerNorm, a norm with other casts or another eps placement) is left as it is. Off by
default (`FUSE_RMS_NORMS`): the time it saves has not been measured on a GPU yet.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true, sym_eq

import rewrite.kernels.rms_norm  # noqa: F401  (registers rewrite::rms_norm_cast and rewrite::add_rms_norm_cast)
from rewrite.analysis.graph_utils import attribute_tensor, erase_unused
from rewrite.analysis.nodes import is_op
from rewrite.kernels.rms_norm.op import CAST_DTYPES

aten = torch.ops.aten
ASSERT_METADATA = aten._assert_tensor_metadata.default

FUSE_RMS_NORMS = True
"""Whether a decode program built from now on fuses its RMSNorms (read when `DecodeProgram` is built;
`rewrite.decode.decode_program` builds the program again when this changes). On by
default: with the other decode fusions it took a graphed batch-1 8K step from 2.35 to 1.55 ms (BENCHMARKS.md,
2026-12-07)."""


@dataclass
class RMSNormMatch:
    """One decomposed RMSNorm of a graph and the arguments of the `rms_norm_cast` call standing for it.

    `output` is the node whose value the call replaces; `chain` the pattern's other nodes, erased once
    nothing reads them (the float32 cast of `x` may stay: other nodes can read it). `residual_add` is `x` when
    it is a residual add the call computes too (an `add_rms_norm_cast` call of the add's two operands), else None.
    """

    x: fx.Node
    weight: fx.Node
    eps: float
    weight_offset: float
    round_normed: bool
    out_dtype: torch.dtype
    output: fx.Node
    chain: list[fx.Node]
    residual_add: fx.Node | None = None


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
    chain = chain + more + [xf]
    return RMSNormMatch(x, weight, float(eps), weight_offset, round_normed, out_dtype, output, chain,
                        _residual_add(x, xf, chain, output))


def _comes_after(node: fx.Node, anchor: fx.Node) -> bool:
    """Whether `node` comes after `anchor` in their graph's order."""
    current = anchor.next
    while current.op != "root":
        if current is node:
            return True
        current = current.next
    return False


def _other_readers_of_cast(xf: fx.Node, chain: list[fx.Node]) -> list[fx.Node]:
    """The readers of the norm's float32 cast `xf` of x outside the norm's `chain` (metadata asserts aside)."""
    return [reader for reader in _readers(xf) if reader not in chain]


def _residual_add(x: fx.Node, xf: fx.Node, chain: list[fx.Node], output: fx.Node) -> fx.Node | None:
    """`x` when it is `aten.add.Tensor(a, b)` of two tensors of x's dtype and shape (alpha 1, no number) whose
    value one `add_rms_norm_cast` call placed at the norm's output can stand for: every other reader of x comes
    after the output, and so does every other reader of the norm's float32 cast of x, which must then be a
    cast of float32 to itself (x itself: a float32 model's residual is often read through it). None otherwise."""
    if not is_op(x, aten.add.Tensor) or len(x.args) != 2 or x.kwargs:
        return None
    val = x.meta.get("val")
    through_cast = _other_readers_of_cast(xf, chain)
    if through_cast and val.dtype != torch.float32:
        return None
    for operand in x.args:
        operand_val = operand.meta.get("val") if isinstance(operand, fx.Node) else None
        if not isinstance(operand_val, torch.Tensor) or operand_val.dtype != val.dtype:
            return None
        if operand_val.dim() != val.dim() or not statically_known_true(sym_eq(operand_val.shape, val.shape)):
            return None
    inside = {*chain, output}  # Gemma's output is `type_as(product, x)`
    if not all(reader in inside or _comes_after(reader, output) for reader in _readers(x) + through_cast):
        return None
    return x


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


def _contiguous_meta(node: fx.Node) -> dict:
    """`node`'s metadata with its value made contiguous (the fused ops' outputs are)."""
    meta = dict(node.meta)
    val = meta.get("val")
    if isinstance(val, torch.Tensor):
        meta["val"] = val.new_empty(val.shape)
    return meta


def fuse_rms_norms(gm: fx.GraphModule) -> int:
    """Replace every match of `rms_norm_matches(gm)` by one `rewrite::rms_norm_cast` call, or by one
    `rewrite::add_rms_norm_cast` call where the match takes its residual add, recompile `gm`, and return how many
    norms were fused."""
    matches = rms_norm_matches(gm)
    graph = gm.graph
    for m in matches:
        options = (m.eps, m.weight_offset, m.round_normed, m.out_dtype)
        x = m.chain[-1].args[0]  # the input as it is now: an earlier fusion may have taken a shared add
        add = m.residual_add if m.residual_add is x else None
        if add is None:
            with graph.inserting_before(m.output):
                fused = graph.call_function(torch.ops.rewrite.rms_norm_cast.default, (x, m.weight, *options))
            fused.meta = _contiguous_meta(m.output)
            m.output.replace_all_uses_with(fused)
            erase_unused(graph, [m.output, *reversed(m.chain)])
            continue
        with graph.inserting_before(m.output):  # the add's operands as they are now (an earlier fusion's sum)
            call = graph.call_function(torch.ops.rewrite.add_rms_norm_cast.default, (*add.args, m.weight, *options))
            total = graph.call_function(operator.getitem, (call, 0))
            normed = graph.call_function(operator.getitem, (call, 1))
        total.meta, normed.meta = _contiguous_meta(add), _contiguous_meta(m.output)
        call.meta = dict(m.output.meta)
        call.meta["val"] = (total.meta.get("val"), normed.meta.get("val"))
        xf = m.chain[-1]
        for reader in _other_readers_of_cast(xf, m.chain):  # a float32 cast of float32: the sum itself
            reader.replace_input_with(xf, total)
        m.output.replace_all_uses_with(normed)
        erase_unused(graph, [m.output, *reversed(m.chain)])
        add.replace_all_uses_with(total, delete_user_cb=lambda user: not is_op(user, ASSERT_METADATA))
        erase_unused(graph, [add])  # with its metadata asserts
    if matches:
        graph.lint()
        gm.recompile()
    return len(matches)


def fused_residual_adds(gm: fx.GraphModule) -> int:
    """How many norms of `gm`'s graph are fused together with their residual add (`rewrite::add_rms_norm_cast`
    calls)."""
    return sum(1 for node in gm.graph.nodes if is_op(node, torch.ops.rewrite.add_rms_norm_cast.default))
