"""rewrite::varlen_attention: op vs per-sequence SDPA, Triton launchers vs the reference, checks, opcheck."""

import pytest
import torch
import torch.nn.functional as F

from rewrite.kernels.testing import assert_close, check_launcher, kernel_device, load_launchers
from rewrite.kernels.varlen_attention import varlen_attention
from rewrite.kernels.varlen_attention.reference import (
    varlen_attention_backward_reference,
    varlen_attention_reference,
)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
FORWARD = "rewrite.kernels.varlen_attention.triton_forward"
BACKWARD = "rewrite.kernels.varlen_attention.triton_backward"


def per_sequence_sdpa(q, k, v, cu_seqlens, causal, scale):
    """Each sequence on its own through PyTorch's SDPA (GQA by repeating kv heads)."""
    group = q.shape[1] // k.shape[1]
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds, bounds[1:]):
        if end == start:
            continue
        qs = q[start:end].transpose(0, 1)
        ks = k[start:end].repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[start:end].repeat_interleave(group, dim=1).transpose(0, 1)
        out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale).transpose(0, 1)
    return out


def make_inputs(dtype, device, lengths=(5, 1, 0, 17, 9), heads=4, kv_heads=2, dk=16, dv=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(total, heads, dk, generator=g).to(dtype=dtype, device=device)
    k = torch.randn(total, kv_heads, dk, generator=g).to(dtype=dtype, device=device)
    v = torch.randn(total, kv_heads, dv, generator=g).to(dtype=dtype, device=device)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, cu


@pytest.mark.parametrize("causal", [False, True])
def test_op_output_and_grads_match_per_sequence_sdpa(causal):
    q, k, v, cu = make_inputs(torch.float64, "cpu")
    do = torch.randn(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o = varlen_attention(*leaves, cu, causal=causal, scale=0.3)
    grads = torch.autograd.grad(o, leaves, do)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o_ref = per_sequence_sdpa(*ref_leaves, cu, causal, 0.3)
    ref_grads = torch.autograd.grad(o_ref, ref_leaves, do)
    assert_close(o, o_ref, 1e-12, "o")
    for name, a, e in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(a, e, 1e-12, name)


def test_sequences_do_not_see_each_other():
    q, k, v, cu = make_inputs(torch.float64, "cpu", lengths=(4, 6))
    base = varlen_attention(q, k, v, cu)
    v2 = v.clone()
    v2[4:] += 10.0  # change only the second sequence
    changed = varlen_attention(q, k, v2, cu)
    assert torch.equal(base[:4], changed[:4])
    assert not torch.allclose(base[4:], changed[4:])


def test_argument_errors_name_the_argument():
    q, k, v, cu = make_inputs(torch.float32, "cpu", lengths=(3, 4))
    with pytest.raises(ValueError, match="cu_seqlens"):
        varlen_attention(q, k, v, torch.tensor([0, 3, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="heads"):
        varlen_attention(q, k[:, :1].expand(-1, 3, -1).contiguous(), v[:, :1].expand(-1, 3, -1).contiguous(), cu)
    with pytest.raises(ValueError, match="max_seqlen"):
        varlen_attention(q, k, v, cu, max_seqlen=2)
    with pytest.raises(ValueError, match="backend"):
        varlen_attention(q, k, v, cu, backend="fast")


def test_opcheck():
    q, k, v, cu = make_inputs(torch.float32, "cpu", lengths=(3, 5))
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), cu, 5, True, 0.25)
    torch.library.opcheck(torch.ops.rewrite.varlen_attention.default, args)


CASES = [
    dict(lengths=(5, 1, 0, 37, 9), heads=4, kv_heads=2, dk=16, dv=24),
    dict(lengths=(20, 3), heads=2, kv_heads=2, dk=32, dv=16),
    dict(lengths=(1,), heads=3, kv_heads=1, dk=8, dv=8),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("causal", [False, True])
def test_triton_forward_matches_reference(case, causal):
    launchers = load_launchers(FORWARD)

    def make(dtype, device):
        q, k, v, cu = make_inputs(dtype, device, **case)
        return q, k, v, cu, max(case["lengths"]), causal, 0.35

    def run(q, k, v, cu, max_len, causal_, scale):
        return launchers.varlen_attention_forward(q, k, v, cu, max_len, causal_, scale, block_m=16, block_n=16)

    def reference(q, k, v, cu, max_len, causal_, scale):
        return varlen_attention_reference(q, k, v, cu, causal_, scale)

    check_launcher(run, reference, make, trials=1)


@pytest.mark.parametrize("case", CASES[:2])
@pytest.mark.parametrize("causal", [False, True])
def test_triton_backward_matches_reference(case, causal):
    launchers = load_launchers(BACKWARD)

    def make(dtype, device):
        q, k, v, cu = make_inputs(dtype, device, **case)
        o, lse = varlen_attention_reference(q, k, v, cu, causal, 0.35)
        do = torch.randn_like(o)
        return do, q, k, v, o, lse, cu, max(case["lengths"]), causal, 0.35

    def run(do, q, k, v, o, lse, cu, max_len, causal_, scale):
        return launchers.varlen_attention_backward(
            do, q, k, v, o, lse, cu, max_len, causal_, scale, block_m=16, block_n=16
        )

    def reference(do, q, k, v, o, lse, cu, max_len, causal_, scale):
        return varlen_attention_backward_reference(do, q, k, v, o, lse, cu, causal_, scale)

    check_launcher(run, reference, make, dtypes=(torch.float32,), trials=1)


def test_triton_reads_strided_views():
    launchers = load_launchers(FORWARD)
    device = kernel_device()
    q, k, v, cu = make_inputs(torch.float32, device, lengths=(6, 11))
    heads_major = q.transpose(0, 1).contiguous().transpose(0, 1)  # same values, token stride 16, head stride T*16
    o, lse = launchers.varlen_attention_forward(heads_major, k, v, cu, 11, True, 0.25, block_m=16, block_n=16)
    o_ref, lse_ref = varlen_attention_reference(q.double(), k.double(), v.double(), cu, True, 0.25)
    assert_close(o, o_ref, 1e-5, "o")
    assert_close(lse, lse_ref, 1e-5, "lse")


@gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["kernel", "torch"])
def test_gpu_bf16_matches_float64(causal, backend):
    from rewrite.kernels.varlen_attention.torch_backend import torch_varlen_available

    q, k, v, cu = make_inputs(torch.bfloat16, "cuda", lengths=(300, 1, 77, 512, 0, 129), heads=8, kv_heads=2,
                              dk=64, dv=64)
    if backend == "torch" and not torch_varlen_available(q):
        pytest.skip("this PyTorch has no varlen_attn")
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o = varlen_attention(*leaves, cu, causal=causal, backend=backend)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, leaves, do)
    ref = [x.double().cpu().requires_grad_() for x in (q, k, v)]
    o_ref = per_sequence_sdpa(*ref, cu.cpu(), causal, 64**-0.5)
    ref_grads = torch.autograd.grad(o_ref, ref, do.double().cpu())
    assert_close(o.cpu(), o_ref, 2e-2, "o")
    for name, a, e in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(a.cpu(), e, 3e-2, name)
