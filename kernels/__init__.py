"""Kernel ops of torch-rewrite. Importing this package registers every op under `torch.ops.rewrite`.

Each op has a CPU implementation in plain PyTorch (the reference) and a CUDA implementation in
Triton; Triton is imported only when a CUDA tensor reaches a Triton path.
"""

from .rms_norm import rms_norm

__all__ = ["rms_norm"]
