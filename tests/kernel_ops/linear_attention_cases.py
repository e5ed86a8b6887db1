"""Shapes, random inputs and the float64 naive reference (with autograd) for the linear-attention tests."""

from dataclasses import dataclass

import torch

from rewrite.kernels.linear_attention.naive import naive_linear_attention


@dataclass(frozen=True)
class Case:
    decay: str = "none"
    batch: int = 2
    length: int = 70
    heads: int = 4
    kv_heads: int = 2
    dk: int = 32
    dv: int = 48
    cu_seqlens: tuple[int, ...] | None = None
    causal: bool = True
    initial_state: bool = True
    decay_strength: float = 1.0  # log-decays drawn from [-decay_strength, 0]

    @property
    def n(self) -> int:
        return self.batch if self.cu_seqlens is None else len(self.cu_seqlens) - 1

    def __str__(self) -> str:
        parts = [self.decay, f"B{self.batch}T{self.length}H{self.heads}/{self.kv_heads}K{self.dk}V{self.dv}"]
        if self.cu_seqlens is not None:
            parts.append("varlen" + "-".join(map(str, self.cu_seqlens)))
        parts += [] if self.causal else ["noncausal"]
        parts += ["h0"] if self.initial_state else []
        parts += [] if self.decay_strength == 1.0 else [f"g{self.decay_strength:g}"]
        return ",".join(parts)


def make_inputs(case: Case, dtype: torch.dtype, device) -> dict:
    """Fresh random q, k, v, g (log-decays in [-decay_strength, 0]), initial state and cu_seqlens."""
    b, t = case.batch, case.length

    def randn(*shape):
        return torch.randn(*shape, device=device).to(dtype)

    g_shape = {
        "constant": (case.kv_heads,),
        "scalar": (b, t, case.kv_heads),
        "vector": (b, t, case.kv_heads, case.dk),
    }
    wide = torch.promote_types(dtype, torch.float32)  # log-decays and states: float32, or float64
    g = None
    if case.decay != "none":
        g = -case.decay_strength * torch.rand(g_shape[case.decay], device=device, dtype=wide)
    cu = None if case.cu_seqlens is None else torch.tensor(case.cu_seqlens, dtype=torch.int32, device=device)
    return {
        "q": randn(b, t, case.heads, case.dk),
        "k": randn(b, t, case.kv_heads, case.dk),
        "v": randn(b, t, case.kv_heads, case.dv),
        "g": g,
        "initial_state": torch.randn(case.n, case.kv_heads, case.dk, case.dv, device=device, dtype=wide)
        if case.initial_state
        else None,
        "cu_seqlens": cu,
    }


DIFFERENTIABLE = ("q", "k", "v", "g", "initial_state")


def naive_with_grads(case: Case, inputs: dict, scale: float, do: torch.Tensor, dht: torch.Tensor):
    """(o, final state, {name: grad}, {name: error scale}) from the naive reference in float64.

    The error scale of the constant decay's gradient is the sum of |per-token gradients|: that
    gradient is a sum over every token, with cancellation. A data-dependent decay's gradient is also a
    sum with cancellation (over later tokens, and over dims for the scalar kind); its error scale is the
    same gradient computed from |q|, |k|, |v|, |initial state| and |output grads|, where every term of
    the sum is non-negative, so it is the sum of the terms' magnitudes.
    """
    leaves = {
        n: inputs[n].detach().double().requires_grad_() for n in DIFFERENTIABLE if inputs[n] is not None
    }
    g = leaves.get("g")
    if case.decay == "constant":
        per_token = leaves.pop("g").detach().expand(case.batch, case.length, case.kv_heads).clone()
        leaves["g_per_token"] = per_token.requires_grad_()
        g, decay = per_token, "scalar"
    else:
        decay = case.decay
    o, final = naive_linear_attention(
        leaves["q"],
        leaves["k"],
        leaves["v"],
        g,
        decay=decay,
        scale=scale,
        initial_state=leaves.get("initial_state"),
        cu_seqlens=inputs["cu_seqlens"],
        causal=case.causal,
    )
    grads = torch.autograd.grad((o * do.double()).sum() + (final * dht.double()).sum(), list(leaves.values()))
    grads = dict(zip(leaves, grads))
    scales = {}
    if case.decay in ("scalar", "vector"):
        scales["g"] = _term_magnitudes_of_dg(case, inputs, scale, do, dht).abs().max().item()
    if case.decay == "constant":
        per_token = grads.pop("g_per_token")
        grads["g"] = per_token.sum((0, 1))
        scales["g"] = per_token.abs().sum((0, 1)).max().item()
    return o.detach(), final.detach(), grads, scales


def _term_magnitudes_of_dg(case: Case, inputs: dict, scale: float, do: torch.Tensor, dht: torch.Tensor) -> torch.Tensor:
    """d loss / d g computed on absolute values: per element, the sum of |terms| of the true dg."""
    g = inputs["g"].detach().double().requires_grad_()
    h0 = inputs["initial_state"]
    o, final = naive_linear_attention(
        inputs["q"].double().abs(),
        inputs["k"].double().abs(),
        inputs["v"].double().abs(),
        g,
        decay=case.decay,
        scale=abs(scale),
        initial_state=None if h0 is None else h0.double().abs(),
        cu_seqlens=inputs["cu_seqlens"],
        causal=case.causal,
    )
    (dg,) = torch.autograd.grad((o * do.double().abs()).sum() + (final * dht.double().abs()).sum(), [g])
    return dg
