"""Analysis of captured graphs: attention sites, their heads, causality and projections; blocks; dims."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import split_example

from examples.models import TARGETS, transformer_encoder
from rewrite.analysis import GraphAnalysis, analyze
from rewrite.analysis.nodes import tensor_meta
from rewrite.capture import capture

DECODERS = ["llama", "qwen2", "qwen3", "mistral"]


@functools.cache
def analysis_of(name: str, attn: str = "default") -> tuple[torch.nn.Module, GraphAnalysis]:
    extra = {"attn": "eager"} if attn == "eager" else {}
    model, example = TARGETS[name](**extra)
    args, kwargs = split_example(example)
    return model, analyze(capture(model, args, kwargs).graph_module)


def heads_of(model: torch.nn.Module) -> tuple[int, int, int]:
    """(q heads, kv heads, head dim) read from the model itself."""
    config = getattr(model, "config", None)
    if config is not None:
        q = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or q
        dim = getattr(config, "head_dim", None) or config.hidden_size // q
        return q, kv, dim
    mha = next((m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)), None)
    if mha is not None:
        return mha.num_heads, mha.num_heads, mha.head_dim
    attn = model.blocks[0]["attn"]
    return attn.heads, attn.heads, attn.qkv.in_features // attn.heads


EXPECTED = {
    # name: (site form, layer container, causal)
    "llama": ("sdpa", "model.layers", True),
    "qwen2": ("sdpa", "model.layers", True),
    "qwen3": ("sdpa", "model.layers", True),
    "mistral": ("sdpa", "model.layers", True),
    "gpt2": ("sdpa", "transformer.h", True),
    "bert": ("sdpa", "encoder.layer", False),
    "minilm": ("sdpa", "encoder.layer", False),
    "transformer_encoder": ("sdpa", "layers", False),
    "handwritten": ("unfused", "blocks", True),
}
CASES = [(n, "default") for n in EXPECTED] + [(n, "eager") for n in DECODERS + ["gpt2", "bert"]]


def _layers(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is not None:
        return config.num_hidden_layers
    return len(model.layers if hasattr(model, "layers") else model.blocks)


@pytest.mark.parametrize(("name", "attn"), CASES, ids=[f"{n}-{a}" for n, a in CASES])
def test_sites_and_blocks(name: str, attn: str) -> None:
    model, analysis = analysis_of(name, attn)
    form, container, causal = EXPECTED[name]
    form = "unfused" if attn == "eager" else form
    n_layers = _layers(model)
    q_heads, kv_heads, head_dim = heads_of(model)

    assert len(analysis.sites) == n_layers
    assert [b.path for b in analysis.blocks] == [f"{container}.{i}" for i in range(n_layers)]
    assert [b.index for b in analysis.blocks] == list(range(n_layers))
    for i, (site, block) in enumerate(zip(analysis.sites, analysis.blocks)):
        assert site.form == form
        assert site.problem is None
        assert block.sites == [site]
        assert analysis.block_of(site) is block
        assert site.module_path.startswith(f"{container}.{i}.")
        assert (site.q_heads, site.kv_heads, site.head_dim) == (q_heads, kv_heads, head_dim)
        assert site.gqa_groups == q_heads // kv_heads
        assert site.causal is causal
        assert site.scale is None or site.scale == pytest.approx(head_dim**-0.5)
        for role in "qkv":
            projection = getattr(site, f"{role}_projection")
            assert projection is not None, role
            assert projection.weight.startswith(f"{container}.{i}.")


def test_gqa_llama_four_query_heads_share_two_kv_heads() -> None:
    _, analysis = analysis_of("llama")
    site = analysis.sites[0]
    assert (site.q_heads, site.kv_heads, site.gqa_groups) == (4, 2, 2)
    _, eager = analysis_of("llama", "eager")
    assert eager.sites[0].kv_repeat_source is not None  # repeat_kv seen through
    assert eager.sites[0].kv_heads == 2


@pytest.mark.parametrize("attn", ["default", "eager"])
@pytest.mark.parametrize("name", DECODERS)
def test_decoder_projections(name: str, attn: str) -> None:
    _, analysis = analysis_of(name, attn)
    for i, site in enumerate(analysis.sites):
        prefix = f"model.layers.{i}.self_attn."
        for role in "qkv":
            projection = getattr(site, f"{role}_projection")
            assert projection.weight == f"{prefix}{role}_proj.weight"
            assert projection.part is None
            assert (projection.bias is not None) == (name == "qwen2")
        assert site.q_projection.has_rope and site.k_projection.has_rope
        assert not site.v_projection.has_rope
        assert site.q_projection.has_norm == site.k_projection.has_norm == (name == "qwen3")


def test_gpt2_fused_c_attn_parts() -> None:
    _, analysis = analysis_of("gpt2")
    for i, site in enumerate(analysis.sites):
        for index, role in enumerate("qkv"):
            projection = getattr(site, f"{role}_projection")
            assert projection.weight == f"transformer.h.{i}.attn.c_attn.weight"
            assert projection.bias == f"transformer.h.{i}.attn.c_attn.bias"
            assert projection.part == (index, 3)


@pytest.mark.parametrize(("name", "prefix"), [("multihead_attention", "attn."), ("transformer_encoder", "layers.0.self_attn.")])
def test_multihead_attention_in_proj_parts(name: str, prefix: str) -> None:
    _, analysis = analysis_of(name)
    site = analysis.sites[0]
    assert (site.q_heads, site.head_dim) == (4, 16)
    for index, role in enumerate("qkv"):
        projection = getattr(site, f"{role}_projection")
        assert projection.weight == f"{prefix}in_proj_weight"
        assert projection.part == (index, 3)
    assert not site.causal


def test_handwritten_fused_qkv_and_probed_causal_mask() -> None:
    _, analysis = analysis_of("handwritten")
    site = analysis.sites[1]
    assert site.q_projection.weight == "blocks.1.attn.qkv.weight"
    assert [getattr(site, f"{r}_projection").part for r in "qkv"] == [(0, 3), (1, 3), (2, 3)]
    assert not site.is_causal and site.mask_is_causal is True and site.mask_negated


def test_is_causal_flag() -> None:
    model, (x,) = transformer_encoder()
    mask = torch.nn.Transformer.generate_square_subsequent_mask(x.shape[1])
    analysis = analyze(capture(model, (x,), {"mask": mask, "is_causal": True}).graph_module)
    assert len(analysis.sites) == 2
    assert all(site.is_causal and site.causal for site in analysis.sites)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "handwritten", "transformer_encoder"])
def test_symbolic_dims_are_batch_and_seq(name: str) -> None:
    _, analysis = analysis_of(name)
    for site in analysis.sites:
        for node in (site.q, site.k, site.v):
            shape = tensor_meta(node).shape
            assert analysis.dims.role_of(shape[0]) == "batch"
            assert analysis.dims.role_of(shape[-2]) == "seq"
            assert analysis.dims.role_of(shape[-1]) is None  # head dim is a constant
    names = {str(s) for s in analysis.dims.free_symbols}
    assert names == {"batch", "seq"}
    first = next(n for n in analysis.sites[0].q.graph.nodes if n.op == "placeholder" and tensor_meta(n) is not None
                 and tensor_meta(n).dim() >= 2 and not n.meta.get("state_name"))
    assert [analysis.dims.role_of(d) for d in tensor_meta(first).shape[:2]] == ["batch", "seq"]
