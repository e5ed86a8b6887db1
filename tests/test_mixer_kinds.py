"""Mixer kinds gated_deltanet, mamba2, lawcat, hybrid_swa, sliding_window and the hedgehog feature map:
every decoder family, each kind's math against a naive loop, recurrent steps, padding, parameters, errors."""

from __future__ import annotations

import copy
import functools
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import mamba2_reference

import rewrite
import rewrite.passes.mixer  # noqa: F401  (registers the pass)
from examples import linearize
from examples.models import FAMILIES, TARGETS
from rewrite.analysis import analyze
from rewrite.capture import capture
from rewrite.errors import PassError, PlanError
from rewrite.mixers import KINDS
from rewrite.mixers.gated_deltanet import gated_deltanet_mixer
from rewrite.mixers.gla import gla_mixer
from rewrite.mixers.hybrid_swa import hybrid_swa_mixer
from rewrite.mixers.lawcat import lawcat_mixer
from rewrite.mixers.linear import linear_mixer
from rewrite.mixers.mamba2 import mamba2_mixer
from rewrite.mixers.window import sliding_window_mixer
from rewrite.pipeline import run_pipeline
from rewrite.plan import Plan
from rewrite.selectors import select_layers

ENCODERS = ("bert", "minilm", "transformer_encoder", "multihead_attention")
DECODERS = [f for f in FAMILIES if f not in ENCODERS]
NEW_KINDS = ("gated_deltanet", "mamba2", "lawcat", "hybrid_swa", "sliding_window")
SMALL_WINDOW = {"window": 4, "sinks": 1}
NEW_PARAMETERS = {
    "gated_deltanet": ["deltanet_beta_weight", "deltanet_beta_bias", "deltanet_gate_weight", "deltanet_gate_bias"],
    "mamba2": ["mamba_conv_weight", "mamba_dt_weight", "mamba_dt_bias", "mamba_a_log", "mamba_skip"],
    "lawcat": ["lawcat_q_conv", "lawcat_k_conv"],
    "hybrid_swa": ["hybrid_linear_logit"],
    "sliding_window": [],
}


def split(inputs):
    return (inputs, {}) if isinstance(inputs, tuple) else ((), inputs)


@functools.cache
def captured(family: str):
    model, inputs = TARGETS[family]()
    args, kwargs = split(inputs)
    cap = capture(model, args, kwargs)
    return cap.graph_module, (args, {**kwargs, **cap.injected_kwargs})


def run(gm, call):
    args, kwargs = call
    return linearize.main_tensor(gm(*args, **kwargs))


# -- every new kind x every decoder family -------------------------------------------------------


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("kind", NEW_KINDS)
def test_kind_replaces_selected_layers_and_its_parameters_train(family, kind):
    gm0, call = captured(family)
    blocks = analyze(gm0).blocks
    want = [blocks[i] for i in select_layers("1:", [b.path for b in blocks])]
    gm = copy.deepcopy(gm0)
    result = run_pipeline(gm, Plan.from_data([{"mixer": {"kind": kind, "layers": "1:", **SMALL_WINDOW}}])).results[0]
    assert result.changed == [f"layer {b.index} ({s.module_path}): {kind}" for b in want for s in b.sites]
    mixers = [n for n in gm.graph.nodes if "rewrite_mixer" in n.meta]
    assert [n.meta["rewrite_mixer"] for n in mixers] == [kind] * len(want)
    site_paths = [s.module_path for b in want for s in b.sites]
    expected = [f"{p}.{name}" for p in site_paths for name in NEW_PARAMETERS[kind]]
    assert result.added_parameters == expected
    params = dict(gm.named_parameters())
    assert all(params[n].requires_grad for n in expected)

    out = run(gm, call)
    assert torch.isfinite(out).all()
    torch.manual_seed(1)
    target = torch.randn_like(out)
    trained = [params[n] for n in expected] or [p for p in gm.parameters() if p.is_floating_point()]
    opt = torch.optim.Adam(trained, lr=1e-2)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = F.mse_loss(run(gm, call), target)
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_causal_kinds_on_an_encoder_name_the_layer(kind):
    gm, _ = captured("bert")
    with pytest.raises(PassError, match=rf"layer 0 \(encoder\.layer\.0\.attention\.self\).*{kind}.*causal"):
        run_pipeline(copy.deepcopy(gm), Plan.from_data([{"mixer": {"kind": kind}}]))


def test_gated_deltanet_refuses_key_head_dims_its_cuda_kernels_cannot_hold(monkeypatch):
    """A CUDA site with head dim 256 (Gemma-sized) is refused for the delta rule by name, with the kinds that can serve
    it; 128, or any head dim on the CPU (the reference), is taken."""
    import dataclasses

    from rewrite.mixers import SiteShape
    from rewrite.passes import mixer as mixer_pass

    refusal = KINDS["gated_deltanet"].refusal
    assert "key head dim 256 is above the 128" in refusal(SiteShape(4, 2, 256, torch.bfloat16, torch.device("cuda")))
    assert refusal(SiteShape(4, 2, 128, torch.bfloat16, torch.device("cuda"))) is None
    assert refusal(SiteShape(4, 2, 256, torch.float32, torch.device("cpu"))) is None
    site_shape = mixer_pass._site_shape
    monkeypatch.setattr(mixer_pass, "_site_shape", lambda site, layer: dataclasses.replace(
        site_shape(site, layer), head_dim=256, device=torch.device("cuda")))
    gm, _ = captured("llama")
    with pytest.raises(PassError, match=r"layer 0 \(model\.layers\.0\.self_attn\): kind 'gated_deltanet' cannot serve "
                                        r"this layer: key head dim 256 .*use another kind \(linear, retention, gla, "):
        run_pipeline(copy.deepcopy(gm), Plan.from_data([{"mixer": {"kind": "gated_deltanet"}}]))
    run_pipeline(copy.deepcopy(gm), Plan.from_data([{"mixer": {"kind": "gla"}}]))  # no refusal for the other kinds


# -- each kind's math against a naive loop (float64) --------------------------------------------

B, H, HKV, L, D = 2, 4, 2, 11, 8
GROUPS = H // HKV
SCALE = D**-0.5


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, HKV, L, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, HKV, L, D, generator=g, dtype=torch.float64)
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[0, :3] = False  # row 0 left-padded
    return q, k, v, valid, g


def _mask(valid):
    """An HF-style additive causal + key-padding mask [B, 1, L, L]."""
    keep = valid[:, None, None, :] & torch.ones(L, L, dtype=torch.bool).tril()
    return torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, torch.finfo(torch.float64).min)


def _conv_loop(x, w):
    """Causal depthwise conv: x [L, C], w [C, W] -> y[t] = sum_j w[:, j] * x[t - W + 1 + j]."""
    width = w.shape[1]
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(width):
            s = t - width + 1 + j
            if s >= 0:
                y[t] += w[:, j] * x[s]
    return y


def _gla_loop(q, k, v, g, valid, normalize):
    """Per-row gated linear attention: q [H, L, K], k/v [Hkv, L, .], g [L, Hkv, K] log-decays."""
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype)
    for h in range(HKV):
        s = torch.zeros(k.shape[-1], v.shape[-1], dtype=q.dtype)
        z = torch.zeros(k.shape[-1], dtype=q.dtype)
        for t in range(q.shape[1]):
            if valid[t]:
                s = torch.exp(g[t, h])[:, None] * s + torch.outer(k[h, t], v[h, t])
                z = torch.exp(g[t, h]) * z + k[h, t]
            for hq in range(h * GROUPS, (h + 1) * GROUPS):
                num = SCALE * q[hq, t] @ s
                out[hq, t] = num / (SCALE * q[hq, t] @ z + 1e-6) if normalize else num
    return out


def _window_loop(q, k, v, valid, window, sinks):
    out = torch.zeros(H, L, D, dtype=q.dtype)
    real = valid.nonzero().flatten().tolist()
    for hq in range(H):
        for t in range(L):
            keys = [j for j in real if j <= t and (t - j < window or real.index(j) < sinks)] or [t]
            scores = torch.stack([SCALE * q[hq, t] @ k[hq // GROUPS, j] for j in keys])
            p = torch.softmax(scores, 0)
            out[hq, t] = sum(p[i] * v[hq // GROUPS, j] for i, j in enumerate(keys))
    return out


def _real_rows(got, want, valid):
    for b in range(B):
        torch.testing.assert_close(got[b][:, valid[b]], want[b][:, valid[b]], rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("padded", [False, True])
def test_gated_deltanet_matches_the_delta_rule_loop(padded):
    q, k, v, valid, g = _inputs()
    valid = valid if padded else torch.ones_like(valid)
    bw, gw = (0.3 * torch.randn(HKV, D, generator=g, dtype=torch.float64) for _ in range(2))
    bb, gb = torch.tensor([0.2, -0.4], dtype=torch.float64), torch.tensor([2.0, 4.0], dtype=torch.float64)
    got = gated_deltanet_mixer(q, k, v, bw, bb, gw, gb, mask=_mask(valid) if padded else None, scale=SCALE,
                               feature_map="elu1")
    qn, kn = F.normalize(F.elu(q) + 1, dim=-1), F.normalize(F.elu(k) + 1, dim=-1)
    want = torch.zeros_like(got)
    for b in range(B):
        for h in range(HKV):
            s = torch.zeros(D, D, dtype=torch.float64)
            for t in range(L):
                if valid[b, t]:
                    beta = torch.sigmoid(k[b, h, t] @ bw[h] + bb[h])
                    decay = torch.sigmoid(k[b, h, t] @ gw[h] + gb[h])
                    s = decay * (s - beta * torch.outer(kn[b, h, t], kn[b, h, t] @ s)) + beta * torch.outer(kn[b, h, t], v[b, h, t])
                for hq in range(h * GROUPS, (h + 1) * GROUPS):
                    want[b, hq, t] = SCALE * qn[b, hq, t] @ s
    _real_rows(got, want, valid)


def test_mamba2_matches_the_ssm_loop_with_padding():
    q, k, v, valid, g = _inputs(1)
    channels = 2 * HKV * D + H * D
    conv = torch.randn(channels, 4, generator=g, dtype=torch.float64) * 0.5
    dtw = 0.2 * torch.randn(HKV, D, generator=g, dtype=torch.float64)
    dtb, alog = torch.tensor([-1.0, -3.0], dtype=torch.float64), torch.tensor([0.0, 1.5], dtype=torch.float64)
    skip = torch.randn(H, generator=g, dtype=torch.float64)
    got = mamba2_mixer(q, k, v, conv, dtw, dtb, alog, skip, mask=_mask(valid), scale=SCALE)
    want = mamba2_reference(q, k, v, SCALE, valid, (conv, dtw, dtb, alog, skip)).to(got.dtype)
    _real_rows(got, want, valid)


def test_lawcat_matches_conv_then_normalised_gated_linear_attention():
    q, k, v, valid, g = _inputs(2)
    qconv = torch.randn(H * D, 3, generator=g, dtype=torch.float64) * 0.5
    kconv = torch.randn(HKV * D, 3, generator=g, dtype=torch.float64) * 0.5
    got = lawcat_mixer(q, k, v, qconv, kconv, mask=_mask(valid), scale=SCALE, feature_map="elu1", normalize=True,
                       gate="vector", gate_normalizer=8.0)
    want = torch.zeros_like(got)
    for b in range(B):
        qc = _conv_loop(q[b].transpose(0, 1).flatten(1) * valid[b, :, None], qconv).view(L, H, D).transpose(0, 1)
        kc = _conv_loop(k[b].transpose(0, 1).flatten(1) * valid[b, :, None], kconv).view(L, HKV, D).transpose(0, 1)
        gates = F.logsigmoid(kc.transpose(0, 1)) / 8.0
        want[b] = _gla_loop(F.elu(qc) + 1, F.elu(kc) + 1, v[b], gates, valid[b], normalize=True)
    _real_rows(got, want, valid)


@pytest.mark.parametrize("feature_map", ["identity", "elu1"])
@pytest.mark.parametrize("padded", [False, True])
def test_gla_gate_is_the_kernels_own_without_padding(monkeypatch, feature_map, padded):
    """Without padding the GLA mixer hands the raw keys to the linear-attention op as its vector gate (key_gate =
    the normaliser, no log-decay tensor made before it; with `KERNEL_KEY_GATE` on); with padding it passes the masked log-decays. Either way
    the output is the gated recurrence with gates logsigmoid(k) / N from the keys before the feature map."""
    from rewrite.kernels.linear_attention import api

    q, k, v, valid, _ = _inputs(3)
    if not padded:
        valid = torch.ones_like(valid)
    gates_seen = []
    forward = api.linear_attention_forward

    def spy(*args):
        gates_seen.append(args[-1])
        return forward(*args)

    monkeypatch.setattr(api, "linear_attention_forward", spy)
    monkeypatch.setattr(api, "KERNEL_KEY_GATE", True)
    got = gla_mixer(q, k, v, mask=_mask(valid) if padded else None, scale=SCALE, feature_map=feature_map,
                    gate="vector", gate_normalizer=8.0)
    assert gates_seen == ([0.0] if padded else [8.0])
    phi = (lambda x: F.elu(x) + 1) if feature_map == "elu1" else (lambda x: x)
    want = torch.zeros_like(got)
    for b in range(B):
        want[b] = _gla_loop(phi(q[b]), phi(k[b]), v[b], F.logsigmoid(k[b].transpose(0, 1)) / 8.0, valid[b],
                            normalize=False)
    _real_rows(got, want, valid)


@pytest.mark.parametrize("padded", [False, True])
def test_sliding_window_matches_the_softmax_loop(padded):
    q, k, v, valid, _ = _inputs(3)
    valid = valid if padded else torch.ones_like(valid)
    got = sliding_window_mixer(q, k, v, mask=_mask(valid) if padded else None, window=3, sinks=2, scale=SCALE)
    want = torch.stack([_window_loop(q[b], k[b], v[b], valid[b], 3, 2) for b in range(B)])
    _real_rows(got, want, valid)


def _hybrid_loop(q, k, v, valid, window, sinks, weight, phi_q, phi_k, log_gates):
    """Window softmax and gated linear attention beyond the window under one normalisation, per row."""
    out = torch.zeros(H, L, D, dtype=q.dtype)
    real = valid.nonzero().flatten().tolist()
    for hq in range(H):
        h = hq // GROUPS
        for t in range(L):
            inside = [j for j in real if j <= t and (t - j < window or real.index(j) < sinks)]
            outside = [j for j in real if j <= t - window and real.index(j) >= sinks]
            num = torch.zeros(D, dtype=q.dtype)
            den = torch.zeros((), dtype=q.dtype)
            for j in inside or [t]:
                e = torch.exp(SCALE * q[hq, t] @ k[h, j])
                num, den = num + e * v[h, j], den + e
            for j in outside:  # decayed by the gates of the keys after j up to t - window
                decay = torch.exp(sum((log_gates[r, h] for r in range(j + 1, t - window + 1) if valid[r]),
                                      torch.zeros(phi_k.shape[-1], dtype=q.dtype)))
                a = weight[hq] * (phi_q[hq, t] * decay) @ phi_k[h, j]
                num, den = num + a * v[h, j], den + a
            out[hq, t] = num / den
    return out


@pytest.mark.parametrize("padded", [False, True])
def test_hybrid_swa_is_window_softmax_plus_gated_linear_attention_beyond_it(padded):
    q, k, v, valid, g = _inputs(4)
    valid = valid if padded else torch.ones_like(valid)
    logit = torch.tensor([-1.0, 0.0, 0.5, 2.0], dtype=torch.float64)
    got = hybrid_swa_mixer(q, k, v, logit, mask=_mask(valid) if padded else None, window=3, sinks=1, scale=SCALE,
                           feature_map="elu1", gate="vector", gate_normalizer=4.0)
    want = torch.stack([
        _hybrid_loop(q[b], k[b], v[b], valid[b], 3, 1, torch.sigmoid(logit), F.elu(q[b]) + 1, F.elu(k[b]) + 1,
                     (F.logsigmoid(k[b]) / 4.0).transpose(0, 1))
        for b in range(B)
    ])
    _real_rows(got, want, valid)


def test_hybrid_swa_window_gradients_are_exact():
    q, k, v, _, g = _inputs(7)
    logit = torch.tensor([0.3, -0.2, 1.0, 0.0], dtype=torch.float64)
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    dense = torch.ones(B, L, dtype=torch.bool)

    def loss(with_mask):
        out = hybrid_swa_mixer(q, k, v, logit, mask=_mask(dense) if with_mask else None, window=3, sinks=2,
                               scale=SCALE, feature_map="elu1", gate="scalar")
        return (out * torch.linspace(-1, 1, D, dtype=torch.float64)).sum()

    kernel = torch.autograd.grad(loss(False), (q, k, v))  # sliding-window kernel with its lse gradient
    reference = torch.autograd.grad(loss(True), (q, k, v))  # dense masked softmax, plain autograd
    for a, b in zip(kernel, reference):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_hedgehog_feature_map_is_a_learned_softmax_map():
    q, k, v, valid, g = _inputs(5)
    wq = torch.randn(H, D, D, generator=g, dtype=torch.float64)
    wk = torch.randn(HKV, D, D, generator=g, dtype=torch.float64)
    got = linear_mixer(q, k, v, wq, wk, mask=_mask(valid), scale=SCALE, feature_map="hedgehog", normalize=True)

    def phi(x, w):
        z = torch.einsum("hld,hde->hle", x, w)
        return torch.cat([torch.softmax(z, -1), torch.softmax(-z, -1)], -1)

    zeros = torch.zeros(L, HKV, 2 * D, dtype=torch.float64)
    want = torch.stack([_gla_loop(phi(q[b], wq), phi(k[b], wk), v[b], zeros, valid[b], True) for b in range(B)])
    _real_rows(got, want, valid)


# -- recurrent steps equal the full-sequence mixer ----------------------------------------------


def _step_case(kind: str, g):
    """(new parameters, keyword arguments of fn and step) for a kind at the test shapes."""
    rand = functools.partial(torch.randn, generator=g, dtype=torch.float64)
    params = {
        "gated_deltanet": (0.3 * rand(HKV, D), rand(HKV), 0.3 * rand(HKV, D), 2 + rand(HKV)),
        "mamba2": (0.5 * rand(2 * HKV * D + H * D, 4), 0.2 * rand(HKV, D), rand(HKV) - 2, rand(HKV), rand(H)),
        "lawcat": (0.5 * rand(H * D, 3), 0.5 * rand(HKV * D, 3)),
        "hybrid_swa": (rand(H) + 1,),
        "sliding_window": (),
        "gla": (),
        "retention": (rand(HKV) + 3,),
        "linear": (rand(H, D, D), rand(HKV, D, D)),
    }[kind]
    kwargs = {
        "gated_deltanet": {"feature_map": "relu"},
        "mamba2": {},
        "lawcat": {"feature_map": "elu1", "normalize": True, "gate": "vector", "gate_normalizer": 8.0},
        "hybrid_swa": {"feature_map": "elu1", "window": 3, "sinks": 2},
        "sliding_window": {"window": 4, "sinks": 1},
        "gla": {"feature_map": "elu1", "normalize": True, "gate": "scalar"},
        "retention": {"feature_map": "identity"},
        "linear": {"feature_map": "hedgehog", "normalize": True},
    }[kind]
    return params, kwargs


@pytest.mark.parametrize("kind", [*NEW_KINDS, "gla", "retention", "linear"])
def test_stepping_token_by_token_equals_the_full_sequence(kind):
    """Also in place (kinds whose step takes `inplace`: the state, once started, is written and returned)."""
    q, k, v, _, g = _inputs(6)
    params, kwargs = _step_case(kind, g)
    mixer = KINDS[kind]
    full = mixer.fn(q, k, v, *params, scale=SCALE, **kwargs)
    in_place = "inplace" in inspect.signature(mixer.step).parameters
    for inplace in (False, True) if in_place else (False,):
        state, outs, t = None, [], 0
        for width in (1, 1, 3, 1, 2, 1, 1, 1):  # one token and a few tokens per call
            more = {"inplace": True} if inplace and state is not None else {}
            o, new = mixer.step(q[:, :, t : t + width], k[:, :, t : t + width], v[:, :, t : t + width], *params,
                                state=state, scale=SCALE, **kwargs, **more)
            if more:
                held = torch.utils._pytree.tree_leaves(state)[-1]
                assert torch.utils._pytree.tree_leaves(new)[-1] is held  # the linear-attention state
            state = new
            outs.append(o)
            t += width
        assert t == L
        torch.testing.assert_close(torch.cat(outs, dim=2), full, rtol=1e-7, atol=1e-7)


# -- end to end: padding, round trips, options --------------------------------------------------


def _padded_pair(length: int = 14, pad: int = 5):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 128, (length - pad,), generator=g)
    y = torch.randint(1, 128, (length,), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[0, :pad] = 0
    padded = {"input_ids": torch.stack([torch.cat([torch.zeros(pad, dtype=torch.long), x]), y]),
              "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    plain = {"input_ids": torch.stack([x, y[: length - pad]]), "attention_mask": torch.ones(2, length - pad, dtype=torch.long),
             "position_ids": torch.arange(length - pad).expand(2, -1)}
    return padded, plain, pad


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_left_padding_gives_the_unpadded_outputs(kind):
    padded, plain, pad = _padded_pair()
    model, _ = TARGETS["llama"]()
    om = rewrite.optimize(model, [{"mixer": {"kind": kind, **SMALL_WINDOW}}], example_kwargs=padded)
    with torch.no_grad():
        for name, p in om.named_parameters():  # move new parameters off their neutral start
            if any(name.endswith(n) for n in NEW_PARAMETERS[kind]):
                p.add_(0.1 * torch.randn_like(p))
        got = linearize.main_tensor(om(**padded))[0, pad:]
        want = linearize.main_tensor(om(**plain))[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_new_parameters_survive_state_dict_and_save_load(tmp_path):
    model, inputs = TARGETS["qwen2"]()
    plan = [{"mixer": {"kind": "mamba2", "layers": "1:"}}]
    om = rewrite.optimize(model, plan, example_kwargs=inputs)
    names = [f"model.layers.1.self_attn.{n}" for n in NEW_PARAMETERS["mamba2"]]
    assert om.report.results[0].added_parameters == names
    with torch.no_grad():
        for n in names:
            om.get_parameter(n).add_(0.05 * torch.randn_like(om.get_parameter(n)))
    before = linearize.main_tensor(om(**inputs))
    fresh = rewrite.optimize(TARGETS["qwen2"]()[0], plan, example_kwargs=inputs)
    assert not torch.allclose(linearize.main_tensor(fresh(**inputs)), before)
    fresh.load_state_dict(om.state_dict(), strict=True)
    torch.testing.assert_close(linearize.main_tensor(fresh(**inputs)), before)
    om.save(tmp_path / "om")
    loaded = rewrite.load(tmp_path / "om", model=TARGETS["qwen2"]()[0])
    torch.testing.assert_close(linearize.main_tensor(loaded(**inputs)), before)


def test_hedgehog_weights_are_named_per_site():
    gm, _ = captured("gpt2")
    result = run_pipeline(copy.deepcopy(gm), Plan.from_data([{"mixer": {"kind": "lawcat", "feature_map": "hedgehog"}}]))
    names = result.results[0].added_parameters
    assert names[:4] == [f"transformer.h.0.attn.{n}" for n in ("lawcat_q_conv", "lawcat_k_conv", "feature_map_q",
                                                                "feature_map_k")]


@pytest.mark.parametrize(
    "options,field",
    [
        ({"kind": "sliding_window", "window": 0}, "window"),
        ({"sinks": -1}, "sinks"),
        ({"conv_width": 9}, "conv_width"),
        ({"beta_init": 1.0}, "beta_init"),
        ({"linear_weight": 0.0}, "linear_weight"),
        ({"kind": "hybrid_swa", "feature_map": "identity"}, "feature_map"),
        ({"dt_min": 0.1, "dt_max": 0.01}, "dt_max"),
        ({"a_min": -1.0}, "a_min"),
        ({"kind": "mamba2", "feature_map": "hedgehog"}, "feature_map"),
        ({"kind": "gated_deltanet", "normalize": True}, "normalize"),
    ],
)
def test_bad_options_of_new_kinds_name_the_field(options, field):
    with pytest.raises(PlanError) as info:
        Plan.from_data([{"mixer": options}])
    assert info.value.field.endswith(f"mixer.{field}")


def test_window_covering_the_sequence_equals_softmax_attention():
    model, inputs = TARGETS["mistral"]()
    om = rewrite.optimize(model, [{"mixer": {"kind": "sliding_window", "window": 64, "sinks": 0}}],
                          example_kwargs=inputs)
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        got, want = linearize.main_tensor(om(**inputs)), linearize.main_tensor(model(**inputs))
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)
    assert math.isfinite(got.sum().item())


# -- packed sequences (cu_seqlens): one call equals each sequence on its own --------------------

ALL_KINDS = tuple(KINDS)


def _packed_case(kind: str, g: torch.Generator, dtype: torch.dtype):
    """(new parameters, keyword arguments) of a kind at the test shapes, parameters off their neutral start."""
    if kind == "bidirectional":
        rand = functools.partial(torch.randn, generator=g, dtype=torch.float64)
        params, kwargs = (rand(H, D, D), rand(HKV, D, D)), {"feature_map": "hedgehog", "normalize": True}
    else:
        params, kwargs = _step_case(kind, g)
    return tuple(p.to(dtype).requires_grad_() for p in params), kwargs


def _packed_inputs(lengths: list[int], dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(1, H, total, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    k = torch.randn(1, HKV, total, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    v = torch.randn(1, HKV, total, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu_seqlens, g


def _one_by_one(fn, q, k, v, params, cu_seqlens, kwargs):
    """The reference: `fn` on each sequence alone (batch 1, no cu_seqlens), outputs concatenated."""
    bounds = cu_seqlens.tolist()
    return torch.cat([fn(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], *params, **kwargs)
                      for s, e in zip(bounds, bounds[1:]) if e > s], dim=2)


# float64 agrees to float32 rounding only: gates, dt and decays are computed in float32 (`.float()`)
PACKED_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-5}


@pytest.mark.parametrize("lengths", [[1, 5, 17, 2], [2, 0, 70, 3]], ids=["short", "empty-and-long"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_packed_sequences_equal_each_sequence_alone(kind, dtype, lengths):
    q, k, v, cu_seqlens, g = _packed_inputs(lengths, dtype, seed=11)
    params, kwargs = _packed_case(kind, g, dtype)
    fn = KINDS[kind].fn
    got = fn(q, k, v, *params, scale=SCALE, cu_seqlens=cu_seqlens, **kwargs)
    want = _one_by_one(fn, q, k, v, params, cu_seqlens, {"scale": SCALE, **kwargs})
    tol = PACKED_TOLERANCE[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    weights = torch.randn(got.shape, generator=g, dtype=torch.float64).to(dtype)
    inputs = (q, k, v, *params)
    got_grads = torch.autograd.grad((got * weights).sum(), inputs)
    want_grads = torch.autograd.grad((want * weights).sum(), inputs)
    for name, a, b in zip(["q", "k", "v", *(f"param {i}" for i in range(len(params)))], got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, name=name: f"gradient of {name}: {m}")


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_packed_sequences_do_not_see_each_other(kind):
    """Changing one sequence leaves every other sequence's outputs as they were (states reset at each start)."""
    q, k, v, cu_seqlens, g = _packed_inputs([6, 9, 4], torch.float64, seed=12)
    params, kwargs = _packed_case(kind, g, torch.float64)
    fn = KINDS[kind].fn
    with torch.no_grad():
        before = fn(q, k, v, *params, scale=SCALE, cu_seqlens=cu_seqlens, **kwargs)
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for x in (q2, k2, v2):
            x[:, :, 6:15] += 1.0  # the middle sequence
        after = fn(q2, k2, v2, *params, scale=SCALE, cu_seqlens=cu_seqlens, **kwargs)
    outside = torch.ones(19, dtype=torch.bool)
    outside[6:15] = False
    torch.testing.assert_close(after[:, :, outside], before[:, :, outside], rtol=0, atol=0)
    assert not torch.allclose(after[:, :, 6:15], before[:, :, 6:15])


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_packed_mixer_is_one_kernel_chain(kind):
    """One call over 4 packed sequences issues each kernel op as often as one call on one sequence."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountRewriteOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "rewrite":
                self.calls.append(str(func))
            return func(*args, **(kwargs or {}))

    q, k, v, cu_seqlens, g = _packed_inputs([1, 5, 17, 2], torch.float64, seed=13)
    params, kwargs = _packed_case(kind, g, torch.float64)
    fn = KINDS[kind].fn
    with torch.no_grad(), CountRewriteOps() as packed:
        fn(q, k, v, *params, scale=SCALE, cu_seqlens=cu_seqlens, **kwargs)
    with torch.no_grad(), CountRewriteOps() as single:
        fn(q[:, :, :5], k[:, :, :5], v[:, :, :5], *params, scale=SCALE, **kwargs)
    assert packed.calls and sorted(packed.calls) == sorted(single.calls)


def test_packed_mixer_refuses_a_mask_or_a_batch():
    q, k, v, cu_seqlens, _ = _packed_inputs([3, 4], torch.float64, seed=14)
    mask = torch.ones(1, 1, 7, 7, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="either an attention mask or cu_seqlens"):
        linear_mixer(q, k, v, mask=mask, cu_seqlens=cu_seqlens, layer="layers.0")
    with pytest.raises(ValueError, match="batch size 1, got batch size 2"):
        linear_mixer(*(x.expand(2, -1, -1, -1) for x in (q, k, v)), cu_seqlens=cu_seqlens)


def test_packed_attention_transfer_teaches_within_each_sequence():
    from rewrite.mixers.transfer import record_transfer

    q, k, v, cu_seqlens, _ = _packed_inputs([4, 7, 2], torch.float64, seed=15)
    with torch.no_grad(), record_transfer(teacher_forcing=True) as record:
        got = gla_mixer(q, k, v, scale=SCALE, cu_seqlens=cu_seqlens, layer="l0")
    bounds = cu_seqlens.tolist()
    want = torch.cat([F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e].repeat_interleave(GROUPS, 1),
                                                     v[:, :, s:e].repeat_interleave(GROUPS, 1), is_causal=True,
                                                     scale=SCALE) for s, e in zip(bounds, bounds[1:])], dim=2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert set(record.losses) == {"l0"} and record.losses["l0"].item() > 0


def test_quality_benchmark_chooses_the_fine_tune_lr_on_windows_apart_from_the_test_ones(monkeypatch):
    from benchmarks import mixer_quality

    seen: list[int] = []
    perplexity = mixer_quality.perplexity

    def recorded(module, windows):
        seen.append(windows.data_ptr())
        return perplexity(module, windows)

    monkeypatch.setattr(mixer_quality, "perplexity", recorded)
    result = mixer_quality.main(["--tiny", "--part", "lm", "--quiet", "--kinds", "gla", "--finetune-lrs", "1e-3,1e-4"])
    row = next(r for r in result["lm"]["rows"] if r["variant"] == "gla + recipe")
    assert row["fine-tune lr (chosen on validation)"] in (1e-3, 1e-4) and math.isfinite(row["ppl"])
    assert len(set(seen)) == 2  # the test windows and, apart from them, the validation windows
