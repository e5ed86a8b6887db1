"""When an eager kernel call may skip its `torch.library` custom op and run the op's implementation directly.

A custom op costs Python dispatch on every call (schema defaults, the autograd wrapper, the redispatch to the device
kernel, the output aliasing check) on top of its kernels; for a forward and backward of a few millisecond-long
kernels that host time is what the GPU waits on. Plain eager calls may run the same implementation through a
`torch.autograd.Function` instead: same kernels, same results. Every call the op exists for keeps it: under
torch.compile / torch.export (Dynamo), with a tensor subclass (FakeTensor, FunctionalTensor, DTensor, ...), under a
dispatch or function mode (make_fx, FakeTensorMode, ...), inside functorch transforms, and under autocast.
"""

from __future__ import annotations

import torch

DEVICES = ("cuda",)
"""Device types whose eager calls run direct (the CPU references gain nothing from it; tests add "cpu")."""


def runs_direct(*tensors: torch.Tensor | None) -> bool:
    """Whether a call on these tensors (None ignored) is a plain eager call on one of `DEVICES`."""
    if torch.compiler.is_compiling():
        return False
    present = [t for t in tensors if t is not None]
    if not present or any(type(t) is not torch.Tensor for t in present):
        return False
    device = present[0].device.type
    if device not in DEVICES or any(t.device.type != device for t in present):
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._are_functorch_transforms_active():
        return False
    return not torch.is_autocast_enabled(device)
