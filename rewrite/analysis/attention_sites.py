"""Find attention sites: fused SDPA / canonical nodes and unfused matmul→scale→mask→softmax→matmul chains."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

from rewrite.analysis.nodes import is_op, module_path, tensor_meta
from rewrite.analysis.projections import Projection, find_projection, strip_kv_repeat
from rewrite.ir_ops import SDPA, attention

aten = torch.ops.aten

SOFTMAX_OPS = (aten.softmax.int, aten._softmax.default, aten._safe_softmax.default)
MATMUL_OPS = (aten.matmul.default, aten.bmm.default)
CAST_OPS = (aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.type_as.default)
_DROPOUT = (aten.dropout.default, aten.native_dropout.default)
_ASSERTS = (aten._assert_tensor_metadata.default,)


@dataclass
class AttentionSite:
    """One place where tokens attend to tokens, with everything a pass needs to replace it."""

    node: fx.Node
    form: str  # "sdpa" | "canonical" | "unfused"
    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask: fx.Node | None
    is_causal: bool
    scale: float | None
    dropout_p: float
    enable_gqa: bool
    module_path: str
    q_heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    kv_repeat_source: tuple[fx.Node, fx.Node] | None = None
    chain: list[fx.Node] = field(default_factory=list)
    q_projection: Projection | None = None
    k_projection: Projection | None = None
    v_projection: Projection | None = None
    problem: str | None = None  # why this site cannot be canonicalized, if it cannot
    mask_is_causal: bool | None = None  # the mask hides every future key (probed on example inputs)
    mask_exactly_causal: bool = False  # the mask is the plain causal mask (no window, no padding) on the probe
    mask_shape_only: bool = False  # the mask depends on input shapes only, never on input values
    mask_negated: bool = False  # the mask marks positions to hide (masked_fill), not to keep
    mask_bias: str | None = None  # what additive bias the mask carries besides padding / causality (probed), if any
    mask_chunk: int | None = None  # chunked local attention: each query sees only its own chunk of N tokens (probed)
    mask_unseen_chunk: int | None = None  # the mask graph cuts positions into chunks of N, which the example never crosses
    key_concat: fx.Node | None = None  # a cat joining keys from elsewhere along the tokens (a KV cache), if any

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def causal(self) -> bool:
        """Whether queries see only earlier keys (by flag, or by a mask probed to be causal)."""
        return self.is_causal or bool(self.mask_is_causal)

    @property
    def gqa_groups(self) -> int | None:
        if self.q_heads and self.kv_heads:
            return self.q_heads // self.kv_heads
        return None

    def summary(self) -> str:
        heads = f"{self.q_heads}q/{self.kv_heads}kv heads" if self.q_heads else "heads ?"
        if self.is_causal:
            mask = "causal"
        elif self.mask is None:
            mask = "no mask"
        else:
            mask = {True: "causal mask", False: "non-causal mask", None: "mask"}[self.mask_is_causal]
        return f"{self.form} attention at {self.module_path or '<root>'} ({heads}, dim {self.head_dim}, {mask})"


def _scalar(x) -> float | None:
    if isinstance(x, int | float) and not isinstance(x, bool):
        return float(x)
    return None


def _fill_shape_facts(site: AttentionSite) -> None:
    if isinstance(site.mask, fx.Node):
        site.mask_is_causal = site.mask.meta.get("rewrite_mask_causal")
        site.mask_exactly_causal = bool(site.mask.meta.get("rewrite_mask_exactly_causal", False))
        site.mask_shape_only = bool(site.mask.meta.get("rewrite_mask_shape_only", False))
        site.mask_bias = site.mask.meta.get("rewrite_mask_bias")
        site.mask_chunk = site.mask.meta.get("rewrite_mask_chunk")
        site.mask_unseen_chunk = site.mask.meta.get("rewrite_mask_unseen_chunk")
    q, k = tensor_meta(site.q), tensor_meta(site.k)
    if q is not None and q.dim() >= 3:
        site.head_dim = _int_or_none(q.shape[-1])
        site.q_heads = _int_or_none(q.shape[-3]) if q.dim() >= 4 else None
    if k is not None and k.dim() >= 4:
        site.kv_heads = _int_or_none(k.shape[-3])
    if site.kv_repeat_source is not None:
        src = tensor_meta(site.kv_repeat_source[0])
        if src is not None and src.dim() >= 4:
            site.kv_heads = _int_or_none(src.shape[-3])
    site.q_projection = find_projection(site.q)
    k_src = site.kv_repeat_source[0] if site.kv_repeat_source else site.k
    v_src = site.kv_repeat_source[1] if site.kv_repeat_source else site.v
    site.k_projection = find_projection(k_src)
    site.v_projection = find_projection(v_src)
    site.key_concat = _key_concat(k_src)


_KEY_PASS_THROUGH = (aten.slice.Tensor, aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                     aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default, *CAST_OPS)


def _key_concat(keys: fx.Node) -> fx.Node | None:
    """The `cat` along the token dim (-2 of [.., seq, dim]) that the keys are read from, through views, slices and
    casts: keys of earlier calls joined to this call's, as a Hugging Face KV cache does (`past_key_values`, or
    `use_cache=True` under torch.compile, where an empty cache is joined to the first call's keys)."""
    cur = keys
    while is_op(cur, *_KEY_PASS_THROUGH):
        cur = cur.args[0]
    if not is_op(cur, aten.cat.default):
        return None
    out = tensor_meta(cur)
    dim = cur.args[1] if len(cur.args) > 1 else cur.kwargs.get("dim", 0)
    if out is None or out.dim() < 2 or len(cur.args[0]) < 2:
        return None
    return cur if dim % out.dim() == out.dim() - 2 else None


def _int_or_none(x) -> int | None:
    try:
        return int(x)
    except (TypeError, ValueError):
        return None


def _fused_site(node: fx.Node, form: str) -> AttentionSite:
    _, kw = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    q, k, v = kw["query"] if "query" in kw else kw["q"], kw.get("key", kw.get("k")), kw.get("value", kw.get("v"))
    site = AttentionSite(
        node=node,
        form=form,
        q=q,
        k=k,
        v=v,
        mask=kw.get("attn_mask"),
        is_causal=bool(kw.get("is_causal", False)),
        scale=kw.get("scale"),
        dropout_p=float(kw.get("dropout_p", 0.0)),
        enable_gqa=bool(kw.get("enable_gqa", False)),
        module_path=module_path(node),
        chain=[node],
    )
    k_src, k_groups = strip_kv_repeat(k)
    v_src, v_groups = strip_kv_repeat(v)
    if k_groups > 1 and k_groups == v_groups:
        site.kv_repeat_source = (k_src, v_src)
    _fill_shape_facts(site)
    return site


def _real_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not is_op(u, *_ASSERTS)]


def _unfused_site(softmax: fx.Node) -> AttentionSite | None:
    """Match backwards and forwards from a softmax over the last dim; None if it is not attention."""
    x = softmax.args[0]
    dim = softmax.args[1] if len(softmax.args) > 1 else softmax.kwargs.get("dim")
    val = tensor_meta(x)
    if val is None or dim not in (-1, val.dim() - 1):
        return None
    chain = [softmax]
    mask = None
    scale: float | None = None
    scores = x
    while is_op(scores, *CAST_OPS):  # softmax(scores.float()): the cast is part of the chain
        chain.append(scores)
        scores = scores.args[0]
    # mask: scores + mask (either operand), or baddbmm(mask, q, kT)
    if is_op(scores, aten.add.Tensor):
        a, b = scores.args[0], scores.args[1]
        for s_cand, m_cand in ((a, b), (b, a)):
            if _leads_to_matmul(s_cand):
                chain.append(scores)
                scores, mask = s_cand, m_cand
                break
        else:
            return None
    mask_negated = False
    if mask is None and is_op(scores, aten.masked_fill.Scalar) and hides_score(scores.args[2]):
        if not _leads_to_matmul(scores.args[0]):
            return None
        chain.append(scores)
        scores, mask, mask_negated = scores.args[0], scores.args[1], True
    if is_op(scores, aten.mul.Tensor, aten.div.Tensor):
        a, b = scores.args[0], scores.args[1]
        const = _scalar(b)
        if const is None and is_op(scores, aten.mul.Tensor):
            a, const = b, _scalar(a)
        if const is None:
            return None
        scale = const if is_op(scores, aten.mul.Tensor) else 1.0 / const
        chain.append(scores)
        scores = a
    if is_op(scores, aten.baddbmm.default):
        if mask is not None or len(scores.args) < 3:
            return None
        if scores.kwargs.get("beta", 1) != 1 or scores.kwargs.get("alpha", 1) != 1:
            return None
        mask, q, kt = scores.args[0], scores.args[1], scores.args[2]
    elif is_op(scores, *MATMUL_OPS):
        q, kt = scores.args[0], scores.args[1]
    elif (operands := _einsum_operands(scores, "scores")) is not None:
        q, kt = operands
    else:
        return None
    chain.append(scores)
    k = kt if is_op(scores, aten.einsum.default) else _untranspose(kt)
    if k is None:
        return None
    if scale is None and is_op(q, aten.mul.Tensor) and _scalar(q.args[1]) is not None:
        scale = _scalar(q.args[1])
        chain.append(q)
        q = q.args[0]
    # forwards: softmax -> [cast] -> [dropout] -> matmul(p, v)
    probs = softmax
    dropout_p = 0.0
    problem = None
    cur = softmax
    while True:
        users = _real_users(cur)
        if len(users) != 1:
            problem = "attention probabilities are used outside attention (returned as weights?)"
            break
        nxt = users[0]
        if is_op(nxt, *CAST_OPS):
            chain.append(nxt)
            cur = nxt
            continue
        if is_op(nxt, *_DROPOUT):
            p = _scalar(nxt.args[1]) or 0.0
            train = nxt.args[2] if len(nxt.args) > 2 else nxt.kwargs.get("train", True)
            dropout_p = p if train else 0.0
            chain.append(nxt)
            cur = nxt
            if is_op(nxt, aten.native_dropout.default):
                return None
            continue
        if is_op(nxt, *MATMUL_OPS) and nxt.args[0] is cur:
            chain.append(nxt)
            site_node = nxt
            v = nxt.args[1]
            break
        applied = _einsum_operands(nxt, "apply")
        if applied is not None and applied[0] is cur:
            chain.append(nxt)
            site_node = nxt
            v = applied[1]
            break
        problem = f"softmax output feeds {nxt.name} ({nxt.target}), not a matmul with values"
        break
    if problem is not None:
        site_node, v = probs, None
    site = AttentionSite(
        node=site_node,
        form="unfused",
        q=q,
        k=k,
        v=v if v is not None else k,
        mask=mask,
        is_causal=False,
        scale=scale if scale is not None else 1.0,
        dropout_p=dropout_p,
        enable_gqa=False,
        module_path=module_path(softmax),
        chain=chain,
        problem=problem,
        mask_negated=mask_negated,
    )
    if problem is None:
        k_src, k_groups = strip_kv_repeat(k)
        v_src, v_groups = strip_kv_repeat(site.v)
        if k_groups > 1 and k_groups == v_groups:
            site.kv_repeat_source = (k_src, v_src)
    _fill_shape_facts(site)
    return site


def hides_score(x) -> bool:
    """A fill value that removes a score from the softmax: -inf, or a float32 / bfloat16 lowest value."""
    return isinstance(x, int | float) and x <= -1e30


def _leads_to_matmul(node) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if is_op(node, aten.mul.Tensor, aten.div.Tensor):
        return any(_leads_to_matmul(a) for a in node.args[:2] if isinstance(a, fx.Node))
    return is_op(node, *MATMUL_OPS, aten.baddbmm.default) or _einsum_operands(node, "scores") is not None


def _einsum_operands(node, form: str) -> tuple[fx.Node, fx.Node] | None:
    """The two operands of an einsum that is `x @ y^T` over the last dim ("scores": "...qd,...kd->...qk")
    or `p @ v` ("apply": "...qk,...kd->...qd") with the same leading batch letters; else None."""
    if not is_op(node, aten.einsum.default) or len(node.args) < 2 or len(node.args[1]) != 2:
        return None
    equation = str(node.args[0]).replace(" ", "")
    if "->" not in equation or "." in equation:
        return None
    inputs, out = equation.split("->")
    parts = inputs.split(",")
    if len(parts) != 2:
        return None
    a, b = parts
    if not (len(a) == len(b) == len(out) >= 2 and a[:-2] == b[:-2] == out[:-2]):
        return None
    if form == "scores":
        ok = a[-1] == b[-1] and a[-1] not in out and a[-2] != b[-2] and out[-2:] == a[-2] + b[-2]
    else:
        ok = a[-1] == b[-2] and a[-1] not in out and out[-2:] == a[-2] + b[-1] and a[-2] != b[-1]
    x, y = node.args[1]
    if not ok or not isinstance(x, fx.Node) or not isinstance(y, fx.Node):
        return None
    return x, y


def _untranspose(kt: fx.Node) -> fx.Node | None:
    """Given k^T (last two dims swapped), return k, or None if kt is not such a transpose."""
    if is_op(kt, aten.transpose.int):
        val = tensor_meta(kt)
        if val is None:
            return None
        nd = val.dim()
        dims = {d % nd for d in kt.args[1:3]}
        if dims == {nd - 1, nd - 2}:
            return kt.args[0]
    if is_op(kt, aten.permute.default):
        perm = list(kt.args[1])
        nd = len(perm)
        want = list(range(nd - 2)) + [nd - 1, nd - 2]
        if [p % nd for p in perm] == want:
            return kt.args[0]
    return None


def find_attention_sites(gm: fx.GraphModule) -> list[AttentionSite]:
    """Every attention site of the graph in execution order."""
    sites: list[AttentionSite] = []
    for node in gm.graph.nodes:
        if is_op(node, SDPA):
            sites.append(_fused_site(node, "sdpa"))
        elif is_op(node, attention):
            sites.append(_fused_site(node, "canonical"))
        elif is_op(node, *SOFTMAX_OPS):
            site = _unfused_site(node)
            if site is not None:
                sites.append(site)
    return sites


__all__ = ["AttentionSite", "find_attention_sites"]
