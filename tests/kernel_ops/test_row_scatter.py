"""rewrite::add_rows_into_: the Triton launcher (the sum rounded once into the target's dtype, rows far apart)
against PyTorch's add then index_copy_, the op's fallbacks and checks, opcheck."""

import pytest
import torch

import rewrite.kernels  # noqa: F401  (registers the ops)
from rewrite.kernels import add_rows_into_
from rewrite.kernels.testing import kernel_device, load_launchers

LAUNCHERS = "rewrite.kernels.row_scatter.triton_kernels"


def added_then_copied(target: torch.Tensor, rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row by row: target[rows[i]] = a[i] + b[i] in the tensors' dtype (PyTorch's add), on a copy of target."""
    out = target.clone()
    for i, row in enumerate(rows.tolist()):
        out[row] = (a[i] + b[i]).to(out.dtype)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [[3, 0, 5], [4], [], list(range(6))], ids=["some", "one", "none", "all"])
def test_launcher_writes_the_sum_of_each_row_like_add_then_copy(dtype, rows):
    launchers = load_launchers(LAUNCHERS)
    device = kernel_device()
    torch.manual_seed(len(rows))
    target = torch.randn(6, 1, 2100, device=device).to(dtype)  # a decode step's hidden state, wider than one block
    index = torch.tensor(rows, dtype=torch.long, device=device)
    a, b = (torch.randn(len(rows), 1, 2100, device=device).mul(40).to(dtype) for _ in range(2))
    expected = added_then_copied(target, index, a, b)
    launchers.add_rows_into_forward(target, index, a, b)
    assert torch.equal(target, expected), f"{(target != expected).sum().item()} elements differ"


def test_launcher_writes_rows_that_are_far_apart_and_leaves_the_rest():
    """A target whose rows are a view into a wider tensor: only the chosen rows' own elements change."""
    launchers = load_launchers(LAUNCHERS)
    device = kernel_device()
    whole = torch.randn(7, 3, 40, device=device)
    before = whole.clone()
    view = whole[:, 1, 4:20]
    index = torch.tensor([6, 1], dtype=torch.long, device=device)
    a, b = torch.randn(2, 16, device=device), torch.randn(2, 16, device=device)
    launchers.add_rows_into_forward(view, index, a, b)
    expected = before.clone()
    expected[:, 1, 4:20] = added_then_copied(before[:, 1, 4:20], index, a, b)
    assert torch.equal(whole, expected)


def test_op_takes_any_layout_and_mixed_dtypes_as_add_then_copy():
    """What the kernel does not take (transposed addends, a bf16 target of float32 addends: two roundings) goes
    through add and index_copy_, with their results."""
    device = kernel_device()
    torch.manual_seed(0)
    rows = torch.tensor([2, 0], dtype=torch.long, device=device)
    target = torch.randn(4, 5, 3, device=device)
    a = torch.randn(2, 3, 5, device=device).transpose(1, 2)
    b = torch.randn(2, 5, 3, device=device)
    expected = target.index_copy(0, rows, a + b)
    assert add_rows_into_(target, rows, a, b) is target and torch.equal(target, expected)
    target = torch.randn(4, 8, device=device).to(torch.bfloat16)
    a, b = torch.randn(2, 8, device=device), torch.randn(2, 8, device=device)
    expected = target.index_copy(0, rows, (a + b).to(torch.bfloat16))
    add_rows_into_(target, rows, a, b)
    assert torch.equal(target, expected)


def test_bad_inputs_are_refused():
    target, rows = torch.randn(4, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="1-D int64"):
        add_rows_into_(target, rows.int(), torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"b must have shape \(2, 3\)"):
        add_rows_into_(target, rows, torch.randn(2, 3), torch.randn(2, 1))


def test_opcheck():
    target, rows = torch.randn(4, 3), torch.tensor([3, 1], dtype=torch.long)
    torch.library.opcheck(torch.ops.rewrite.add_rows_into_, (target, rows, torch.randn(2, 3), torch.randn(2, 3)))
