"""Without CUDA, Triton kernels in these tests run in Triton's interpreter on CPU tensors."""

import os

import torch

if not torch.cuda.is_available():
    # Triton reads this when @triton.jit runs, so it must be set before kernel modules are imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
