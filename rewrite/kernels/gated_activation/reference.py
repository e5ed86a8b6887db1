"""The gated MLP activation in plain PyTorch: the source of truth for the Triton kernel and the CPU implementation.

It is the two ops a Hugging Face gated MLP leaves in its graph, so it rounds where PyTorch does: the activation
(computed in float32 for half-precision inputs) rounded to the input dtype, then the product rounded again.
"""

import torch
import torch.nn.functional as F


def activation(gate: torch.Tensor, kind: str) -> torch.Tensor:
    """`kind` ("silu" or "gelu_tanh") applied to `gate`, as PyTorch's own op."""
    if kind == "silu":
        return F.silu(gate)
    if kind == "gelu_tanh":
        return F.gelu(gate, approximate="tanh")
    raise ValueError(f"gated_activation: unknown kind {kind!r}")


def gated_activation_reference(gate: torch.Tensor, up: torch.Tensor, kind: str) -> torch.Tensor:
    """act(gate) * up as a contiguous tensor."""
    return (activation(gate, kind) * up).contiguous()
