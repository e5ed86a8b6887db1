"""The `rewrite::rotary_embedding` and `rewrite::rotary_embedding_pair` ops: schema, fake, CPU reference and
CUDA Triton implementations (forward only)."""

import torch

from .._triton import load_triton_module
from ..layout import empty_in_layout_of, in_layout_of
from .reference import rotary_embedding_reference

_TRITON = "rewrite.kernels.rotary.triton_kernels"


def _fake_output(x: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    return empty_in_layout_of(x, dtype=torch.result_type(x, cos))


@torch.library.custom_op("rewrite::rotary_embedding", mutates_args=())
def rotary_embedding_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, rounded as PyTorch rounds the separate ops, laid out as x."""
    return in_layout_of(rotary_embedding_reference(x, cos, sin), x)


@rotary_embedding_op.register_kernel("cuda")
def _rotary_embedding_cuda(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return load_triton_module(_TRITON).rotary_forward(x, cos, sin)


@rotary_embedding_op.register_fake
def _rotary_embedding_fake(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _fake_output(x, cos)


@torch.library.custom_op("rewrite::rotary_embedding_pair", mutates_args=())
def rotary_embedding_pair_op(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rotary_embedding` of q and of k by the same cos / sin."""
    return (in_layout_of(rotary_embedding_reference(q, cos, sin), q),
            in_layout_of(rotary_embedding_reference(k, cos, sin), k))


@rotary_embedding_pair_op.register_kernel("cuda")
def _rotary_embedding_pair_cuda(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return load_triton_module(_TRITON).rotary_pair_forward(q, k, cos, sin)


@rotary_embedding_pair_op.register_fake
def _rotary_embedding_pair_fake(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fake_output(q, cos), _fake_output(k, cos)


def check_rotary_inputs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, name: str = "x") -> None:
    """Raise a ValueError unless the op can rotate `x` by `cos` / `sin`: a floating-point x with an even last
    dim, cos / sin of one dtype that broadcast to x's shape without growing it."""
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"rotary_embedding: {name} needs an even last dimension, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"rotary_embedding: {name} must be a floating-point tensor, got {x.dtype}")
    for which, t in (("cos", cos), ("sin", sin)):
        try:
            shape = torch.broadcast_shapes(x.shape, t.shape)
        except RuntimeError:
            shape = None
        if shape != x.shape:
            raise ValueError(f"rotary_embedding: {which} of shape {tuple(t.shape)} does not broadcast to "
                             f"{name}'s shape {tuple(x.shape)}")
    if cos.dtype != sin.dtype:
        raise ValueError(f"rotary_embedding: cos and sin must have one dtype, got {cos.dtype} and {sin.dtype}")


def rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding in rotate-half form, `x * cos + rotate_half(x) * sin` with
    `rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])`: x [..., D], cos / sin broadcastable to x. The result is
    laid out in memory as x (`layout.empty_in_layout_of`: model code may view it as only that layout allows), has the
    dtype PyTorch gives `x * cos` and equals the decomposed expression's bitwise in float16 / bfloat16."""
    check_rotary_inputs(x, cos, sin)
    return rotary_embedding_op(x, cos, sin)


def rotary_embedding_pair(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rotary_embedding(q, cos, sin), rotary_embedding(k, cos, sin)` by one kernel launch on CUDA."""
    check_rotary_inputs(q, cos, sin, "q")
    check_rotary_inputs(k, cos, sin, "k")
    return rotary_embedding_pair_op(q, k, cos, sin)
