"""Pass `mixer`: every kind on every family it applies to, exactness of `linear`, padding, GQA, errors."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rewrite
import rewrite.passes.mixer  # noqa: F401  (registers the pass)
from examples import linearize
from examples.models import FAMILIES, TARGETS
from rewrite.capture import capture
from rewrite.errors import PassError, PlanError
from rewrite.ir_ops import SDPA, attention
from rewrite.pipeline import run_pipeline
from rewrite.plan import Plan
from rewrite.selectors import select_layers

ENCODERS = ("bert", "minilm", "transformer_encoder", "multihead_attention")
DECODERS = [f for f in FAMILIES if f not in ENCODERS]
CAUSAL_KINDS = ("linear", "retention", "gla")
CASES = [(f, k) for f in DECODERS for k in CAUSAL_KINDS] + [(f, "bidirectional") for f in ENCODERS]
SMALL = {"minilm": {"batch": 2, "length": 16}}
SOFTMAX_OPS = (SDPA, attention, torch.ops.aten.softmax.int, torch.ops.aten._softmax.default)


def split(inputs):
    return (inputs, {}) if isinstance(inputs, tuple) else ((), inputs)


def main_tensor(out) -> torch.Tensor:
    return linearize.main_tensor(out)


@functools.cache
def captured(family: str):
    """(captured graph module, inputs, number of blocks) for a family, captured once per session."""
    model, inputs = TARGETS[family](**SMALL.get(family, {}))
    args, kwargs = split(inputs)
    cap = capture(model, args, kwargs)
    kwargs = {**kwargs, **cap.injected_kwargs}
    return cap.graph_module, (args, kwargs)


def rewritten(family: str, options: dict):
    """A fresh copy of the family's captured graph with the mixer pass applied (not lowered back)."""
    gm, call = captured(family)
    gm = copy.deepcopy(gm)
    report = run_pipeline(gm, Plan.from_data([{"mixer": options}]))
    return gm, call, report.results[0]


def softmax_nodes(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in SOFTMAX_OPS)


def mixer_nodes(gm) -> list:
    return [n for n in gm.graph.nodes if "rewrite_mixer" in n.meta]


def run(gm, call):
    args, kwargs = call
    return main_tensor(gm(*args, **kwargs))


# -- every kind x every family ------------------------------------------------------------------


@pytest.mark.parametrize("family,kind", CASES)
def test_kind_on_family_replaces_selected_layers_and_trains(family, kind):
    gm0, _ = captured(family)
    n_sites = softmax_nodes(gm0)
    from rewrite.analysis import analyze

    blocks = analyze(gm0).blocks
    selector = "1:" if len(blocks) > 1 else "all"
    want = [blocks[i].index for i in select_layers(selector, [b.path for b in blocks])]
    gm, call, result = rewritten(family, {"kind": kind, "layers": selector})
    assert [int(c.split()[1]) for c in result.changed] == want
    assert all(c.endswith(f": {kind}") for c in result.changed)
    assert len(mixer_nodes(gm)) == len(want)
    assert softmax_nodes(gm) == n_sites - len(want)
    out = run(gm, call)
    assert torch.isfinite(out).all()

    torch.manual_seed(1)
    target = torch.randn_like(out)
    params = [p for p in gm.parameters() if p.is_floating_point()]
    opt = torch.optim.Adam(params, lr=1e-3)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = F.mse_loss(run(gm, call), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]


def test_auto_picks_gla_for_decoders_and_bidirectional_for_encoders():
    _, _, dec = rewritten("llama", {})
    _, _, enc = rewritten("bert", {})
    assert [c.split(": ")[1] for c in dec.changed] == ["gla", "gla"]
    assert [c.split(": ")[1] for c in enc.changed] == ["bidirectional", "bidirectional"]


# -- exactness of `linear` with identity features -----------------------------------------------


def _reference_linear(q, k, v, scale, valid):
    """o_t = scale * sum_{s <= t, s real} (q_t . k_s) v_s, with kv heads shared by groups of q heads."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    length = q.shape[2]
    keep = torch.ones(length, length, dtype=torch.bool).tril() & valid[:, None, None, :]
    scores = scale * (q @ k.transpose(-1, -2)) * keep
    return scores @ v


def _llama_hooks(model, valid, store):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    handles = []
    for layer in model.model.layers:
        attn = layer.self_attn
        heads, kv_heads, dim = attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim

        def grab(name):
            def hook(mod, inp, out):
                store[name] = out
            return hook

        def pre_attn(mod, args, kwargs):
            store["rope"] = kwargs["position_embeddings"]

        def pre_o(mod, args, heads=heads, kv_heads=kv_heads, dim=dim, scale=attn.scaling):
            b, t, _ = store["q"].shape
            q = store["q"].view(b, t, heads, dim).transpose(1, 2)
            k = store["k"].view(b, t, kv_heads, dim).transpose(1, 2)
            v = store["v"].view(b, t, kv_heads, dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, *store["rope"])
            o = _reference_linear(q, k, v, scale, valid)
            return (o.transpose(1, 2).reshape(b, t, heads * dim),)

        handles += [
            attn.q_proj.register_forward_hook(grab("q")),
            attn.k_proj.register_forward_hook(grab("k")),
            attn.v_proj.register_forward_hook(grab("v")),
            attn.register_forward_pre_hook(pre_attn, with_kwargs=True),
            attn.o_proj.register_forward_pre_hook(pre_o),
        ]
    return handles


def _gpt2_hooks(model, valid, store):
    handles = []
    for block in model.transformer.h:
        attn = block.attn
        heads, dim = attn.num_heads, attn.head_dim

        def grab(mod, inp, out):
            store["qkv"] = out

        def pre_o(mod, args, heads=heads, dim=dim):
            b, t, _ = store["qkv"].shape
            q, k, v = (x.view(b, t, heads, dim).transpose(1, 2) for x in store["qkv"].split(heads * dim, dim=-1))
            o = _reference_linear(q, k, v, dim**-0.5, valid)
            return (o.transpose(1, 2).reshape(b, t, heads * dim),)

        handles += [attn.c_attn.register_forward_hook(grab), attn.c_proj.register_forward_pre_hook(pre_o)]
    return handles


@pytest.mark.parametrize("family,hooks", [("llama", _llama_hooks), ("gpt2", _gpt2_hooks)])
def test_linear_identity_equals_plain_causal_linear_attention(family, hooks):
    model, inputs = TARGETS[family]()
    plan = [{"mixer": {"kind": "linear", "feature_map": "identity"}}]
    om = rewrite.optimize(model, plan, example_kwargs=inputs)
    got = main_tensor(om(**inputs))
    valid = inputs["attention_mask"].bool()  # row 0 is left-padded
    handles = hooks(model, valid, {})
    try:
        with torch.no_grad():
            want = main_tensor(model(**inputs))
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(main_tensor(model(**inputs)), want)  # the reference did change the model


# -- padding --------------------------------------------------------------------------------------


def _padded_pair(length: int, pad: int, left: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 128, (length - pad,), generator=g)
    y = torch.randint(1, 128, (length,), generator=g)
    fill = torch.zeros(pad, dtype=torch.long)
    row = torch.cat([fill, x]) if left else torch.cat([x, fill])
    mask = torch.ones(2, length, dtype=torch.long)
    if left:
        mask[0, :pad] = 0
    else:
        mask[0, length - pad:] = 0
    padded = {"input_ids": torch.stack([row, y]), "attention_mask": mask}
    plain = {"input_ids": torch.stack([x, y[: length - pad]]), "attention_mask": torch.ones(2, length - pad, dtype=torch.long)}
    return padded, plain


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
@pytest.mark.parametrize("feature_map", ["identity", "elu1"])
def test_left_padding_does_not_leak_into_the_state(kind, feature_map):
    length, pad = 16, 5
    padded, plain = _padded_pair(length, pad, left=True)
    padded["position_ids"] = (padded["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    plain["position_ids"] = torch.arange(length - pad).expand(2, -1)
    model, _ = TARGETS["llama"]()
    plan = [{"mixer": {"kind": kind, "feature_map": feature_map}}]
    om = rewrite.optimize(model, plan, example_kwargs=padded)
    with torch.no_grad():
        got = main_tensor(om(**padded))[0, pad:]
        want = main_tensor(om(**plain))[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_right_padding_in_an_encoder_is_invisible_to_real_tokens():
    length, pad = 16, 6
    padded, plain = _padded_pair(length, pad, left=False)
    model, _ = TARGETS["bert"]()
    om = rewrite.optimize(model, [{"mixer": {"kind": "bidirectional"}}], example_kwargs=padded)
    with torch.no_grad():
        got = main_tensor(om(**padded))[0, : length - pad]
        want = main_tensor(om(**plain))[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# -- GQA, parameters, round trips -----------------------------------------------------------------


def test_gqa_keys_and_values_are_not_repeated():
    gm, call, _ = rewritten("llama", {"kind": "gla"})
    for node in mixer_nodes(gm):
        q, k, v = (a.meta["val"] for a in node.args[:3])
        assert q.shape[1] == 4 and k.shape[1] == 2 and v.shape[1] == 2
    assert not any(n.target is torch.ops.aten.expand.default and n.args[0].target is torch.ops.aten.unsqueeze.default
                   and len(n.args[1]) == 5 for n in gm.graph.nodes if n.op == "call_function")
    assert torch.isfinite(run(gm, call)).all()


def test_retention_decay_is_a_named_parameter_that_survives_state_dict_and_recapture():
    model, inputs = TARGETS["llama"]()
    plan = [{"mixer": {"kind": "retention"}}]
    om = rewrite.optimize(model, plan, example_kwargs=inputs)
    names = [f"model.layers.{i}.self_attn.retention_decay_logit" for i in range(2)]
    assert om.report.results[0].added_parameters == names
    params = dict(om.named_parameters())
    assert all(params[n].shape == (2,) and params[n].requires_grad for n in names)
    decays = torch.sigmoid(params[names[0]].detach())
    assert 0.96 < float(decays.min()) and float(decays.max()) < 0.999
    with torch.no_grad():
        params[names[0]].add_(0.5)
    state = om.state_dict()
    assert set(names) <= set(state)
    before = main_tensor(om(**inputs))

    fresh_model, _ = TARGETS["llama"]()
    fresh = rewrite.optimize(fresh_model, plan, example_kwargs=inputs)
    fresh.load_state_dict(state, strict=True)
    torch.testing.assert_close(main_tensor(fresh(**inputs)), before)

    param = params[names[0]]
    om.train()
    main_tensor(om(**inputs))  # train mode captures again; the parameter must be the same object
    assert dict(om.named_parameters())[names[0]] is param


def test_save_and_load_keep_new_parameters(tmp_path):
    pytest.importorskip("rewrite.serialize")
    model, inputs = TARGETS["llama"]()
    om = rewrite.optimize(model, [{"mixer": {"kind": "retention", "layers": "1:"}}], example_kwargs=inputs)
    name = "model.layers.1.self_attn.retention_decay_logit"
    with torch.no_grad():
        om.get_parameter(name).fill_(3.0)
    om.save(tmp_path / "om")
    loaded = rewrite.load(tmp_path / "om", model=TARGETS["llama"]()[0])
    torch.testing.assert_close(loaded.state_dict()[name], om.state_dict()[name])
    torch.testing.assert_close(main_tensor(loaded(**inputs)), main_tensor(om(**inputs)))


# -- what the pass refuses ------------------------------------------------------------------------


def _plan_error(options: dict) -> PlanError:
    with pytest.raises(PlanError) as info:
        Plan.from_data([{"mixer": options}])
    return info.value


@pytest.mark.parametrize(
    "options,field",
    [
        ({"kind": "mamba"}, "kind"),
        ({"feature_map": "cos"}, "feature_map"),
        ({"normalize": True, "feature_map": "identity"}, "normalize"),
        ({"decay_min": 1.5}, "decay_min"),
        ({"decay_min": 0.99, "decay_max": 0.9}, "decay_max"),
        ({"gate_normalizer": 0.0}, "gate_normalizer"),
        ({"gate": "matrix"}, "gate"),
        ({"layers": 1.5}, "layers"),
    ],
)
def test_bad_options_name_the_field(options, field):
    err = _plan_error(options)
    assert err.field.endswith(f"mixer.{field}")


def test_layer_selector_out_of_range_is_a_plan_error():
    with pytest.raises(PlanError, match="layers"):
        rewritten("llama", {"layers": 5})


def test_causal_kind_on_an_encoder_names_the_layer():
    with pytest.raises(PassError, match=r"layer 0 \(encoder\.layer\.0\.attention\.self\).*not causal"):
        rewritten("bert", {"kind": "gla"})


def test_bidirectional_on_a_decoder_is_refused():
    with pytest.raises(PassError, match="layer 0 .*causal"):
        rewritten("llama", {"kind": "bidirectional"})


def test_only_selected_layers_are_checked():
    gm, _, result = rewritten("bert", {"kind": "bidirectional", "layers": 0})
    assert [c.split(":")[0] for c in result.changed] == ["layer 0 (encoder.layer.0.attention.self)"]


class _BiasedAttention(nn.Module):
    """Causal attention plus a learned additive bias on the scores (like a relative position bias)."""

    def __init__(self, dim: int = 32, heads: int = 2, length: int = 8, softcap: float | None = None):
        super().__init__()
        self.heads, self.softcap = heads, softcap
        self.qkv = nn.Linear(dim, 3 * dim)
        self.bias = nn.Parameter(torch.zeros(heads, length, length)) if softcap is None else None

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).split(c, -1))
        scores = q @ k.transpose(-1, -2) / math.sqrt(c // self.heads)
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
            scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
        else:
            scores = scores + self.bias
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c)


class _Stack(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList([layer])

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def test_learned_bias_is_refused_naming_the_layer():
    with pytest.raises(PassError, match=r"layer 0 \(layers\.0\).*parameter 'layers\.0\.bias'"):
        rewrite.optimize(_Stack(_BiasedAttention()), [{"mixer": {"kind": "linear"}}], (torch.randn(2, 8, 32),))


def test_softcapping_is_refused_naming_the_layer():
    with pytest.raises(PassError, match=r"layer 0 \(layers\.0\).*softcapping"):
        rewrite.optimize(_Stack(_BiasedAttention(softcap=30.0)), [{"mixer": {}}], (torch.randn(2, 8, 32),))


def test_returned_attention_probabilities_are_refused():
    from examples.models import MHABlock

    torch.manual_seed(0)
    model = MHABlock(need_weights=True).eval()
    with pytest.raises(PassError, match="attn.*probabilities"):
        rewrite.optimize(model, [{"mixer": {}}], (torch.randn(2, 8, 64),))


class _BandAttention(nn.Module):
    """Causal attention restricted to a band of `width` keys (a sliding window): causal, but not carried."""

    def __init__(self, dim: int = 32, heads: int = 2, width: int = 3):
        super().__init__()
        self.heads, self.width = heads, width
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).split(c, -1))
        i = torch.arange(t)
        keep = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - self.width)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return o.transpose(1, 2).reshape(b, t, c)


def test_sliding_window_mask_is_refused_when_the_pass_runs():
    """A band the example shows is refused by `optimize` (the capture's mask probe saw it hide earlier keys of the
    query's own sequence), not at the first call; the mixers' own eager check still refuses such a mask (one the
    probe could not evaluate). `check_masks: false` linearizes the layer over the whole prefix instead."""
    x = torch.randn(2, 8, 32)
    with pytest.raises(PassError, match=r"layer 0 \(layers\.0\).*hides earlier keys of a query's own sequence.*"
                                        r"`layers` selector.*check_masks: false"):
        rewrite.optimize(_Stack(_BandAttention()), [{"mixer": {"kind": "linear"}}], (x,))
    from rewrite.mixers.linear import linear_mixer

    q = torch.randn(2, 2, 8, 16)
    i = torch.arange(8)
    band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 3)
    with pytest.raises(PassError, match=r"at layer 0 \(layers\.0\): .*not causal plus key padding"):
        linear_mixer(q, q, q, mask=band, layer="layer 0 (layers.0)")
    om = rewrite.optimize(_Stack(_BandAttention()), [{"mixer": {"kind": "linear", "check_masks": False}}], (x,))
    assert torch.isfinite(om(x)).all()


def test_sliding_window_wider_than_the_example_is_refused_before_any_call():
    """A window of 12 is invisible on an 8-token example, but its builder offsets positions by 12: the pass refuses
    the layer at once (the module refused the first input longer than the window). With `check_masks: false` the
    window is dropped: the layer mixes over the whole prefix, as with a window longer than any input."""
    example = (torch.randn(2, 8, 32),)
    with pytest.raises(PassError, match=r"layer 0 \(layers\.0\).*offsets positions by up to 12.*`layers` selector"):
        rewrite.optimize(_Stack(_BandAttention(width=12)), [{"mixer": {"kind": "linear"}}], example)
    plan = [{"mixer": {"kind": "linear", "check_masks": False}}]
    torch.manual_seed(0)
    narrow = rewrite.optimize(_Stack(_BandAttention(width=12)), plan, example)
    torch.manual_seed(0)
    wide = rewrite.optimize(_Stack(_BandAttention(width=1000)), plan, example)
    x = torch.randn(2, 20, 32)
    with torch.no_grad():
        torch.testing.assert_close(narrow(x), wide(x), atol=0, rtol=0)


class _PackedBandAttention(_BandAttention):
    """`_BandAttention` over a row of packed sequences: a query sees keys of its own sequence within the band
    (`width=None`: every earlier key of its sequence)."""

    def forward(self, x, sequence_ids):
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).split(c, -1))
        i = torch.arange(t)
        band = i[None, :] <= i[:, None]
        if self.width is not None:
            band = band & (i[None, :] > i[:, None] - self.width)
        keep = band & (sequence_ids[:, None, :, None] == sequence_ids[:, None, None, :])
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return o.transpose(1, 2).reshape(b, t, c)


class _PackedStack(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList([layer])

    def forward(self, x, sequence_ids):
        return self.layers[0](x, sequence_ids)


def test_window_wider_than_every_packed_sequence_is_refused_before_any_call():
    """A packed row longer than the window whose sequences are all shorter than it shows no window (each query sees
    its sequence from the start): the pass counts the example's longest sequence, not the row, and refuses the layer
    at once. A packed example with one sequence longer than the window shows the band and is refused as such; the
    same packed example without a window is refused for want of a pass that carries packed sequences (varlen), and
    `check_masks: false` linearizes the windowed one."""
    x = torch.randn(1, 16, 32)
    short = torch.arange(16).div(4, rounding_mode="floor")[None]  # four sequences of 4 tokens, window 6
    with pytest.raises(PassError, match=r"layer 0 \(layers\.0\).*offsets positions by up to 6"):
        rewrite.optimize(_PackedStack(_PackedBandAttention(width=6)), [{"mixer": {"kind": "linear"}}], (x, short))
    long = (torch.arange(16) >= 12).long()[None]  # a sequence of 12 tokens, then one of 4
    with pytest.raises(PassError, match=r"layer 0 \(layers\.0\).*hides earlier keys of a query's own sequence"):
        rewrite.optimize(_PackedStack(_PackedBandAttention(width=6)), [{"mixer": {"kind": "linear"}}], (x, long))
    with pytest.raises(PassError, match=r"layer 0 \(layers\.0\).*packs several sequences.*no later pass.*varlen"):
        rewrite.optimize(_PackedStack(_PackedBandAttention(width=None)), [{"mixer": {"kind": "linear"}}], (x, short))
    plan = [{"mixer": {"kind": "linear", "check_masks": False}}]
    om = rewrite.optimize(_PackedStack(_PackedBandAttention(width=6)), plan, (x, short))
    assert torch.isfinite(om(x, short)).all()


# -- the example -------------------------------------------------------------------------------


def test_linearize_example_runs(capsys):
    om = linearize.main(["--target", "llama", "--kind", "retention", "--layers", "1:"])
    out = capsys.readouterr().out
    assert "changed layer 1 (model.layers.1.self_attn): retention" in out
    assert "layer 0" not in out
    assert "model.layers.1.self_attn.retention_decay_logit" in out
    assert isinstance(om, rewrite.OptimizedModule)
