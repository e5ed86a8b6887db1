"""Horizontal fusion of sibling projections in a decode program.

Linear maps by model weights that read the same tensor (q / k / v of an attention, gate / up of a
gated MLP) become one map by their weights concatenated, whose output is split among the original
users: at batch 1 each projection is a matrix-vector product, and one larger product per group
launches fewer kernels. The concatenated weights are buffers of the program, built once when it is
built, and follow the model's weights (`FusedWeights.sync`). Off by default
(`FUSE_SIBLING_PROJECTIONS`): the time it saves has not been measured on a GPU yet.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from rewrite.analysis.graph_utils import attribute_tensor, erase_unused
from rewrite.analysis.nodes import is_op
from rewrite.errors import RewriteError

aten = torch.ops.aten

FUSE_SIBLING_PROJECTIONS = False
"""Whether a decode program built from now on fuses sibling projections (read when `DecodeProgram` is built;
`rewrite.decode.decode_program` builds the program again when this changes). Off until a GPU run times it."""

BUFFER_PREFIX = "fused_projection"
"""Name prefix of the concatenated weight (`{prefix}_{i}_weight`) and bias (`{prefix}_{i}_bias`) buffers."""


@dataclass
class Projection:
    """One linear map by model state in a graph.

    `form` is "linear" (`aten.linear(x, weight [out, in], bias)`) or "mm" (`aten.mm(x, weight [in, out])`,
    `aten.addmm(bias, x, weight)`); `weight` and `bias` are the tensors the graph reads.
    """

    node: fx.Node
    form: str
    input: fx.Node
    weight: torch.Tensor
    bias: torch.Tensor | None

    @property
    def out_features(self) -> int:
        """Width of the projection's output."""
        return int(self.weight.shape[0] if self.form == "linear" else self.weight.shape[1])

    @property
    def in_features(self) -> int:
        """Width of the projection's input."""
        return int(self.weight.shape[1] if self.form == "linear" else self.weight.shape[0])


def projection(gm: fx.GraphModule, node: fx.Node) -> Projection | None:
    """`node` as a linear map by model state (weight, and bias if any, read by `get_attr`), else None."""
    if is_op(node, aten.linear.default):
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        form = "linear"
    elif is_op(node, aten.addmm.default):
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1 or len(node.args) > 3:
            return None
        b, x, w = node.args[:3]
        form = "mm"
    elif is_op(node, aten.mm.default):
        x, w, b = node.args[0], node.args[1], None
        form = "mm"
    else:
        return None
    weight = attribute_tensor(gm, w)
    bias = attribute_tensor(gm, b) if b is not None else None
    if weight is None or weight.dim() != 2 or not isinstance(x, fx.Node) or (b is not None and bias is None):
        return None
    out = weight.shape[0] if form == "linear" else weight.shape[1]
    if bias is not None and tuple(bias.shape) != (out,):
        return None  # a bias that broadcasts some other way
    if bias is not None and (bias.dtype != weight.dtype or bias.device != weight.device):
        return None
    return Projection(node, form, x, weight, bias)


def _mutates(node: fx.Node) -> bool:
    """Whether `node` writes one of its arguments in place."""
    target = node.target
    return node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable


def sibling_groups(gm: fx.GraphModule) -> list[list[Projection]]:
    """Groups of two or more projections of `gm`'s graph that read the same tensor, in the same form,
    with weights of the same in-features, dtype and device (in graph order); a tensor some op writes
    in place is left out."""
    by_key: dict[tuple, list[Projection]] = {}
    for node in gm.graph.nodes:
        found = projection(gm, node)
        if found is None:
            continue
        w = found.weight
        key = (found.input, found.form, found.in_features, w.dtype, w.device)
        by_key.setdefault(key, []).append(found)
    groups = []
    for members in by_key.values():
        if len(members) > 1 and not any(_mutates(user) for user in members[0].input.users):
            groups.append(members)
    return groups


@dataclass
class FusedWeights:
    """The concatenated weights (and biases) of a fused program and the model tensors they copy.

    `sync()` copies again, into the same buffers (a CUDA graph keeps reading them), every part whose
    model tensor changed since it was copied: written in place through the tensor (its version counter
    moved, as `load_state_dict`, an optimizer step or `with torch.no_grad(): w.copy_(...)` do) or given
    other storage (`w.data = ...`). Writes through `w.data` bypass the version counter: `sync(everything=True)`
    copies every part regardless (the decode program does so at each state's first call). A model tensor
    whose shape, dtype or device changed needs a new program: `sync` refuses it.
    """

    sources: list[torch.Tensor] = field(default_factory=list)
    targets: list[torch.Tensor] = field(default_factory=list)
    stamps: list[tuple[int, int]] = field(default_factory=list)
    groups: list[list[str]] = field(default_factory=list)

    def add(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """Track `target` (a part of a buffer) as the copy of model tensor `source`."""
        self.sources.append(source)
        self.targets.append(target)
        self.stamps.append(_stamp(source))

    def sync(self, everything: bool = False) -> int:
        """Copy the parts whose model tensor changed (all of them with `everything`); returns how many
        were copied. Does nothing while a CUDA graph is being captured."""
        if not self.sources or (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()):
            return 0
        try:  # the common case first: one pass, no change
            now = [(t.data_ptr(), t._version) for t in self.sources]
        except RuntimeError:  # an inference tensor keeps no version counter
            now = [_stamp(t) for t in self.sources]
        if now == self.stamps and not everything:
            return 0
        copied = 0
        for i, (source, target) in enumerate(zip(self.sources, self.targets, strict=True)):
            if not everything and now[i] == self.stamps[i]:
                continue
            if source.shape != target.shape or source.dtype != target.dtype or source.device != target.device:
                raise RewriteError(
                    f"a weight of the fused projections is now {tuple(source.shape)} {source.dtype} on "
                    f"{source.device}, it was {tuple(target.shape)} {target.dtype} on {target.device}: the "
                    "decode program must be built again (rewrite.decode.decode_program builds it again after "
                    "a move or cast of the module)")
            with torch.no_grad():
                target.copy_(source)
            self.stamps[i] = now[i]
            copied += 1
        return copied


def _stamp(t: torch.Tensor) -> tuple[int, int]:
    """(storage address, version counter) of `t`; an inference tensor keeps no version counter (-1)."""
    return t.data_ptr(), (-1 if t.is_inference() else t._version)


def fuse_sibling_projections(gm: fx.GraphModule) -> FusedWeights:
    """Replace every group of `sibling_groups(gm)` by one projection by the concatenated weight (a bias
    of zeros stands for members without one when some have one) whose output is split along its last
    dim among the members' users; registers the concatenated tensors as buffers of `gm`, recompiles
    it, and returns them with the model tensors they copy."""
    fused = FusedWeights()
    graph = gm.graph
    now: dict[fx.Node, fx.Node] = {}  # a replaced projection -> the part of a fused one standing for it
    for index, members in enumerate(sibling_groups(gm)):
        first = members[0]
        x = now.get(first.input, first.input)
        form, dim = first.form, 0 if first.form == "linear" else 1
        with torch.no_grad(), torch.inference_mode(False):
            weight = torch.cat([m.weight for m in members], dim=dim)
            has_bias = any(m.bias is not None for m in members)
            bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features)
                              for m in members]) if has_bias else None
        names = {"weight": f"{BUFFER_PREFIX}_{index}_weight", "bias": f"{BUFFER_PREFIX}_{index}_bias"}
        gm.register_buffer(names["weight"], weight, persistent=False)
        if bias is not None:
            gm.register_buffer(names["bias"], bias, persistent=False)
        sizes, start = [m.out_features for m in members], 0
        for m, size in zip(members, sizes, strict=True):
            fused.add(m.weight, weight.narrow(dim, start, size))
            if m.bias is not None:
                assert bias is not None
                fused.add(m.bias, bias.narrow(0, start, size))
            start += size
        fused.groups.append([m.node.name for m in members])
        with graph.inserting_before(first.node):
            w = graph.get_attr(names["weight"])
            b = graph.get_attr(names["bias"]) if bias is not None else None
            if form == "linear":
                node = graph.call_function(aten.linear.default, (x, w) if b is None else (x, w, b))
            elif b is None:
                node = graph.call_function(aten.mm.default, (x, w))
            else:
                node = graph.call_function(aten.addmm.default, (b, x, w))
            node.meta["nn_module_stack"] = dict(first.node.meta.get("nn_module_stack") or {})
            parts = graph.call_function(aten.split_with_sizes.default, (node, sizes, -1))
            pieces = [graph.call_function(operator.getitem, (parts, i)) for i in range(len(members))]
        replaced: list[fx.Node] = []
        for m, piece in zip(members, pieces, strict=True):
            piece.meta = dict(m.node.meta)
            m.node.replace_all_uses_with(piece)
            now[m.node] = piece
            replaced.append(m.node)
            for user in piece.users:  # a part is strided: a view of it that cannot be one copies
                if is_op(user, aten.view.default):
                    user.target = aten.reshape.default
        erase_unused(graph, replaced + [n for n in {a for r in replaced for a in r.all_input_nodes}
                                        if n.op == "get_attr"])
    if fused.groups:
        graph.lint()
        gm.recompile()
    return fused


def linear_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The `linear` / `addmm` / `mm` nodes of `gm`'s graph whose weight is model state."""
    return [n for n in gm.graph.nodes if projection(gm, n) is not None]
