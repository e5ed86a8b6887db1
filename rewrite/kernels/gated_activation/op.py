"""The `rewrite::gated_activation` op: schema, fake, CPU reference and CUDA Triton implementations (forward only)."""

import torch

from .._triton import load_triton_module
from .reference import gated_activation_reference

_TRITON = "rewrite.kernels.gated_activation.triton_kernels"

KINDS = ("silu", "gelu_tanh")
"""The activations the op applies to the gate: SiLU, and GELU with the tanh approximation."""

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""The dtypes the op takes (gate and up share one)."""


@torch.library.custom_op("rewrite::gated_activation", mutates_args=())
def gated_activation_op(gate: torch.Tensor, up: torch.Tensor, kind: str) -> torch.Tensor:
    """act(gate) * up, rounded as PyTorch rounds the activation and the product (forward only)."""
    return gated_activation_reference(gate, up, kind)


@gated_activation_op.register_kernel("cuda")
def _gated_activation_cuda(gate: torch.Tensor, up: torch.Tensor, kind: str) -> torch.Tensor:
    return load_triton_module(_TRITON).gated_activation_forward(gate, up, kind)


@gated_activation_op.register_fake
def _gated_activation_fake(gate: torch.Tensor, up: torch.Tensor, kind: str) -> torch.Tensor:
    return gate.new_empty(gate.shape)


def _no_backward(ctx, *grads: torch.Tensor):
    raise RuntimeError(
        "rewrite::gated_activation is forward only (it serves decode programs); use the separate "
        "activation and product where a gradient is needed"
    )


gated_activation_op.register_autograd(_no_backward)


def check_gated_inputs(gate: torch.Tensor, up: torch.Tensor, kind: str) -> None:
    """Raise a ValueError unless the op can compute `act(gate) * up`: a known kind, and gate and up of one shape
    (no broadcasting) and one dtype of DTYPES."""
    if kind not in KINDS:
        raise ValueError(f"gated_activation: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if gate.shape != up.shape:
        raise ValueError(
            f"gated_activation: gate and up must have one shape, got {tuple(gate.shape)} and "
            f"{tuple(up.shape)}"
        )
    if gate.dtype != up.dtype or gate.dtype not in DTYPES:
        raise ValueError(
            f"gated_activation: gate and up must share a dtype of float32, float16 or bfloat16, got "
            f"{gate.dtype} and {up.dtype}"
        )


def gated_activation(gate: torch.Tensor, up: torch.Tensor, kind: str = "silu") -> torch.Tensor:
    """The gated MLP activation `act(gate) * up` of Hugging Face's gated MLPs (forward only): act is SiLU
    (`kind="silu"`: Llama, Mistral, Qwen, Phi-3) or tanh-approximated GELU (`kind="gelu_tanh"`: Gemma). gate and
    up [..., F] may be strided views (the two halves of one fused projection); the result is contiguous, in their
    dtype, rounded where `F.silu(gate) * up` (or `F.gelu(gate, approximate="tanh") * up`) rounds: the activation
    in float32, rounded to the dtype, then the product in float32, rounded again."""
    check_gated_inputs(gate, up, kind)
    return gated_activation_op(gate, up, kind)
