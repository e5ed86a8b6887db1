"""The core every linear mixer shares: layout change, feature map, padding, normalisation, kernel call.

Mixers take and return SDPA's layout (q [B, H, L, D], k / v [B, Hkv, L, D], o [B, H, L, Dv]) so they
drop in where attention was; the kernel `rewrite.kernels.linear_attention` wants [B, L, H, D].

Normalisation (for positive feature maps): o_t = (phi(q_t) S_t) / (phi(q_t) z_t + eps), where z_t is
the state's running (decayed) sum of phi(k_s). It costs no second kernel call: a column of ones is
appended to v, so the kernel's last output column is the denominator.
"""

from __future__ import annotations

import torch

from rewrite.mixers.masks import check_mask_form, key_validity

FEATURE_MAPS = {"identity": "identity", "elu1": "elu", "relu": "relu", "softmax": "softmax", "hedgehog": "identity"}
"""Feature-map names of the pass -> names of the kernel (`elu1` is elu(x) + 1; `hedgehog` is applied
here, before the kernel, see `hedgehog`)."""

POSITIVE_FEATURE_MAPS = ("elu1", "relu", "softmax", "hedgehog")
LEARNED_FEATURE_MAPS = ("hedgehog",)
"""Feature maps with parameters of their own: one [heads, D, D] matrix for q and one for k per site."""
EPS = 1e-6


def hedgehog_init(heads: int, head_dim: int) -> torch.Tensor:
    """[heads, D, D] identity matrices: the starting point of a learned Hedgehog feature map."""
    return torch.eye(head_dim).expand(heads, head_dim, head_dim).clone()


def hedgehog(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """phi(x) = [softmax(x W_h), softmax(-x W_h)] per head h: x [B, H, L, D], W [H, D, D] -> [B, H, L, 2D].

    Positive and spiky like softmax attention's exp(q . k) (Hedgehog, as LoLCATs uses it).
    """
    z = torch.einsum("bhld,hde->bhle", x, weight.to(x.dtype))
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1).to(x.dtype)


def featurize(x: torch.Tensor, feature_map: str, weight: torch.Tensor | None = None) -> torch.Tensor:
    """phi(x) over the head dim of x [B, heads, L, D] (SDPA layout); `weight` for learned maps."""
    if feature_map in LEARNED_FEATURE_MAPS:
        if weight is None:
            raise ValueError(f"feature map {feature_map!r} needs its weight [heads, D, D]")
        return hedgehog(x, weight)
    from rewrite.kernels.linear_attention.feature_maps import apply_feature_map  # loaded on first use

    return apply_feature_map(x, FEATURE_MAPS[feature_map])


def split_feature_weights(
    feature_map: str, params: tuple[torch.Tensor, ...], layer: str
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The (q, k) weights of a learned feature map from a mixer's trailing parameters, else (None, None)."""
    if feature_map in LEARNED_FEATURE_MAPS:
        if len(params) != 2:
            raise ValueError(f"{layer}: feature map {feature_map!r} needs 2 weights (q, k), got {len(params)}")
        return params[0], params[1]
    if params:
        raise ValueError(f"{layer}: feature map {feature_map!r} takes no weights, got {len(params)}")
    return None, None


def repeat_gate(g: torch.Tensor, width: int) -> torch.Tensor:
    """A per-key-dim gate [..., K] widened to `width` feature dims (a Hedgehog map doubles K)."""
    if g.shape[-1] == width:
        return g
    return torch.cat([g] * (width // g.shape[-1]), dim=-1)


def default_scale(q: torch.Tensor, scale: float | None) -> float:
    """The site's softmax scale, or 1/sqrt(head dim) as SDPA uses when the site has none."""
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def repeat_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v [B, Hkv, L, D] repeated to the query heads of q [B, H, L, D] (kv head h // (H / Hkv) per q head)."""
    groups = q.shape[1] // k.shape[1]
    return k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)


def ones_column(x: torch.Tensor) -> torch.Tensor:
    """x [..., V] with a column of ones appended: [..., V + 1] (its output column is the normaliser)."""
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)


def _kernel_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    feature_map: str,
    normalize: bool,
    feature_weights: tuple[torch.Tensor | None, torch.Tensor | None],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, str]:
    """(q, k, v, g, kernel feature map) for the linear-attention kernel from SDPA-layout q, k, v.

    A learned feature map is applied here (the kernel then maps with `identity`, and a per-dim gate
    is widened to the new key width); q, k, v move to [B, L, heads, D]; normalising appends a
    column of ones to v.
    """
    kernel_map = FEATURE_MAPS[feature_map]
    if feature_map in LEARNED_FEATURE_MAPS:
        q, k = featurize(q, feature_map, feature_weights[0]), featurize(k, feature_map, feature_weights[1])
        kernel_map = "identity"
        if g is not None and g.dim() == 4:
            g = repeat_gate(g, k.shape[-1])
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if normalize:
        vt = ones_column(vt)
    return qt, kt, vt, g, kernel_map


def _normalized(o: torch.Tensor, normalize: bool) -> torch.Tensor:
    """The kernel's output o [..., Dv (+ 1)] divided by its last column when normalising."""
    return o[..., :-1] / (o[..., -1:] + EPS) if normalize else o


def mix(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    decay: str = "none",
    causal: bool = True,
    scale: float | None = None,
    feature_map: str = "identity",
    normalize: bool = False,
    valid: torch.Tensor | None = None,
    feature_weights: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    cu_seqlens: torch.Tensor | None = None,
    key_gate_normalizer: float | None = None,
) -> torch.Tensor:
    """Linear attention in SDPA layout: q [B, H, L, D], k [B, Hkv, L, D], v [B, Hkv, L, Dv] -> [B, H, L, Dv].

    o_t = scale * phi(q_t) S_t with S_t = diag(exp(g_t)) S_{t-1} + phi(k_t)^T v_t (causal) or the
    sum over every token (not causal); divided by the same with v = 1 when `normalize`.
    valid [B, L] (bool) marks real tokens: padded ones neither write the state nor decay it.
    g is in the kernel's layout ([Hkv], [B, L, Hkv] or [B, L, Hkv, K]). feature_weights holds the
    (q, k) matrices of a learned feature map. cu_seqlens [N + 1] packs N sequences into B == 1: the
    state (and the normaliser's running sum) starts from zero at each sequence. key_gate_normalizer (with g
    None, no padding and no learned feature map): the kernels derive the decay from k themselves
    (`linear_attention(key_gate_normalizer=)`).
    """
    from rewrite.kernels.linear_attention import linear_attention  # loaded on first use, not with the pass

    scale = default_scale(q, scale)
    if key_gate_normalizer is not None and (valid is not None or feature_map in LEARNED_FEATURE_MAPS):
        raise ValueError("mix: a key gate derived in the kernels takes neither padding nor a learned feature map")
    qt, kt, vt, g, kernel_map = _kernel_inputs(q, k, v, g, feature_map, normalize, feature_weights)
    if valid is not None:
        vt = vt * valid[:, :, None, None].to(vt.dtype)
    o, _ = linear_attention(
        qt, kt, vt, g, decay=decay, scale=scale, causal=causal,
        feature_map=kernel_map, cu_seqlens=cu_seqlens, key_gate_normalizer=key_gate_normalizer,
    )
    return _normalized(o, normalize).transpose(1, 2)


def mask_log_decay(g: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Per-token log-decay g [B, L, Hkv(, K)] set to 0 (no decay) at padded tokens."""
    if valid is None:
        return g
    shape = valid.shape + (1,) * (g.dim() - 2)
    return g * valid.view(shape).to(g.dtype)


def check_packed(q: torch.Tensor, mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None, layer: str) -> None:
    """Raise ValueError unless packed input (`cu_seqlens` given) has batch size 1 and comes without a mask.

    Packed sequences hold no padding, and a mask over the packed row would mix sequences up, so a mixer
    takes either a padding mask or cu_seqlens, never both.
    """
    if cu_seqlens is None:
        return
    where = f"{layer}: " if layer else ""
    if mask is not None:
        raise ValueError(f"{where}a mixer takes either an attention mask or cu_seqlens (packed sequences), not both")
    if q.shape[0] != 1:
        raise ValueError(f"{where}cu_seqlens needs packed input with batch size 1, got batch size {q.shape[0]}")


def sequence_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[T] int64: each packed token's position within its sequence (0 at every sequence start)."""
    bounds = cu_seqlens.to(torch.int64)
    starts = torch.repeat_interleave(bounds[:-1], bounds[1:] - bounds[:-1], output_size=total)
    return torch.arange(total, device=cu_seqlens.device) - starts


def sequence_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[T] int64: the index of the sequence each packed token belongs to."""
    bounds = cu_seqlens.to(torch.int64)
    n = torch.arange(bounds.shape[0] - 1, device=cu_seqlens.device)
    return torch.repeat_interleave(n, bounds[1:] - bounds[:-1], output_size=total)


def padding_validity(
    mask: torch.Tensor | None, batch: int, *, causal: bool, negated: bool, check: bool, layer: str
) -> torch.Tensor | None:
    """[B, L] key validity from the site's mask (see `masks`), or None without a mask."""
    if mask is None:
        return None
    valid = key_validity(mask, batch, negated)
    if check:
        check_mask_form(mask, valid, causal, layer, negated)
    return valid


FUSED_STEP_NORMALIZE = False
"""Whether a normalising `mix_step` divides in the step kernel (the state's last column is the running
sum of phi(k), v gets no column of ones, o no division after the kernel: two fewer kernels per layer
and step) instead of appending ones to v and dividing the kernel's output. Same state layout and the
same values (the division happens before rounding to the model's dtype). Off: with `INPLACE_STATE` it took
the compiled, graphed batch-1 step on an H100 from 1.307 to 1.292 ms, inside the run-to-run spread."""


def mix_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor | None,
    *,
    g: torch.Tensor | None = None,
    decay: str = "none",
    scale: float | None = None,
    feature_map: str = "identity",
    normalize: bool = False,
    feature_weights: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`mix` (causal) for a few new tokens from a recurrent state; returns (o [B, H, t, Dv], new state).

    The state is the kernel's [B, Hkv, K', Dv (+ 1 when normalising)] float32 state; None starts
    from zeros. inplace: `state` (given) is updated in place and returned (see
    `linear_attention_step`). Inference only.
    """
    from rewrite.kernels.linear_attention import linear_attention_step  # loaded on first use

    scale = default_scale(q, scale)
    fused = normalize and FUSED_STEP_NORMALIZE
    qt, kt, vt, g, kernel_map = _kernel_inputs(q, k, v, g, feature_map, normalize and not fused, feature_weights)
    o, state = linear_attention_step(qt, kt, vt, g, decay=decay, scale=scale, state=state, feature_map=kernel_map,
                                     normalize=fused, eps=EPS, inplace=inplace)
    return (o if fused else _normalized(o, normalize)).transpose(1, 2), state


def flatten_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, L, D] -> [B, L, heads * D] (the channel layout of the short-conv kernel)."""
    return x.transpose(1, 2).flatten(2)


def unflatten_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, heads * D] -> [B, heads, L, D]."""
    return x.unflatten(2, (heads, -1)).transpose(1, 2)


def zero_padding(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """x [B, heads, L, D] with padded tokens (valid [B, L] False) set to 0."""
    if valid is None:
        return x
    return x * valid[:, None, :, None].to(x.dtype)
