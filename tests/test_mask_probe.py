"""The mask probe's checks (causal, exactly causal, additive bias, per-head bias) against dense computations
written here, and their memory: a [.., L, L] mask is read in row blocks, never copied whole (a torch.compile
call at 128K tokens probes a 16 GiB mask; a dense check needed 128 GiB)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rewrite.analysis import mask_probe

L = 96
NEG = torch.finfo(torch.float32).min


def _dense_facts(visible: torch.Tensor) -> tuple[bool, bool]:
    """(hides every future key, equals the causal mask) of a boolean [.., L, L] mask, in one dense step."""
    lower = torch.ones(L, L, dtype=torch.bool).tril()
    hides = not bool(visible[..., ~lower].any())
    return hides, hides and bool(visible[..., lower].all())


def _masks() -> dict[str, torch.Tensor]:
    """Boolean [1, 2, L, L] masks: causal, causal with padding, a window, full, causal with one future key."""
    causal = torch.ones(L, L, dtype=torch.bool).tril().expand(1, 2, L, L).clone()
    padded = causal.clone()
    padded[..., :, :5] = False
    window = causal & ~torch.ones(L, L, dtype=torch.bool).tril(-17)
    leaky = causal.clone()
    leaky[0, 1, L - 10, L - 3] = True
    return {"causal": causal, "padded": padded, "window": window, "full": torch.ones(1, 2, L, L, dtype=torch.bool),
            "leaky": leaky}


@pytest.fixture
def small_blocks(monkeypatch):
    """Row blocks of 7 rows of the [1, 2, L, L] masks (not dividing L), so every check crosses blocks."""
    monkeypatch.setattr(mask_probe, "PROBE_BLOCK_ELEMENTS", 7 * 2 * L)


@pytest.mark.parametrize("name", list(_masks()))
@pytest.mark.parametrize("as_float", [False, True])
def test_causality_matches_the_dense_check(small_blocks, name, as_float):
    visible = _masks()[name]
    mask = torch.zeros(visible.shape).masked_fill(~visible, NEG) if as_float else visible
    assert mask_probe._causality(mask) == _dense_facts(visible)


def test_bias_checks_match_dense_comparisons(small_blocks):
    causal = _masks()["causal"]
    plain = torch.zeros(1, 2, L, L).masked_fill(~causal, NEG)
    distance = (torch.arange(L)[None, :] - torch.arange(L)[:, None]).float()
    same_bias = plain + torch.where(causal, 0.25 * distance, torch.zeros(()))
    alibi = plain + torch.where(causal, distance * torch.tensor([0.5, 0.25])[:, None, None], torch.zeros(()))
    late_bias = plain.clone()
    late_bias[0, 0, L - 1, 3] = 0.5  # one biased element in the last row block
    for mask in (plain, same_bias, alibi, late_bias):
        dense_bias = bool(((mask != 0) & (mask > mask_probe.HIDDEN_BELOW)).any())
        assert mask_probe.holds_bias(mask) == dense_bias
    assert mask_probe.mask_bias_description(plain) is None
    assert "differs per head" in mask_probe.mask_bias_description(alibi)
    assert "differs per head" not in mask_probe.mask_bias_description(same_bias)
    assert "differs per head" in mask_probe.mask_bias_description(late_bias)


class _LargestOutput(TorchDispatchMode):
    """The most elements any op's output held (views of the mask included)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


def test_checks_hold_no_mask_sized_temporaries(small_blocks):
    """Every tensor the checks make is at most one row block: no [L, L] causal mask, no index list of the
    visible positions."""
    causal = _masks()["causal"]
    mask = torch.zeros(causal.shape).masked_fill(~causal, NEG)
    mask[0, 1, 50, 2] = 0.5  # a bias: the per-head comparison runs too
    block = mask_probe.PROBE_BLOCK_ELEMENTS
    with _LargestOutput() as seen:
        mask_probe._causality(mask)
        mask_probe._causality(causal)
        mask_probe.mask_bias_description(mask)
    assert seen.largest <= block < mask.numel() // 10


def test_sequence_causal_reads_a_mask_expanded_over_heads_without_copying_it(small_blocks):
    """A padded causal mask expanded over 8 heads: the check's answer is that of one head, and no tensor it makes
    holds the heads' repeats."""
    visible = _masks()["padded"][:, :1]
    expanded = visible.expand(1, 8, L, L)
    with _LargestOutput() as seen:
        assert mask_probe.sequence_causal(expanded)
    assert seen.largest < expanded.numel()
    assert not mask_probe.sequence_causal(_masks()["window"][:, :1].expand(1, 8, L, L))
