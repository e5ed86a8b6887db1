"""Sequence-parallel forms of the kernels through which linear mixers mix tokens.

Every mixer kind mixes tokens only through the project's kernel ops (linear attention, delta rule,
short conv); everything else it does is token-wise. `SequenceParallelKernels` is a torch function
mode, entered around one mixer call, that runs those ops over the whole split sequence:

- `rewrite.linear_attention` -> `linear_attention.sp_linear_attention` (LASP-2 or all-scan);
- `rewrite.delta_rule` -> `sp_delta_rule`: each chunk's transition matrix and state come from one
  kernel call started from [I | 0] (the delta rule acts on the state's columns independently), the
  starting state from `state_prefix`, then one kernel call from it;
- `rewrite.short_conv` -> `sp_short_conv`: the W - 1 inputs before each segment (its halo) come
  from the rank holding them.
The `_saving` forms of the first two (chosen when a switch keeps forward buffers for the backward) take
the same split forms and return empty buffers in place of the kept ones.

Any other op of the project's namespace that mixes tokens (sliding-window attention, ...), and
softmax attention itself, raises an error naming it: nothing is computed over the local shard alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from rewrite.distributed.collectives import shift
from rewrite.distributed.groups import GroupError, SequenceGroup
from rewrite.distributed.layout import segments
from rewrite.distributed.linear_attention import sp_linear_attention, sp_packed_linear_attention
from rewrite.distributed.state_prefix import allscan_prefix, lasp2_prefix

TOKENWISE_OPS = ("rms_norm", "rms_norm_backward")
"""Ops of the project's namespace that act on each token alone (allowed as they are)."""


def _no_packing(op: str, initial, cu_seqlens) -> None:
    if initial is not None:
        raise GroupError(f"{op} under sequence parallelism cannot take an initial state (the split supplies it)")
    if cu_seqlens is not None:
        raise GroupError(f"{op} under sequence parallelism does not support packed sequences (cu_seqlens) yet")


def sp_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    *,
    group: SequenceGroup,
    layout: str,
    strategy: str,
    scan_blocks: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's delta-rule outputs [B, T, H, V] over the split sequence, and its last segment's final state."""
    from rewrite.kernels.delta_rule.op import delta_rule_op, state_dtype  # loaded on first use

    batch, length, kv_heads, dim = k.shape
    sdtype = state_dtype(q.dtype)
    segs = segments(length, group.rank, group.size, layout)
    eye = torch.eye(dim, device=k.device, dtype=sdtype).expand(batch, kv_heads, dim, dim)
    start_probe = torch.cat([eye, eye.new_zeros(batch, kv_heads, dim, v.shape[-1])], dim=-1)
    transitions, states = [], []
    for s in segs:
        sl = slice(s.local_start, s.local_start + s.length)
        v_probe = torch.cat([v.new_zeros(batch, s.length, kv_heads, dim), v[:, sl]], dim=-1)
        _, final = delta_rule_op(q[:, sl], k[:, sl], v_probe, beta[:, sl], None if g is None else g[:, sl], scale,
                                 start_probe, None)
        transitions.append(final[..., :dim])
        states.append(final[..., dim:])
    if strategy == "allscan":
        starts = [allscan_prefix(states[0], transitions[0], group, scan_blocks, layout)]
    else:
        starts = lasp2_prefix(torch.stack(states), torch.stack(transitions), [s.chunk for s in segs], group)
    outs, final = [], None
    for s, start in zip(segs, starts):
        sl = slice(s.local_start, s.local_start + s.length)
        o, final = delta_rule_op(q[:, sl], k[:, sl], v[:, sl], beta[:, sl], None if g is None else g[:, sl], scale,
                                 start, None)
        outs.append(o)
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)), final


def sp_short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    silu: bool,
    *,
    group: SequenceGroup,
    layout: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv of this rank's shard [B, T, D] with each segment's halo from the rank before it."""
    from rewrite.kernels.short_conv.op import short_conv_op  # loaded on first use

    halo = weight.shape[1] - 1
    rank, size = group.rank, group.size
    segs = segments(x.shape[1], rank, size, layout)
    if any(s.length < halo for s in segs):
        raise GroupError(f"short conv of width {halo + 1} needs at least {halo} tokens per shard segment, "
                         f"got {segs[0].length}")
    tails = [x[:, s.local_start + s.length - halo: s.local_start + s.length] for s in segs]
    # segment 0 (chunk r) follows chunk r - 1, held by rank r - 1 as its segment 0
    caches = [shift(tails[0], group, rank + 1 if rank + 1 < size else None, rank - 1 if rank > 0 else None)]
    if len(segs) == 2:  # zigzag: chunk 2P-1-r follows chunk 2P-2-r, segment 1 of rank r + 1 (own segment 0 at r = P-1)
        from_next = shift(tails[1], group, rank - 1 if rank > 0 else None, rank + 1 if rank + 1 < size else None)
        # the last rank uses its own segment 0, but must still join the shift's backward: a zero-weight use
        caches.append(tails[0] + 0 * from_next if rank == size - 1 else from_next)
    outs, final = [], None
    for s, cache in zip(segs, caches):
        y, final = short_conv_op(x[:, s.local_start: s.local_start + s.length], weight, bias, silu,
                                 cache.contiguous(), None)
        outs.append(y)
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)), final


class SequenceParallelKernels(TorchFunctionMode):
    """Inside this mode, the project's token-mixing kernel ops run over the whole split sequence."""

    def __init__(self, group: SequenceGroup, *, layout: str, strategy: str, scan_blocks: int, layer: str = "",
                 starts: torch.Tensor | None = None):
        super().__init__()
        self.group, self.layout, self.strategy, self.scan_blocks = group, layout, strategy, scan_blocks
        self.layer = layer
        self.starts = starts  # packed sequences: [1, Ll] True where a sequence starts (states restart there)

    def _refuse(self, what: str) -> GroupError:
        where = f"{self.layer}: " if self.layer else ""
        return GroupError(
            f"{where}{what} mixes tokens and has no sequence-parallel form here (supported inside mixers: "
            "linear attention, delta rule, short conv)"
        )

    def _refuse_packed(self, what: str) -> GroupError:
        where = f"{self.layer}: " if self.layer else ""
        return GroupError(f"{where}{what} has no sequence-parallel form for packed sequences yet (supported: causal "
                          "linear attention: linear, retention, gla)")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        namespace = getattr(func, "namespace", None)
        if namespace == "rewrite":
            op = name.split(".")[0]
            if op == "linear_attention":
                return self._linear_attention(*args, **kwargs)
            if op == "delta_rule":
                return self._delta_rule(*args, **kwargs)
            # the forms that keep the forward's buffers for the backward (linear attention's SAVE_STATES, the delta
            # rule's SAVE_FOR_BACKWARD): the split sequence's kernels keep nothing; empty buffers stand for them
            if op == "linear_attention_saving":
                o, final = self._saving_linear_attention(*args, **kwargs)
                return o, final, o.new_empty(0, dtype=torch.float32)
            if op == "delta_rule_saving":
                o, final = self._delta_rule(*args, **kwargs)
                return (o, final, *(o.new_empty(0, dtype=torch.float32) for _ in range(5)))
            if op == "short_conv":
                return self._short_conv(*args, **kwargs)
            if op not in TOKENWISE_OPS:
                raise self._refuse(f"op rewrite.{op}")
        if func is F.scaled_dot_product_attention:
            raise self._refuse("softmax attention (e.g. an attention-transfer teacher)")
        return func(*args, **kwargs)

    def _linear_attention(self, q, k, v, g, decay, scale, initial_state, cu_seqlens, causal, key_gate=0.0):
        _no_packing("linear attention", initial_state, cu_seqlens)
        if key_gate:
            # g holds the raw keys of the vector key gate (computed in the kernels): the split forms take log-decays,
            # so the gate is computed here with PyTorch ops (autograd reaches the raw keys through it)
            from rewrite.kernels.linear_attention.feature_maps import log_decay_from_keys

            g = log_decay_from_keys(g, decay, key_gate)
        if self.starts is not None:
            if not causal:
                raise self._refuse_packed("non-causal linear attention")
            o = sp_packed_linear_attention(q, k, v, g, decay=decay, scale=scale, starts=self.starts, group=self.group,
                                           layout=self.layout, strategy=self.strategy, scan_blocks=self.scan_blocks)
            return o, o.new_zeros(0)
        o = sp_linear_attention(q, k, v, g, decay=decay, scale=scale, causal=causal, group=self.group,
                                layout=self.layout, strategy=self.strategy, scan_blocks=self.scan_blocks)
        # the final state of a split sequence lives on the last rank; mixers under SP do not use it
        return o, o.new_zeros(0)

    def _saving_linear_attention(self, q, k, v, g, decay, scale, initial_state, cu_seqlens, key_gate=0.0):
        return self._linear_attention(q, k, v, g, decay, scale, initial_state, cu_seqlens, True, key_gate)

    def _delta_rule(self, q, k, v, beta, g, scale, initial_state, cu_seqlens):
        _no_packing("delta rule", initial_state, cu_seqlens)
        if self.starts is not None:
            raise self._refuse_packed("the delta rule")
        return sp_delta_rule(q, k, v, beta, g, scale, group=self.group, layout=self.layout,
                             strategy=self.strategy, scan_blocks=self.scan_blocks)

    def _short_conv(self, x, weight, bias, silu, cache, cu_seqlens):
        _no_packing("short conv", cache, cu_seqlens)
        if self.starts is not None:
            raise self._refuse_packed("a short conv")
        return sp_short_conv(x, weight, bias, silu, group=self.group, layout=self.layout)
