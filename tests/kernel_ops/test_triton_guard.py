"""Without triton installed, the Triton paths raise a clear error (CPU paths never import triton)."""

import pytest

from rewrite.kernels import _triton


def test_missing_triton_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(_triton, "TRITON_AVAILABLE", False)
    with pytest.raises(RuntimeError, match="needs the 'triton' package"):
        _triton.load_triton_module("rewrite.kernels.rms_norm.triton_kernels")
