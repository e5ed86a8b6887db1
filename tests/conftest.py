"""Shared test set-up: Triton's CPU interpreter, warning filters, and helpers to run built-in targets."""

from __future__ import annotations

import collections
import contextlib
import inspect
import os
import warnings
from typing import Any

import torch

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # pytest-xdist workers share the cores: one torch thread pool each of its share (two pools of all the cores
    # oversubscribe them, and small ops then wait on each other's threads)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

if not torch.cuda.is_available():
    # Triton reads this when a kernel is decorated, so it must be set before any kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch.utils._pytree as pytree  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# torch's own pytree code deep-copies LeafSpec objects during export, which warns on every capture.
_TORCH_NOISE = r".*isinstance\(treespec, LeafSpec\).*"
warnings.filterwarnings("ignore", message=_TORCH_NOISE, category=FutureWarning)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("filterwarnings", f"ignore:{_TORCH_NOISE}:FutureWarning")


def split_example(example: Any) -> tuple[tuple, dict[str, Any]]:
    """A target's example inputs as (args, kwargs)."""
    if isinstance(example, tuple):
        return example, {}
    return (), dict(example)


def reference_kwargs(model: torch.nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Keywords to call the original model with so that it returns what the optimized one does.

    Hugging Face models return a KV cache by default; the optimized module is captured without one.
    """
    if getattr(model, "config", None) is not None and "use_cache" in inspect.signature(model.forward).parameters:
        return {"use_cache": False, **kwargs}
    return kwargs


def run_original(model: torch.nn.Module, example: Any) -> Any:
    """Call the original model on a target's example inputs."""
    args, kwargs = split_example(example)
    return model(*args, **reference_kwargs(model, kwargs))


def run(module: torch.nn.Module, example: Any) -> Any:
    """Call an (optimized) module on a target's example inputs."""
    args, kwargs = split_example(example)
    return module(*args, **kwargs)


def tensor_leaves(out: Any) -> list[torch.Tensor]:
    """Every tensor in an output tree (tuples, dicts, Hugging Face ModelOutput)."""
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


def main_output(out: Any) -> torch.Tensor:
    """The output a user looks at: logits, else last hidden state, else the first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    return tensor_leaves(out)[0]


def scalar_loss(out: Any, mask: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """A scalar depending on every floating output element (random fixed weights, so no symmetry hides a bug).

    With `mask` (a [batch, seq] attention mask), outputs at padded positions are left out, as a training
    loss leaves them out: a padded query that may attend to nothing has no meaningful gradient (Hugging
    Face's eager and SDPA attentions disagree on it by orders of magnitude).
    """
    g = torch.Generator().manual_seed(seed)
    total = torch.zeros(())
    for leaf in tensor_leaves(out):
        if leaf.is_floating_point():
            weights = torch.randn(leaf.shape, generator=g, dtype=leaf.dtype).to(leaf.device)
            if mask is not None and leaf.dim() >= 2 and tuple(leaf.shape[:2]) == tuple(mask.shape):
                keep = mask.to(leaf.dtype).reshape(*mask.shape, *([1] * (leaf.dim() - 2)))
                weights = weights * keep
            total = total + (leaf * weights).sum()
    return total


def parameter_grads(
    module: torch.nn.Module, out: Any, mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor | None]:
    """Gradients of `scalar_loss(out, mask)` with respect to each named parameter of `module`."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(scalar_loss(out, mask), [p for _, p in named], allow_unused=True)
    return {n: g for (n, _), g in zip(named, grads)}


def assert_grads_close(got: dict[str, torch.Tensor | None], want: dict[str, torch.Tensor | None], *,
                       atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """Same parameters, and each gradient within tolerance (a parameter the reference leaves without a
    gradient may have none or an all-zero one)."""
    assert got.keys() == want.keys()
    for key, g in want.items():
        if g is None:
            assert got[key] is None or not got[key].any(), key
            continue
        torch.testing.assert_close(got[key], g, atol=atol, rtol=rtol, msg=lambda m, k=key: f"{k}: {m}")


def _real(leaf: Any, mask: torch.Tensor | None) -> Any:
    if mask is None or not isinstance(leaf, torch.Tensor) or leaf.dim() < 2:
        return leaf
    if tuple(leaf.shape[:2]) != tuple(mask.shape):
        return leaf
    return leaf[mask.bool()]


def assert_outputs_close(
    got: Any, want: Any, *, mask: torch.Tensor | None = None, atol: float = 1e-5, rtol: float = 1e-5
) -> None:
    """Same output structure and every tensor leaf within tolerance.

    With `mask` ([batch, seq]), per-token outputs are compared at real (unpadded) tokens only: what a
    padded query computes is unspecified (Hugging Face's eager and SDPA attentions differ there).
    """
    got_leaves, got_spec = pytree.tree_flatten(got)
    want_leaves, want_spec = pytree.tree_flatten(want)
    assert got_spec == want_spec, f"output structure differs:\n{got_spec}\nvs\n{want_spec}"
    for g, w in zip(got_leaves, want_leaves):
        if isinstance(w, torch.Tensor):
            torch.testing.assert_close(_real(g, mask), _real(w, mask), atol=atol, rtol=rtol)
        else:
            assert g == w


@pytest.fixture
def quiet():
    """Silence warnings a test provokes on purpose (a pass matching nothing, say)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


HOST_READ_OPS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "nonzero_static", "masked_select", "equal",
                 "allclose", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave"}
"""aten ops that read tensor values on the host or whose output shape the values decide: a device sync on a GPU."""


class HostReads(TorchDispatchMode):
    """Records every host read of tensor values made inside it: the ops above, indexing by a boolean
    mask, and `tolist` / `numpy` / `cpu` / `.to("cpu")` (patched on torch.Tensor while it is active)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []
        self._undo: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        indices = args[1] if name in ("index", "index_put", "index_put_") and len(args) > 1 else []
        if name in HOST_READ_OPS or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))

    def _patch(self, method: str, is_read) -> None:
        original = getattr(torch.Tensor, method)

        def patched(tensor, *args, **kwargs):
            if is_read(args, kwargs):
                self.seen.append(method)
            return original(tensor, *args, **kwargs)

        setattr(torch.Tensor, method, patched)
        self._undo.append((method, original))

    def __enter__(self):
        to_cpu = lambda a, k: any(str(x) == "cpu" for x in (*a, k.get("device")))  # noqa: E731
        for method, is_read in (("tolist", None), ("numpy", None), ("cpu", None), ("to", to_cpu)):
            self._patch(method, is_read or (lambda a, k: True))
        return super().__enter__()

    def __exit__(self, *exc):
        for method, original in reversed(self._undo):
            setattr(torch.Tensor, method, original)
        return super().__exit__(*exc)


class OpCounts(TorchDispatchMode):
    """Counts the aten ops run inside it, by name."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def mamba2_reference(q, k, v, scale, valid, params):
    """Mamba-2 from attention (x = v, B = k, C = q): causal depthwise conv over [x, B, C], then
    h_t = exp(-dt_t exp(a_log)) h_{t-1} + dt_t B_t^T x_t, y_t = scale * C_t h_t + skip * x_t; padded
    tokens enter the conv as zeros and leave the state alone."""
    conv, dt_w, dt_b, a_log, skip = (p.double() for p in params)
    q, k, v = q.double(), k.double(), v.double()
    batch, heads, length, dim = q.shape
    kv_heads, groups = k.shape[1], heads // k.shape[1]
    width = conv.shape[1]
    out = torch.zeros(batch, heads, length, v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        xbc = torch.cat([t[b].transpose(0, 1).flatten(1) for t in (v, k, q)], dim=-1) * valid[b, :, None]
        y = torch.zeros_like(xbc)
        for t in range(length):
            for j in range(width):
                if t - width + 1 + j >= 0:
                    y[t] += conv[:, j] * xbc[t - width + 1 + j]
        x = y[:, : kv_heads * v.shape[-1]].view(length, kv_heads, -1)
        bm = y[:, kv_heads * v.shape[-1] : kv_heads * (v.shape[-1] + dim)].view(length, kv_heads, dim)
        c = y[:, kv_heads * (v.shape[-1] + dim) :].view(length, heads, dim)
        state = torch.zeros(kv_heads, dim, v.shape[-1], dtype=torch.float64)
        for t in range(length):
            for h in range(kv_heads):
                if valid[b, t]:
                    dt = F.softplus(x[t, h] @ dt_w[h] + dt_b[h])
                    state[h] = torch.exp(-dt * torch.exp(a_log[h])) * state[h] + dt * torch.outer(bm[t, h], x[t, h])
            for hq in range(heads):
                out[b, hq, t] = scale * c[t, hq] @ state[hq // groups] + skip[hq] * x[t, hq // groups]
    return out.to(q.dtype if q.dtype != torch.float64 else torch.float64)


def stepwise_program_logits(program: Any, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of a decode program over `ids` [B, T]: a prefill of `prefill` tokens, then one step per token."""
    batch, length = ids.shape
    state = program.new_state(batch, length)
    positions = torch.arange(length).expand(batch, -1)
    outs = []
    for start, stop in [(0, prefill), *((t, t + 1) for t in range(prefill, length))]:
        state.begin(stop - start)
        outs.append(program(ids[:, start:stop], positions[:, start:stop], state))
        state.advance()
    return torch.cat(outs, dim=1)


@pytest.fixture
def no_grad():
    """The test body without autograd (a module's `pytestmark = pytest.mark.usefixtures("no_grad")`)."""
    with torch.no_grad():
        yield


def one_decode_step_ops(program: Any, ids: torch.Tensor, prefill: int) -> OpCounts:
    """The ops of one decode step of `program` after a prefill of `prefill` tokens of `ids`."""
    batch = ids.shape[0]
    state = program.new_state(batch, ids.shape[1])
    positions = torch.arange(ids.shape[1]).expand(batch, -1)
    state.begin(prefill)
    program(ids[:, :prefill], positions[:, :prefill], state)
    state.advance()
    state.begin(1)
    with OpCounts() as counts:
        program(ids[:, prefill:prefill + 1], positions[:, prefill:prefill + 1], state)
    state.advance()
    return counts


def decode_fusion(name: str, on: bool = True):
    """The decode fusion `name` of `rewrite.decode.fusion_switches` switched to `on` inside the block."""
    from rewrite.decode.fusion_switches import SWITCHES

    module, attribute = SWITCHES[name]
    return module_switch(module, attribute, on)


def built_without_and_with(fusion: str, build: Any, target: Any) -> tuple[Any, Any]:
    """(`build(target)` with the decode fusion `fusion` off, the same with it on): the unfused and fused programs."""
    with decode_fusion(fusion, False):
        plain = build(target)
    with decode_fusion(fusion, True):
        fused = build(target)
    return plain, fused


@contextlib.contextmanager
def module_switch(module: Any, name: str, value: Any):
    """`module.name` set to `value` inside the block, put back after it (a module-level switch such as a decode
    fusion's)."""
    before = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, before)
