"""Launch shapes that fit the device (`rewrite.kernels.fitting_blocks`): the ladder of smaller blocks, the remembered
fit, and the sliding-window and split-KV decode launchers falling back when the tuned blocks need more shared memory
than the GPU has (an H100 refused the sliding-window dk / dv kernel's tuned blocks at a head dim of 256: 262656 bytes
needed, 232448 there; an sm_90 compile gives the split-KV decode kernel 274432 bytes at head dim 256)."""

import pytest
import torch

pytest.importorskip("triton")
from triton.runtime.errors import OutOfResources  # noqa: E402

from rewrite.kernels import fitting_blocks  # noqa: E402
from rewrite.kernels.fitting_blocks import launch_fitting, shrinking  # noqa: E402
from rewrite.kernels.kv_cache_attention.reference import kv_cache_attention_reference  # noqa: E402
from rewrite.kernels.sliding_window.reference import (  # noqa: E402
    sliding_window_backward_reference,
    sliding_window_reference,
)
from rewrite.kernels.testing import assert_close, kernel_device, load_launchers  # noqa: E402


def test_shrinking_drops_stages_then_halves_the_larger_block():
    ladder = list(shrinking((64, 128, 8, 3)))
    assert ladder[:5] == [(64, 128, 8, 3), (64, 128, 8, 2), (64, 128, 8, 1), (64, 64, 4, 2), (64, 64, 4, 1)]
    assert ladder[5:7] == [(64, 32, 4, 2), (64, 32, 4, 1)]
    assert ladder[-2:] == [(16, 16, 4, 2), (16, 16, 4, 1)]
    assert len(ladder) == len(set(ladder))
    rows_kept = list(shrinking((32, 128, 4, 3), halve_m=False))
    assert rows_kept[:3] == [(32, 128, 4, 3), (32, 128, 4, 2), (32, 128, 4, 1)]
    assert {bm for bm, *_ in rows_kept} == {32} and rows_kept[-1] == (32, 16, 4, 1)


def _shared_bytes(blocks) -> int:
    bm, bn, _, stages = blocks
    return (bm + bn) * 256 * 2 * stages


def test_launch_fitting_takes_the_first_shape_that_fits_and_remembers_it(monkeypatch):
    monkeypatch.setattr(fitting_blocks, "_FITTED", {})
    tried = []

    def launch(blocks):
        tried.append(blocks)
        if _shared_bytes(blocks) > 90_000:
            raise OutOfResources(_shared_bytes(blocks), 90_000, "shared memory")
        return blocks

    fit = launch_fitting("case", (64, 128, 8, 2), launch)
    assert fit == (64, 64, 4, 1) and _shared_bytes(fit) <= 90_000
    assert tried == [(64, 128, 8, 2), (64, 128, 8, 1), (64, 64, 4, 2), (64, 64, 4, 1)]
    tried.clear()
    assert launch_fitting("case", (64, 128, 8, 2), launch) == fit and tried == [fit]  # remembered
    assert launch_fitting("other", (32, 32, 4, 1), launch) == (32, 32, 4, 1)
    with pytest.raises(OutOfResources):
        launch_fitting("never", (64, 64, 4, 2), lambda blocks: launch((10**6, 1, 4, 2)))


def _refusing(kernel, limit_n: int, limit_stages: int = 8):
    """The jitted `kernel` as its launchers index it, refusing (OutOfResources) any BLOCK_N above `limit_n` or more
    pipeline stages than `limit_stages`."""

    class Refusing:
        arg_names = kernel.arg_names

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                if kwargs["BLOCK_N"] > limit_n or kwargs["num_stages"] > limit_stages:
                    raise OutOfResources(262656, 232448, "shared memory")
                return kernel[grid](*args, **kwargs)

            return run

    return Refusing()


def test_sliding_window_launchers_fall_back_to_blocks_that_fit(monkeypatch):
    """Forward and backward launchers whose tuned blocks are refused run smaller ones (their grids follow the
    blocks) and still match the float64 reference, packed sequences and sinks included."""
    forward = load_launchers("rewrite.kernels.sliding_window.triton_forward")
    backward = load_launchers("rewrite.kernels.sliding_window.triton_backward")
    monkeypatch.setattr(fitting_blocks, "_FITTED", {})
    monkeypatch.setattr(forward, "_forward_kernel", _refusing(forward._forward_kernel, 16))
    monkeypatch.setattr(backward, "_dq_kernel", _refusing(backward._dq_kernel, 16))
    monkeypatch.setattr(backward, "_dkdv_kernel", _refusing(backward._dkdv_kernel, 16))
    device = kernel_device()
    torch.manual_seed(0)
    length, window, sinks, scale = 45, 7, 2, 0.3
    q, k, v = (torch.randn(1, length, heads, 16, device=device) for heads in (4, 2, 2))
    cu = torch.tensor([0, 3, 30, 45], dtype=torch.int32, device=device)
    o, lse = forward.sliding_window_forward(q, k, v, window, sinks, scale, cu, 32, 32, 4, 2)
    do = torch.randn_like(o)
    grads = backward.sliding_window_backward(do, q, k, v, o, lse, window, sinks, scale, cu, (32, 32, 4, 2),
                                             (32, 32, 4, 2))
    assert sorted(b for key, b in fitting_blocks._FITTED.items()) == [(32, 16, 4, 2)] * 3
    d = [x.double().cpu() for x in (q, k, v)]
    o64, lse64 = sliding_window_reference(*d, window, sinks, scale, cu.cpu())
    assert_close(o.cpu(), o64, 1e-4, "o")
    assert_close(lse.cpu(), lse64, 1e-4, "lse")
    for name, got, want in zip(("dq", "dk", "dv"), grads,
                               sliding_window_backward_reference(do.double().cpu(), *d, window, sinks, scale,
                                                                 cu.cpu())):
        assert_close(got.cpu(), want, 1e-4, name)


def test_split_kv_decode_launcher_falls_back_to_blocks_that_fit(monkeypatch):
    """The split-KV decode kernel refused at its tuned 3 stages and 128-slot tiles runs 2 stages and 64-slot tiles
    (its query rows, BM, never shrink) and matches the reference over a GQA cache with ragged rows."""
    decode = load_launchers("rewrite.kernels.kv_cache_attention.triton_decode")
    monkeypatch.setattr(fitting_blocks, "_FITTED", {})
    monkeypatch.setattr(decode, "_split_kernel", _refusing(decode._split_kernel, 64, 2))
    device = kernel_device()
    torch.manual_seed(0)
    batch, heads, kv_heads, count, slots = 2, 4, 2, 2, 300
    q = torch.randn(batch, heads, count, 32, device=device)
    keys, values = (torch.randn(batch, kv_heads, slots, 32, device=device) for _ in range(2))
    visible = torch.ones(batch, 1, count, slots, dtype=torch.bool, device=device)
    visible[1, ..., 200:] = False
    visible[:, :, 0, -1] = False  # the first new token does not see the second
    o = decode.kv_cache_attention_decode(q, keys, values, visible, 0.3)
    (fit,) = fitting_blocks._FITTED.values()
    assert fit[1:] == (64, decode.NUM_WARPS, 2) and fit[0] == 16
    want = kv_cache_attention_reference(q.double().cpu(), keys.double().cpu(), values.double().cpu(),
                                        visible.cpu(), 0.3)
    assert_close(o.cpu(), want, 1e-4, "o")
