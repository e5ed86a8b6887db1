"""rewrite::gather_rows: the Triton launcher (one launch for up to six tensors of any dtype, expanded and strided
rows) against rows picked one by one, the op's checks, opcheck and compile."""

import pytest
import torch

import rewrite.kernels  # noqa: F401  (registers the ops)
from rewrite.kernels import gather_rows
from rewrite.kernels.alloc import poisoned
from rewrite.kernels.launch_math import rows_are_contiguous
from rewrite.kernels.testing import kernel_device, load_launchers

LAUNCHERS = "rewrite.kernels.row_gather.triton_kernels"


def picked_one_by_one(value: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return torch.stack([value[int(i)] for i in rows.tolist()]) if len(rows) else value[:0].clone()


def decode_step_inputs(batch: int, device) -> list[torch.Tensor]:
    """What a routed block gathers at a decode step: hidden [B, 1, H] (bf16), cos / sin [B, 1, D], a boolean mask
    expanded along the batch, an int64 [B, 3] and a float32 of odd width."""
    hidden = torch.randn(batch, 1, 2100, device=device).to(torch.bfloat16)
    cos, sin = torch.randn(2, batch, 1, 72, device=device).to(torch.float16).unbind(0)
    mask = (torch.rand(1, 1, 1, 37, device=device) > 0.5).expand(batch, -1, -1, -1)
    ints = torch.randint(-5, 5, (batch, 3), device=device)
    odd = torch.randn(batch, 5, 3, device=device)
    return [hidden, cos, sin, mask, ints, odd]


@pytest.mark.parametrize("rows", [[0, 2, 3], [5], [], list(range(6))], ids=["some", "one", "none", "all"])
def test_launcher_gathers_every_tensor_like_picking_rows(rows):
    launchers = load_launchers(LAUNCHERS)
    device = kernel_device()
    torch.manual_seed(len(rows))
    values = decode_step_inputs(6, device) + decode_step_inputs(6, device)[:2]
    index = torch.tensor(rows, dtype=torch.long, device=device)
    with poisoned():
        got = launchers.gather_rows_forward(values, index)  # eight tensors: two launches (six, then two)
    for i, (value, out) in enumerate(zip(values, got, strict=True)):
        expected = picked_one_by_one(value, index)
        assert out.is_contiguous() and out.dtype == value.dtype, i
        assert torch.equal(out, expected), f"value {i}: {(out != expected).sum().item()} elements differ"


def test_launcher_reads_rows_that_are_far_apart():
    """Rows of a view into a wider tensor (the row stride is not the row's width)."""
    launchers = load_launchers(LAUNCHERS)
    device = kernel_device()
    whole = torch.randn(7, 3, 40, device=device)
    view = whole[:, 1, 4:20]
    assert rows_are_contiguous(view) and view.stride(0) == 120
    index = torch.tensor([6, 1, 4], dtype=torch.long, device=device)
    with poisoned():
        (got,) = launchers.gather_rows_forward([view], index)
    assert torch.equal(got, picked_one_by_one(view, index))


def test_rows_are_contiguous_tells_which_tensors_the_kernel_can_read():
    x = torch.randn(4, 3, 5)
    assert rows_are_contiguous(x)
    assert rows_are_contiguous(x[:, :1])
    assert rows_are_contiguous(torch.randn(1, 5).expand(4, 5))
    assert not rows_are_contiguous(x.transpose(1, 2))
    assert not rows_are_contiguous(x[:, :, ::2])


def test_op_equals_index_select_for_any_layout():
    device = kernel_device()
    torch.manual_seed(0)
    values = [*decode_step_inputs(5, device), torch.randn(5, 4, 6, device=device).transpose(1, 2)]
    rows = torch.tensor([1, 3, 4], dtype=torch.long, device=device)
    got = gather_rows(values, rows)
    for value, out in zip(values, got, strict=True):
        assert torch.equal(out, value.index_select(0, rows))


def test_bad_inputs_are_refused():
    rows = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="1-D int64"):
        gather_rows([torch.randn(3, 2)], rows.int())
    with pytest.raises(ValueError, match="value 1 is a scalar"):
        gather_rows([torch.randn(3, 2), torch.tensor(1.0)], rows)


def test_opcheck_and_compile():
    values = [torch.randn(4, 3), torch.randint(0, 9, (4, 2, 2)), torch.rand(4, 1) > 0.5]
    rows = torch.tensor([0, 2], dtype=torch.long)
    torch.library.opcheck(torch.ops.rewrite.gather_rows, (values, rows))
    compiled = torch.compile(lambda vs, r: [v * 1 for v in gather_rows(vs, r)], fullgraph=True, backend="eager")
    for out, value in zip(compiled(values, rows), values, strict=True):
        assert torch.equal(out, value.index_select(0, rows) * 1)
