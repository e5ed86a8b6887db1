"""Mixer option `rope`: with `drop` a mixer reads q and k before the rotary embedding (the rotation found
in the graph and undone), with `keep` as the site sees them. Each is checked against a reference built by
hand from the model's own projections, QK-norms and rotary function, with a naive mixer; rotaries of
other forms are refused naming the layer; attention transfer still teaches from the rotated q and k."""

from __future__ import annotations

import copy
import functools
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import mamba2_reference
from torch import nn

import rewrite
import rewrite.passes.mixer  # noqa: F401  (registers the pass)
from examples.linearize import main_tensor
from examples.models import TARGETS, _ids, _tiny_decoder_config
from rewrite.errors import PassError, PlanError
from rewrite.mixers.transfer import record_transfer
from rewrite.plan import Plan

ROPE_FAMILIES = ("llama", "llama_eager", "qwen2", "qwen3", "mistral", "phi3")
MAMBA_PARAMETERS = ("mamba_conv_weight", "mamba_dt_weight", "mamba_dt_bias", "mamba_a_log", "mamba_skip")
ATOL, RTOL = 1e-5, 1e-5


def phi3(batch: int = 2, length: int = 16):
    """Hugging Face Phi-3 (fused qkv projection) with a partial rotary embedding (half of each head), tiny."""
    import transformers

    torch.manual_seed(0)
    cfg = _tiny_decoder_config(transformers.Phi3Config, attn_implementation="sdpa", partial_rotary_factor=0.5,
                               pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return transformers.Phi3ForCausalLM(cfg).eval(), _ids(128, batch, length)


def target(family: str):
    if family == "llama_eager":  # unfused attention: matmul, softmax, matmul
        return TARGETS["llama"](attn="eager")
    return phi3() if family == "phi3" else TARGETS[family]()


def optimized(family: str, options: dict):
    model, inputs = target(family)
    return model, inputs, rewrite.optimize(model, [{"mixer": options}], example_kwargs=inputs)


# -- naive references (float64 loops over the tokens) --------------------------------------------


def linear_reference(q, k, v, scale, valid, params):
    """o_t = scale * sum_{s <= t, s real} (q_t . k_s) v_s, kv heads shared by groups of q heads."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    length = q.shape[2]
    keep = torch.ones(length, length, dtype=torch.bool).tril() & valid[:, None, None, :]
    return (scale * (q @ k.transpose(-1, -2)) * keep) @ v


REFERENCES = {"linear": linear_reference, "mamba2": mamba2_reference}
OPTIONS = {"linear": {"kind": "linear", "feature_map": "identity"}, "mamba2": {"kind": "mamba2"}}


def hf_reference_hooks(model, valid, rope: str, mixer, params_of):
    """Hooks making each attention layer of a Hugging Face decoder compute `mixer` on q, k, v built from its
    own projections (and QK-norms), rotated by the family's own `apply_rotary_pos_emb` only for rope `keep`."""
    store: dict = {}
    handles = []
    for index, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        cfg = attn.config
        heads, kv_heads, dim = cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim
        apply_rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        path = f"model.layers.{index}.self_attn"

        def grab(name):
            def hook(mod, args, out):
                store[name] = out
            return hook

        def pre_attn(mod, args, kwargs):
            store["rope"] = kwargs["position_embeddings"]

        def pre_o(mod, args, attn=attn, heads=heads, kv_heads=kv_heads, dim=dim, apply_rotary=apply_rotary,
                  path=path):
            if "qkv" in store:  # Phi-3: one fused projection
                store["q"], store["k"], store["v"] = store.pop("qkv").split(
                    [heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
            b, t, _ = store["q"].shape
            q = store["q"].view(b, t, heads, dim)
            k = store["k"].view(b, t, kv_heads, dim)
            if hasattr(attn, "q_norm"):  # Qwen3: QK-norm per head, before the rotary embedding
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            v = store["v"].view(b, t, kv_heads, dim).transpose(1, 2)
            if rope == "keep":
                q, k = apply_rotary(q, k, *store["rope"])
            o = mixer(q, k, v, attn.scaling, valid, params_of(path))
            return (o.to(q.dtype).transpose(1, 2).reshape(b, t, heads * dim),)

        projections = [("qkv", attn.qkv_proj)] if hasattr(attn, "qkv_proj") else [
            ("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj)]
        handles += [proj.register_forward_hook(grab(name)) for name, proj in projections]
        handles += [attn.register_forward_pre_hook(pre_attn, with_kwargs=True),
                    attn.o_proj.register_forward_pre_hook(pre_o)]
    return handles


def hf_reference(model, inputs, rope: str, kind: str, om) -> torch.Tensor:
    """The original model's output with every attention replaced by the naive `kind` (om's parameters)."""
    def params_of(path):
        return [om.get_parameter(f"{path}.{n}").detach() for n in MAMBA_PARAMETERS] if kind == "mamba2" else []

    handles = hf_reference_hooks(model, inputs["attention_mask"].bool(), rope, REFERENCES[kind], params_of)
    try:
        with torch.no_grad():
            return main_tensor(model(**inputs))
    finally:
        for h in handles:
            h.remove()


def perturb(om, seed: int = 0) -> None:
    """Move the mixers' new parameters off their neutral start (a conv that mixes tokens, dt from x, a skip)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in om.named_parameters():
            if any(name.endswith(n) for n in MAMBA_PARAMETERS):
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))


# -- drop and keep against the hand-built reference ------------------------------------------------


@pytest.mark.parametrize("family", ROPE_FAMILIES)
@pytest.mark.parametrize("kind,rope", [("linear", "drop"), ("mamba2", "drop"), ("mamba2", "keep")])
def test_mixer_reads_q_and_k_before_or_after_rope_as_asked(family, kind, rope):
    model, inputs, om = optimized(family, {**OPTIONS[kind], "rope": rope})
    result = om.report.results[0]
    assert result.changed == [f"layer {i} (model.layers.{i}.self_attn): {kind}" for i in range(2)]
    dropped = [m for m in result.messages if "before the rotary embedding" in m]
    assert len(dropped) == (2 if rope == "drop" else 0)
    perturb(om)
    with torch.no_grad():
        got = main_tensor(om(**inputs))
    want = hf_reference(model, inputs, rope, kind, om)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    other = hf_reference(model, inputs, "keep" if rope == "drop" else "drop", kind, om)
    assert not torch.allclose(other, want, atol=1e-3)  # the rotation matters on these inputs


def test_every_kind_keeps_rope_by_default():
    for kind in ("mamba2", "gla", "gated_deltanet"):
        _, inputs, plain = optimized("llama", {"kind": kind})
        _, _, kept = optimized("llama", {"kind": kind, "rope": "keep"})
        assert not plain.report.results[0].messages
        with torch.no_grad():  # unchanged from before the option existed: the same graph, the same outputs
            assert plain.code == kept.code
            torch.testing.assert_close(main_tensor(plain(**inputs)), main_tensor(kept(**inputs)), atol=0, rtol=0)


def test_drop_feeds_the_mixer_the_qk_norm_output_and_the_teacher_the_rotated_q_and_k():
    from rewrite.analysis.nodes import module_path

    model, inputs = TARGETS["qwen3"]()
    om = rewrite.optimize(model, [{"mixer": {"kind": "gla", "rope": "drop"}}], example_kwargs=inputs)
    for i, node in enumerate(n for n in om.program.graph.nodes if n.meta.get("rewrite_mixer")):
        q, k = node.args[:2]
        k = k.args[0] if k.target is torch.ops.aten.slice.Tensor else k  # repeat_kv's full slice, replayed
        assert q.target is torch.ops.aten.transpose.int and k.target is torch.ops.aten.transpose.int
        assert module_path(q.args[0]) == f"model.layers.{i}.self_attn.q_norm"
        assert module_path(k.args[0]) == f"model.layers.{i}.self_attn.k_norm"
        teacher_q, teacher_k = node.kwargs["teacher_qk"]
        assert teacher_q.target is torch.ops.aten.add.Tensor  # q * cos + rotate_half(q) * sin
        assert teacher_k.target is torch.ops.aten.slice.Tensor and teacher_k.args[0].target is torch.ops.aten.add.Tensor


def test_models_without_rope_are_left_as_they_are_with_a_message():
    model, inputs = TARGETS["gpt2"]()
    dropped = rewrite.optimize(model, [{"mixer": {"kind": "mamba2", "rope": "drop"}}], example_kwargs=inputs)
    kept = rewrite.optimize(model, [{"mixer": {"kind": "mamba2", "rope": "keep"}}], example_kwargs=inputs)
    messages = dropped.report.results[0].messages
    assert messages == [f"layer {i} (transformer.h.{i}.attn): rope: drop found no rotary embedding on q or k; "
                        "the mixer reads them as they are" for i in range(2)]
    with torch.no_grad():
        torch.testing.assert_close(main_tensor(dropped(**inputs)), main_tensor(kept(**inputs)), atol=0, rtol=0)


# -- rotaries written by hand -------------------------------------------------------------------------


def causal_sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class RotaryAttention(nn.Module):
    """Causal self-attention with its own rotary embedding, applied in [B, L, H, D] layout, written as
    `style`: `halves` (rotate-half by chunk), `interleaved` (pairs of neighbouring dims), `matrix` (a
    rotation matrix per position) or `complex` (a complex product). `rotary` and `attend` are switches for the reference."""

    def __init__(self, style: str, dim: int, heads: int):
        super().__init__()
        self.style, self.heads, self.rotary, self.attend = style, heads, True, causal_sdpa
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        length, d = x.shape[1], x.shape[-1]
        inv = 1.0 / 100.0 ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d)
        angles = torch.arange(length, device=x.device, dtype=torch.float32)[:, None] * inv  # [L, D/2]
        if self.style == "halves":
            cos, sin = (torch.cat([f(angles)] * 2, -1)[:, None] for f in (torch.cos, torch.sin))
            x1, x2 = x.chunk(2, dim=-1)
            return x * cos + torch.cat([-x2, x1], dim=-1) * sin
        if self.style == "interleaved":
            cos, sin = (f(angles).repeat_interleave(2, -1)[:, None] for f in (torch.cos, torch.sin))
            return x * cos + torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2) * sin
        if self.style == "matrix":  # x @ R_t, R_t rotating dims (i, i + D/2) by angle t * inv_i
            cos, sin = torch.diag_embed(torch.cos(angles)), torch.diag_embed(torch.sin(angles))
            rotation = torch.cat([torch.cat([cos, sin], -1), torch.cat([-sin, cos], -1)], -2)  # [L, D, D]
            return torch.einsum("blhd,lde->blhe", x, rotation)
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        turned = pairs * torch.polar(torch.ones_like(angles), angles)[:, None]
        return torch.view_as_real(turned).flatten(-2).type_as(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, self.heads, -1) for z in self.qkv(x).chunk(3, dim=-1))
        if self.rotary:
            q, k = self.rotate(q), self.rotate(k)
        o = self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.out(o.transpose(1, 2).reshape(b, t, -1))


class RotaryLM(nn.Module):
    """A small causal LM of `RotaryAttention` layers (no MLPs)."""

    def __init__(self, style: str, vocab: int = 96, dim: int = 32, heads: int = 2, layers: int = 2):
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(RotaryAttention(style, dim, heads) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids)
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


@functools.cache
def rotary_lm(style: str):
    torch.manual_seed(0)
    return RotaryLM(style).eval(), torch.randint(0, 96, (2, 12))


def hand_reference(style: str, rope: str) -> torch.Tensor:
    """The hand-written model with its attention replaced by naive linear attention, its rotary on or off."""
    model, ids = rotary_lm(style)
    ref = copy.deepcopy(model)
    valid = torch.ones(ids.shape, dtype=torch.bool)
    for layer in ref.layers:
        layer.rotary = rope == "keep"
        layer.attend = lambda q, k, v: linear_reference(q, k, v, q.shape[-1] ** -0.5, valid, [])
    with torch.no_grad():
        return ref(ids)


@pytest.mark.parametrize("rope", ["drop", "keep"])
def test_a_handwritten_rotate_half_rotary_is_found_and_undone(rope):
    model, ids = rotary_lm("halves")
    om = rewrite.optimize(model, [{"mixer": {"kind": "linear", "feature_map": "identity", "rope": rope}}], (ids,))
    with torch.no_grad():
        got = om(ids)
    torch.testing.assert_close(got, hand_reference("halves", rope), atol=ATOL, rtol=RTOL)
    assert not torch.allclose(hand_reference("halves", "drop"), hand_reference("halves", "keep"), atol=1e-3)


@pytest.mark.parametrize("style", ["interleaved", "matrix", "complex"])
def test_a_rotary_of_another_form_is_refused_naming_the_layer(style):
    model, ids = rotary_lm(style)
    for options in ({"kind": "linear", "rope": "drop"}, {"kind": "mamba2", "rope": "drop"}):
        refused = r"layer 0 \(layers\.0\): rope: drop.*are not rotated in the recognised form.*rope: keep"
        with pytest.raises(PassError, match=refused):
            rewrite.optimize(model, [{"mixer": options}], (ids,))
    om = rewrite.optimize(model, [{"mixer": {"kind": "linear", "feature_map": "identity", "rope": "keep"}}], (ids,))
    with torch.no_grad():
        torch.testing.assert_close(om(ids), hand_reference(style, "keep"), atol=ATOL, rtol=RTOL)


# -- attention transfer, options ----------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_attention_transfer_teaches_from_the_rotated_q_and_k(family):
    """Layer-local transfer returns each layer's softmax teacher: with rope dropped, that is still the
    original model's attention (the rotated q and k), so the forward equals the original model's."""
    model, inputs, om = optimized(family, {"kind": "mamba2", "rope": "drop"})
    valid = inputs["attention_mask"].bool()
    with torch.no_grad(), record_transfer(teacher_forcing=True) as record:
        got = main_tensor(om(**inputs))
        want = main_tensor(model(**inputs))
    assert sorted(record.losses) == [f"layer {i} (model.layers.{i}.self_attn)" for i in range(2)]
    torch.testing.assert_close(got[valid], want[valid], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("value", ["none", "both", 1])
def test_bad_rope_values_name_the_field_and_the_choices(value):
    with pytest.raises(PlanError) as info:
        Plan.from_data([{"mixer": {"kind": "mamba2", "rope": value}}])
    assert info.value.field == "passes[0].mixer.rope"
    if isinstance(value, str):
        assert info.value.allowed == ["keep", "drop"]
