"""Every example runs at tiny size."""

import torch

from examples import demo


def test_demo_optimizes_minilm_and_matches_original(capsys):
    om = demo.main(["--batch", "2", "--length", "16", "--runs", "2"])
    out = capsys.readouterr().out
    assert "attention_normalize: matched 6, changed 6" in out
    assert "varlen bidirectional attention" in out and "real tokens" in out
    assert "optimized" in out and "original" in out
    assert om.verification.passed
    assert isinstance(om.code, str) and "encoder" in om.code
    assert all(torch.isfinite(p).all() for p in om.parameters())
