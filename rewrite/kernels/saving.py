"""When a kernel op may keep forward buffers for its backward: only where autograd will run one."""

import torch


def backward_will_run(*inputs: torch.Tensor | None) -> bool:
    """Whether autograd records this call: grad mode on and an input requiring grad (inference keeps nothing)."""
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)
