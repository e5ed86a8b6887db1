"""rewrite::delta_rule*: naive recurrence vs chunked form, op gradients, Triton launchers, varlen, states, decode."""

import pytest
import torch
import torch.nn.functional as F

from rewrite.kernels.delta_rule import delta_rule, delta_rule_step
from rewrite.kernels.delta_rule import op as delta_op
from rewrite.kernels.delta_rule.chunked_reference import autodiff_backward, chunked_backward, chunked_forward
from rewrite.kernels.delta_rule.naive import naive_delta_rule
from rewrite.kernels.testing import (
    assert_close,
    check_launcher,
    kernel_device,
    load_launchers,
    rewrite_ops_called,
)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
FORWARD = "rewrite.kernels.delta_rule.triton_forward"
BACKWARD = "rewrite.kernels.delta_rule.triton_backward"
STEP = "rewrite.kernels.delta_rule.triton_step"


def make_inputs(dtype, device, *, batch=2, length=21, heads=4, kv_heads=2, dk=16, dv=16, gated=True,
                with_state=True, cu_seqlens=None, beta_max=1.0):
    """q, k (unit rows), v, beta in [0, beta_max], g (log-decays) or None, initial state or None, cu_seqlens."""
    n = batch if cu_seqlens is None else len(cu_seqlens) - 1
    q = torch.randn(batch, length, heads, dk, device=device).to(dtype)
    k = F.normalize(torch.randn(batch, length, kv_heads, dk, device=device), dim=-1).to(dtype)
    v = torch.randn(batch, length, kv_heads, dv, device=device).to(dtype)
    beta = (torch.rand(batch, length, kv_heads, device=device) * beta_max).to(dtype)
    g = (-0.5 * torch.rand(batch, length, kv_heads, device=device)).to(dtype) if gated else None
    state_dtype = torch.promote_types(dtype, torch.float32)
    h0 = torch.randn(n, kv_heads, dk, dv, device=device, dtype=state_dtype) if with_state else None
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int32, device=device)
    return q, k, v, beta, g, h0, cu


CASES = [
    dict(batch=2, length=21, heads=4, kv_heads=2, gated=True, with_state=True),
    dict(batch=1, length=19, heads=2, kv_heads=1, dk=8, dv=12, gated=False, with_state=True,
         cu_seqlens=[0, 1, 9, 9, 10, 19], beta_max=2.0),
    dict(batch=3, length=1, heads=2, kv_heads=2, gated=True, with_state=False),
]


def naive_grads(inputs, scale, do, dht):
    q, k, v, beta, g, h0, cu = inputs
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in (q, k, v, beta, g, h0)]
    o, final = naive_delta_rule(*leaves[:5], scale=scale, initial_state=leaves[5], cu_seqlens=cu)
    present = [x for x in leaves if x is not None]
    grads = iter(torch.autograd.grad((o, final), present, (do, dht)))
    return o, final, [None if x is None else next(grads) for x in leaves]


def output_grads(inputs):
    q, k, v, _, _, _, cu = inputs
    n = q.shape[0] if cu is None else cu.numel() - 1
    do = torch.randn(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    dht = torch.randn(n, k.shape[2], k.shape[-1], v.shape[-1], dtype=torch.promote_types(q.dtype, torch.float32),
                      device=q.device)
    return do, dht


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("chunk", [4, 16])
def test_chunked_forward_matches_naive(case, chunk):
    q, k, v, beta, g, h0, cu = make_inputs(torch.float64, "cpu", **case)
    o, final = chunked_forward(q, k, v, beta, g, 0.3, h0, cu, chunk)
    o_ref, final_ref = naive_delta_rule(q, k, v, beta, g, scale=0.3, initial_state=h0, cu_seqlens=cu)
    assert_close(o, o_ref, 1e-12, "o")
    assert_close(final, final_ref, 1e-12, "final state")


NAMES = ("dq", "dk", "dv", "dbeta", "dg", "d_initial_state")


@pytest.mark.parametrize("case", CASES)
def test_op_output_and_grads_match_naive(case):
    inputs = make_inputs(torch.float64, "cpu", **case)
    do, dht = output_grads(inputs)
    o_ref, final_ref, grads_ref = naive_grads(inputs, 0.3, do, dht)
    q, k, v, beta, g, h0, cu = inputs
    leaves = [None if x is None else x.clone().requires_grad_() for x in (q, k, v, beta, g, h0)]
    o, final = delta_rule(*leaves[:5], scale=0.3, initial_state=leaves[5], output_final_state=True, cu_seqlens=cu)
    present = [x for x in leaves if x is not None]
    grads = iter(torch.autograd.grad((o, final), present, (do, dht)))
    assert_close(o, o_ref, 1e-12, "o")
    assert_close(final, final_ref, 1e-12, "final state")
    for name, leaf, expected in zip(NAMES, leaves, grads_ref):
        if leaf is not None:
            assert_close(next(grads), expected, 1e-10, name)


@pytest.mark.parametrize("case", CASES[:2])
def test_backward_functions_match_naive(case):
    inputs = make_inputs(torch.float64, "cpu", **case)
    do, dht = output_grads(inputs)
    _, _, grads_ref = naive_grads(inputs, 0.3, do, dht)
    q, k, v, beta, g, h0, cu = inputs
    by_loop = chunked_backward(do, dht, q, k, v, beta, g, 0.3, h0, cu)
    by_autodiff = autodiff_backward(do, dht, q, k, v, beta, g, 0.3, h0, cu, 8)  # the CUDA op's backward
    for name, a, b, expected in zip(NAMES, by_loop, by_autodiff, grads_ref):
        if expected is not None:
            assert_close(a, expected, 1e-10, name)
            assert_close(b, expected, 1e-10, name + " (autodiff)")


def test_allow_neg_eigval_doubles_beta():
    q, k, v, beta, g, h0, _ = make_inputs(torch.float64, "cpu")
    o, _ = delta_rule(q, k, v, beta, g, allow_neg_eigval=True)
    o_ref, _ = naive_delta_rule(q, k, v, 2 * beta, g)
    assert_close(o, o_ref, 1e-12)


def test_steps_match_one_call():
    q, k, v, beta, g, h0, _ = make_inputs(torch.float64, "cpu", length=9)
    o, final = delta_rule(q, k, v, beta, g, initial_state=h0, output_final_state=True)
    state, outs = h0, []
    for start, end in ((0, 4), (4, 5), (5, 9)):
        part = slice(start, end)
        o_t, state = delta_rule_step(q[:, part], k[:, part], v[:, part], beta[:, part], g[:, part], state=state)
        outs.append(o_t)
    assert_close(torch.cat(outs, 1), o, 1e-12, "o")
    assert_close(state, final, 1e-12, "state")


TRITON_CASES = [
    dict(batch=2, length=37, heads=4, kv_heads=2, dk=16, dv=32, gated=True, with_state=True),
    dict(batch=1, length=40, heads=2, kv_heads=1, dk=24, dv=16, gated=True, with_state=False,
         cu_seqlens=[0, 1, 20, 20, 21, 40], beta_max=2.0),
    dict(batch=1, length=18, heads=2, kv_heads=2, gated=False, with_state=True),
]


def _naive_for_launcher(q, k, v, beta, g, h0, cu):
    return naive_delta_rule(q, k, v, beta, g, scale=0.3, initial_state=h0, cu_seqlens=cu)


# (case, chunk): chunk 16 is one diagonal block of the blocked inverse; 32 and 64 use 2 and 4 blocks
TRITON_RUNS = [(TRITON_CASES[0], 16), (TRITON_CASES[1], 16), (TRITON_CASES[2], 16),
               (dict(TRITON_CASES[0], batch=1, length=45), 32),
               (dict(TRITON_CASES[1], length=82, cu_seqlens=[0, 1, 67, 67, 68, 82]), 64)]


def test_chunked_kernels_refuse_key_head_dims_their_shared_memory_cannot_hold():
    """K above 128 (a Gemma-sized 256 would need 589824 bytes of shared memory in the state pass, an H100 has 232448):
    the launcher refuses before any kernel, naming K and the limit, where a GPU would have refused the launch."""
    launchers = load_launchers(FORWARD)
    q, k, v, beta, g, h0, cu = make_inputs(torch.float32, kernel_device(), dk=160, dv=16, length=5)
    with pytest.raises(ValueError, match=r"key head dims up to 128 .* got K=160"):
        launchers.chunk_forward(q, k, v, beta, g, 0.3, h0, cu)


@pytest.mark.parametrize("state_pass", ["v2", "light"])
@pytest.mark.parametrize(("case", "chunk"), TRITON_RUNS)
def test_triton_forward_matches_naive(case, chunk, state_pass, monkeypatch):
    """The forward with the v2 state pass and with the "light" one (chunk transitions formed in parallel, one product
    per sequential step, U corrected by the output kernel)."""
    launchers = load_launchers(FORWARD)
    monkeypatch.setattr(launchers, "STATE_PASS", state_pass)
    check_launcher(
        lambda q, k, v, beta, g, h0, cu: launchers.chunk_forward(q, k, v, beta, g, 0.3, h0, cu, chunk),
        _naive_for_launcher,
        lambda dtype, device: make_inputs(dtype, device, **case),
        trials=1,
    )


# triton_backward settings (names starting "fwd." are triton_forward's): v2 inverts T twice in the WY kernel; v3 reuses
# T (direct dA), with the chunk's own state-gradient term formed outside the sequential loop (default) or inside it;
# "light": the recompute's state pass and the state-gradient pass as per-chunk transitions plus a one-product scan;
# "v3-light-dstates": only the state-gradient pass light (the transition kernel stores N^T alone)
BACKWARD_VERSIONS = {"v2": {"BACKWARD_VERSION": "v2", "DSTATE_PASS": "v2"},
                     "v3": {"BACKWARD_VERSION": "v3", "DSTATE_PASS": "v2"},
                     "v3-term-in-scan": {"BACKWARD_VERSION": "v3", "STATE_TERM_OUTSIDE": False, "DSTATE_PASS": "v2"},
                     "v3-light": {"BACKWARD_VERSION": "v3", "DSTATE_PASS": "light", "fwd.STATE_PASS": "light"},
                     "v3-light-dstates": {"BACKWARD_VERSION": "v3", "DSTATE_PASS": "light"}}


# the same forms with the forward's buffers kept for the backward ("op." names are op.py's), through the op (GPU tests)
SAVED_VERSIONS = {f"saved {version}": {**BACKWARD_VERSIONS[version], "op.SAVE_FOR_BACKWARD": True}
                  for version in ("v3-light-dstates", "v3-light", "v3", "v2")}


def _select_backward(module, version, monkeypatch):
    forward = load_launchers(FORWARD)
    for name, value in {**BACKWARD_VERSIONS, **SAVED_VERSIONS}[version].items():
        if name.startswith("fwd."):
            monkeypatch.setattr(forward, name[4:], value)
        elif name.startswith("op."):
            monkeypatch.setattr(delta_op, name[3:], value)
        else:
            monkeypatch.setattr(module, name, value)


# every run for each form, except the light state-gradient pass alone: the gated dense case and the varlen
# case with empty / one-token sequences (chunk 64: four blocks)
BACKWARD_RUNS = [(version, case, chunk) for version in BACKWARD_VERSIONS for case, chunk in TRITON_RUNS
                 if version != "v3-light-dstates" or (case, chunk) in (TRITON_RUNS[0], TRITON_RUNS[4])]


@pytest.mark.parametrize(("version", "case", "chunk"), BACKWARD_RUNS)
def test_triton_backward_matches_naive(case, chunk, version, monkeypatch):
    """Every gradient (q, k, v, beta, g, initial state) of the Triton backward against the naive recurrence."""
    launchers = load_launchers(BACKWARD)
    _select_backward(launchers, version, monkeypatch)

    def inputs(dtype, device):
        q, k, v, beta, g, h0, cu = make_inputs(dtype, device, **case)
        do, dht = output_grads((q, k, v, beta, g, h0, cu))
        return do.to(dtype), dht, q, k, v, beta, g, h0, cu

    def reference(do, dht, q, k, v, beta, g, h0, cu):
        return naive_grads((q, k, v, beta, g, h0, cu), 0.3, do, dht)[2]

    check_launcher(
        lambda do, dht, q, k, v, beta, g, h0, cu: launchers.chunk_backward(do, dht, q, k, v, beta, g, 0.3, h0, cu,
                                                                             chunk),
        reference,
        inputs,
        trials=1,
    )


class _NotLaunched:
    """Stands in for a kernel that must not run (the recompute's, when the forward's buffers are kept)."""

    def __getitem__(self, grid):
        raise AssertionError("the backward recomputed what the forward kept")


# the forward keeps W, U, b, h, T for the backward (op.SAVE_FOR_BACKWARD): (version, case, chunk, with a d final
# state; without it the backward gets an empty one). The default backward on the gated GQA case with states, the
# ungated one and the packed one with empty / one-token sequences and beta up to 2 (chunk 64: four blocks); the light
# forward state pass (which then keeps a corrected U) on the packed case at chunk 16; "v3" (v2 state-gradient loop) and
# v2 (inverting WY kernel) on the ungated case
SAVED_RUNS = [("v3-light-dstates", *TRITON_RUNS[0], True), ("v3-light-dstates", *TRITON_RUNS[2], False),
              ("v3-light-dstates", *TRITON_RUNS[4], True), ("v3-light", *TRITON_RUNS[1], True),
              ("v3", *TRITON_RUNS[2], False), ("v2", *TRITON_RUNS[2], True)]


@pytest.mark.parametrize(("version", "case", "chunk", "with_dht"), SAVED_RUNS)
def test_triton_backward_from_saved_forward_matches_naive(case, chunk, version, with_dht, monkeypatch):
    """Forward with save=True (o, final state checked too), then the backward from the kept buffers, with the
    recompute's kernels replaced by `_NotLaunched`: every gradient against the naive recurrence."""
    launchers, forward = load_launchers(BACKWARD), load_launchers(FORWARD)
    _select_backward(launchers, version, monkeypatch)

    def inputs(dtype, device):
        q, k, v, beta, g, h0, cu = make_inputs(dtype, device, **case)
        do, dht = output_grads((q, k, v, beta, g, h0, cu))
        return do.to(dtype), dht if with_dht else dht.new_zeros(dht.shape), q, k, v, beta, g, h0, cu

    def launcher(do, dht, q, k, v, beta, g, h0, cu):
        o, final, saved = forward.chunk_forward(q, k, v, beta, g, 0.3, h0, cu, chunk, save=True)
        with monkeypatch.context() as patch:
            for name in ("_prepare_kernel", "_states_kernel", "_fix_u_kernel"):
                patch.setattr(forward, name, _NotLaunched())
            grads = launchers.chunk_backward(do, dht if with_dht else dht.new_empty(0), q, k, v, beta, g, 0.3, h0,
                                             cu, chunk, saved=saved)
        return o, final, *grads

    def reference(do, dht, q, k, v, beta, g, h0, cu):
        o, final, grads = naive_grads((q, k, v, beta, g, h0, cu), 0.3, do, dht)
        return o, final, *grads

    check_launcher(launcher, reference, inputs, trials=1)


def test_kept_buffers_match_the_fake_shapes():
    """The buffers chunk_forward(save=True) returns have the shapes the op's fake gives on CUDA (`kept_shapes`,
    whose bytes are the documented memory cost), dense and packed; without save nothing more is returned."""
    forward = load_launchers(FORWARD)
    for case in (TRITON_CASES[0], TRITON_CASES[1]):
        q, k, v, beta, g, h0, cu = make_inputs(torch.float32, kernel_device(), **case)
        kept = forward.chunk_forward(q, k, v, beta, g, 0.3, h0, cu, save=True)[2]
        kept = [x if x is not None else q.new_empty(0) for x in kept]
        assert [tuple(x.shape) for x in kept] == delta_op.kept_shapes(q, k, v, g, cu)
        assert all(x.dtype == torch.float32 for x in kept)
        batch, length, kv_heads, dk, dv = *q.shape[:2], k.shape[2], k.shape[-1], v.shape[-1]
        per_seq = -(-length // 64)
        n_c = batch * per_seq if cu is None else per_seq + cu.numel() - 1
        expected = 4 * kv_heads * (batch * length * (dk + dv + (g is not None)) + n_c * (dk * dv + 64 * 64))
        assert sum(x.numel() * 4 for x in kept) == expected


def test_saving_only_when_autograd_needs_it(monkeypatch):
    """With SAVE_FOR_BACKWARD on, inference (no grad mode, or no input requiring grad) runs rewrite::delta_rule
    (nothing kept); training runs rewrite::delta_rule_saving; switched off, always rewrite::delta_rule."""
    q, k, v, beta, g, h0, cu = make_inputs(torch.float32, "cpu", **CASES[1])
    monkeypatch.setattr(delta_op, "SAVE_FOR_BACKWARD", True)
    call = lambda: delta_rule(q, k, v, beta, g, initial_state=h0, cu_seqlens=cu)  # noqa: E731
    assert rewrite_ops_called(call) == {"rewrite::delta_rule"}
    q.requires_grad_()
    with torch.no_grad():
        assert rewrite_ops_called(call) == {"rewrite::delta_rule"}
    with torch.inference_mode():
        assert rewrite_ops_called(call) == {"rewrite::delta_rule"}
    assert rewrite_ops_called(call) == {"rewrite::delta_rule_saving"}
    monkeypatch.setattr(delta_op, "SAVE_FOR_BACKWARD", False)
    assert rewrite_ops_called(call) == {"rewrite::delta_rule"}


@pytest.mark.parametrize("save", [False, True])
def test_op_grads_without_final_state(save, monkeypatch):
    """Only o used: the final state's gradient is not materialised (d final state empty), with and without the kept
    buffers (on the CPU the reference backward ignores them)."""
    monkeypatch.setattr(delta_op, "SAVE_FOR_BACKWARD", save)
    inputs = make_inputs(torch.float64, "cpu", **CASES[1])
    do, dht = output_grads(inputs)
    _, _, grads_ref = naive_grads(inputs, 0.3, do, torch.zeros_like(dht))
    q, k, v, beta, g, h0, cu = inputs
    leaves = [None if x is None else x.clone().requires_grad_() for x in (q, k, v, beta, g, h0)]
    o, _ = delta_rule(*leaves[:5], scale=0.3, initial_state=leaves[5], cu_seqlens=cu)
    present = [x for x in leaves if x is not None]
    grads = iter(torch.autograd.grad(o, present, do))
    for name, leaf, expected in zip(NAMES, leaves, grads_ref):
        if leaf is not None:
            assert_close(next(grads), expected, 1e-10, name)


@pytest.mark.parametrize("gated", [True, False])
def test_triton_step_matches_naive(gated):
    launchers = load_launchers(STEP)

    def inputs(dtype, device):
        q, k, v, beta, g, h0, _ = make_inputs(dtype, device, batch=2, length=3, dk=24, dv=40, gated=gated,
                                              beta_max=2.0)
        return q, k, v, beta, g, h0

    check_launcher(
        lambda q, k, v, beta, g, h0: launchers.recurrent_step(q, k, v, beta, g, 0.3, h0.float()),
        lambda q, k, v, beta, g, h0: _naive_for_launcher(q, k, v, beta, g, h0, None),
        inputs,
        trials=1,
    )


def test_opcheck():
    q, k, v, beta, g, h0, cu = make_inputs(torch.float32, "cpu", **CASES[1])
    args = [x.requires_grad_() for x in (q, k, v, beta)]
    torch.library.opcheck(torch.ops.rewrite.delta_rule, (*args, None, 0.3, h0.requires_grad_(), cu))
    q, k, v, beta, g, h0, _ = make_inputs(torch.float32, "cpu", length=5)
    o, final = torch.ops.rewrite.delta_rule(q, k, v, beta, g, 0.3, h0, None)
    torch.library.opcheck(torch.ops.rewrite.delta_rule_backward,
                          (torch.randn_like(o), torch.randn_like(final), q, k, v, beta, g, 0.3, h0, None))
    torch.library.opcheck(torch.ops.rewrite.delta_rule_backward,  # d final state empty: zeros
                          (torch.randn_like(o), final.new_empty(0), q, k, v, beta, g, 0.3, h0, None))
    # the forward that keeps W, U, b, h, T for the backward (SAVE_FOR_BACKWARD), and the backward taking them
    torch.library.opcheck(torch.ops.rewrite.delta_rule_saving,
                          (*(x.clone().requires_grad_() for x in (q, k, v, beta, g)), 0.3, h0.clone().requires_grad_(),
                           None))
    kept = torch.ops.rewrite.delta_rule_saving(q, k, v, beta, g, 0.3, h0, None)[2:]
    torch.library.opcheck(torch.ops.rewrite.delta_rule_backward_saved,
                          (torch.randn_like(o), torch.randn_like(final), q, k, v, beta, g, 0.3, h0, None, *kept))
    torch.library.opcheck(torch.ops.rewrite.delta_rule_step, (q[:, :2], k[:, :2], v[:, :2], beta[:, :2], g[:, :2], 0.3, h0))


class Mixer(torch.nn.Module):
    def forward(self, q, k, v, beta, g):
        o, final = delta_rule(q * 2, F.normalize(k, dim=-1), v, beta.sigmoid(), g, output_final_state=True)
        return o + 1, final


@pytest.mark.parametrize("save", [False, True])
def test_compile_fullgraph_without_graph_breaks(save, monkeypatch):
    monkeypatch.setattr(delta_op, "SAVE_FOR_BACKWARD", save)
    q, k, v, beta, g, _, _ = make_inputs(torch.float32, "cpu", length=9)
    q.requires_grad_()
    compiled = torch.compile(Mixer(), fullgraph=True, backend="aot_eager")
    o, final = compiled(q, k, v, beta, g)
    (o.sum() + (0 if save else final.sum())).backward()  # with save: the final state unused (no gradient for it)
    grad = q.grad
    q.grad = None
    o_ref, final_ref = Mixer()(q, k, v, beta, g)
    (o_ref.sum() + (0 if save else final_ref.sum())).backward()
    assert_close(o, o_ref, 1e-6)
    assert_close(final, final_ref, 1e-6)
    assert_close(grad, q.grad, 1e-6, "dq")


class ProjectedMixer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, q, k, v, beta, g):
        return delta_rule(self.proj(q), k, v, beta, g)[0]


@pytest.mark.parametrize("save", [False, True])
def test_export_runs_and_matches(save, monkeypatch):
    """torch.export of a module whose parameters require grad: with SAVE_FOR_BACKWARD the graph holds
    rewrite::delta_rule_saving (training), else rewrite::delta_rule; both run and match eager."""
    monkeypatch.setattr(delta_op, "SAVE_FOR_BACKWARD", save)
    q, k, v, beta, g, _, _ = make_inputs(torch.float32, "cpu", length=9)
    module = ProjectedMixer()
    program = torch.export.export(module, (q, k, v, beta, g))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert ("rewrite.delta_rule_saving.default" in targets) == save
    assert_close(program.module()(q, k, v, beta, g), module(q, k, v, beta, g), 1e-6)


@gpu
@pytest.mark.parametrize("version", [*BACKWARD_VERSIONS, *SAVED_VERSIONS])
def test_cuda_bfloat16_against_float64(version, monkeypatch):
    _select_backward(load_launchers(BACKWARD), version, monkeypatch)
    inputs = make_inputs(torch.bfloat16, kernel_device(), batch=1, length=700, heads=8, kv_heads=4, dk=128, dv=128,
                         cu_seqlens=[0, 1, 300, 699, 700])
    q, k, v, beta, g, h0, cu = inputs
    leaves = [x.clone().requires_grad_() for x in (q, k, v, beta, g, h0)]
    o, final = delta_rule(*leaves[:5], initial_state=leaves[5], output_final_state=True, cu_seqlens=cu)
    do, dht = torch.randn_like(o), torch.randn_like(final)
    grads = torch.autograd.grad((o, final), leaves, (do, dht))
    inputs64 = [None if x is None else x.double() for x in inputs[:6]] + [cu]
    o64, final64, grads64 = naive_grads(inputs64, 128**-0.5, do.double(), dht.double())
    assert_close(o, o64, 1e-2, "o")
    assert_close(final, final64, 1e-2, "final state")
    for name, a, e in zip(NAMES, grads, grads64):
        assert_close(a, e, 1e-2, name)
    if version != "v2":
        return  # the decode step below does not depend on the backward version
    o_step, state = delta_rule_step(q[:, :5], k[:, :5], v[:, :5], beta[:, :5], g[:, :5], state=h0[:1])
    o_ref, state_ref = naive_delta_rule(*[x[:, :5].double() for x in (q, k, v, beta, g)], initial_state=h0[:1])
    assert_close(o_step, o_ref, 1e-2, "step o")
    assert_close(state, state_ref, 1e-2, "step state")


@gpu
def test_cuda_kept_buffers_memory_and_opcheck(monkeypatch):
    """SAVE_FOR_BACKWARD on CUDA: no grad -> no memory held after the forward (same as off); with grad -> exactly the
    kept buffers' bytes (`kept_shapes`, the documented cost), gradients equal to the recompute's; opcheck of the two
    ops on CUDA (fake shapes against the Triton buffers); the kept buffers equal the recompute's, so the gradients
    are bitwise those of the recompute."""
    device = kernel_device()
    q, k, v, beta, g, h0, cu = make_inputs(torch.bfloat16, device, batch=1, length=300, heads=4, kv_heads=2, dk=64,
                                           dv=64, cu_seqlens=[0, 1, 150, 299, 300])
    kept_bytes = sum(4 * torch.Size(shape).numel() for shape in delta_op.kept_shapes(q, k, v, g, cu))

    def held(save, grad):
        monkeypatch.setattr(delta_op, "SAVE_FOR_BACKWARD", save)
        leaves = [x.clone().requires_grad_(grad) for x in (q, k, v, beta, g, h0)]
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        o, _ = delta_rule(*leaves[:5], initial_state=leaves[5], cu_seqlens=cu)
        torch.cuda.synchronize()
        extra = torch.cuda.memory_allocated() - start - o.numel() * o.element_size()
        grads = torch.autograd.grad(o, leaves, torch.ones_like(o)) if grad else None
        return extra, grads

    held(False, True), held(True, True)  # compiles first
    with torch.no_grad():
        assert held(True, False)[0] == held(False, False)[0] == 0
    assert held(True, False)[0] == 0  # grad mode on, nothing requires grad
    extra_on, grads_on = held(True, True)
    extra_off, grads_off = held(False, True)
    assert extra_off == 0
    # the caching allocator rounds each of the 5 buffers up (512 B; a block is not split for less than 1 MiB left)
    assert kept_bytes <= extra_on < kept_bytes + 5 * 2**20
    for name, a, b in zip(NAMES, grads_on, grads_off):
        assert torch.equal(a, b), name  # the kept buffers are what the recompute forms (same kernels, no atomics)
    q, k, v, beta, g, h0, _ = make_inputs(torch.float32, device, length=70, dk=16, dv=16)
    torch.library.opcheck(torch.ops.rewrite.delta_rule_saving,
                          (*(x.requires_grad_() for x in (q, k, v, beta, g)), 0.3, h0.requires_grad_(), None))
    o, final, *kept = torch.ops.rewrite.delta_rule_saving(q, k, v, beta, g, 0.3, h0, None)
    assert all(x.numel() > 0 for x in kept)
    torch.library.opcheck(torch.ops.rewrite.delta_rule_backward_saved,
                          (torch.randn_like(o), final.new_empty(0), q, k, v, beta, g, 0.3, h0, None, *kept))
