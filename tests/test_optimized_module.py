"""The emitted module: shared state, state_dict, modes, casts, autograd, `.code`, save/load, lazy capture."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_outputs_close, run, run_original, split_example

import rewrite
from examples.models import gpt2, handwritten, transformer_encoder
from rewrite.errors import RewriteError

PLAN = ["attention_normalize"]


@pytest.fixture(scope="module")
def lm():
    """The hand-written LM, optimized (shared by tests that do not change it)."""
    model, example = handwritten()
    return model, example, rewrite.optimize(model, PLAN, example)


def test_parameters_are_shared_not_copied() -> None:
    model, example = handwritten()
    om = rewrite.optimize(model, PLAN, example)
    mine = dict(om.named_parameters())
    assert set(mine) == {n for n, _ in model.named_parameters()}
    for name, param in model.named_parameters():
        assert mine[name] is param and mine[name].data_ptr() == param.data_ptr(), name
    before = om(*example)
    with torch.no_grad():
        model.norm.bias.add_(1.0)  # the last op before the tied head: every logit moves
    after = om(*example)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, model(*example), rtol=1e-5, atol=1e-5)


def test_original_state_dict_loads_strictly(lm) -> None:
    model, example, om = lm
    assert list(om.state_dict()) == list(model.state_dict())
    fresh, _ = handwritten()
    with torch.no_grad():
        for p in fresh.parameters():
            p.mul_(0.5)
    result = om.load_state_dict(fresh.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(om(*example), fresh(*example), rtol=1e-5, atol=1e-5)
    om.load_state_dict(handwritten()[0].state_dict(), strict=True)  # restore for other tests
    torch.testing.assert_close(om(*example), model(*example), rtol=1e-5, atol=1e-5)


def test_buffers_keep_persistence() -> None:
    model, example = gpt2()
    om = rewrite.optimize(model, PLAN, example_kwargs=example)
    assert list(om.state_dict()) == list(model.state_dict())
    assert {n for n, _ in om.named_buffers()} == {n for n, _ in model.named_buffers()}


class DropoutNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(32, 256)
        self.drop = torch.nn.Dropout(p=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc(x))


def test_train_eval_recapture_and_dropout() -> None:
    torch.manual_seed(0)
    model = DropoutNet().eval()
    x = torch.randn(64, 32)
    om = rewrite.optimize(model, None, x)
    eval_report = om.report
    torch.testing.assert_close(om(x), model(x), rtol=0, atol=0)
    assert om(x).ne(0).all()

    om.train()
    y = om(x)
    assert om.report is not eval_report  # captured again in train mode
    train_report = om.report
    dense = model.fc(x)
    zeros = (y == 0).float().mean().item()
    assert 0.45 < zeros < 0.55  # 16384 draws of p=0.5: 0.05 is > 12 standard deviations
    kept = y != 0
    torch.testing.assert_close(y[kept], 2 * dense[kept])  # inverted dropout scaling
    assert not torch.equal(om(x), y)  # a fresh mask each call
    assert om.report is train_report  # same mode: no capture

    om.eval()
    torch.testing.assert_close(om(x), model(x), rtol=0, atol=0)
    assert om.report is not train_report


def test_cast_to_float64_then_run() -> None:
    model, (x,) = transformer_encoder()
    om = rewrite.optimize(model, PLAN, x)
    om.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())  # shared, so cast together
    x64 = x.double()
    out = om(x64)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, model(x64), rtol=1e-12, atol=1e-12)


def test_autograd_through_the_module(lm) -> None:
    model, example, om = lm
    weight = model.blocks[0]["attn"].qkv.weight
    (got,) = torch.autograd.grad(om(*example).square().mean(), [weight])
    (want,) = torch.autograd.grad(model(*example).square().mean(), [weight])
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_code_is_python_naming_the_parameters(lm) -> None:
    _, _, om = lm
    code = om.code
    assert isinstance(code, str)
    compile(code, "<optimized>", "exec")
    for name in ("attn.qkv.weight", "attn.proj.bias", "embed.weight", "norm.weight"):
        assert name in code, name
    assert "scaled_dot_product_attention" in code


@pytest.mark.parametrize("target", [handwritten, gpt2])
def test_save_and_load_round_trip(tmp_path, target) -> None:
    model, example = target()
    args, kwargs = split_example(example)
    om = rewrite.optimize(model, PLAN, args, example_kwargs=kwargs)
    want = run(om, example)
    folder = om.save(tmp_path / "saved")
    assert {p.name for p in folder.iterdir()} == {"plan.yaml", "weights.safetensors", "program.pt2", "meta.json"}

    # without the model: the exported program, every dim still dynamic
    loaded = rewrite.load(folder)
    assert loaded.source is None
    assert sorted(loaded.state_dict()) == sorted(om.state_dict())
    assert_outputs_close(run(loaded, example), want, rtol=0, atol=0)
    _, other = target(batch=3, length=9)
    assert_outputs_close(run(loaded, other), run_original(model, other), rtol=1e-5, atol=1e-5)
    loaded.train()
    with pytest.raises(RewriteError, match="model="):
        run(loaded, example)

    # with a model of the same architecture and other weights: it is optimized again and given the saved ones
    other_model, _ = target()
    with torch.no_grad():
        for p in other_model.parameters():
            p.add_(0.1)
    again = rewrite.load(folder, model=other_model)
    assert again.source is other_model
    assert [r.name for r in again.report.results] == PLAN
    assert_outputs_close(run(again, example), want, rtol=0, atol=0)
    for (name, p), (_, q) in zip(other_model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(p, q), name


@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory):
    """GPT-2 optimized and saved (its program asserts float32 metadata, as Hugging Face programs do)."""
    model, example = gpt2()
    om = rewrite.optimize(model, PLAN, example_kwargs=example)
    return om, example, om.save(tmp_path_factory.mktemp("saved") / "gpt2")


def test_loaded_program_cast_to_another_dtype_says_to_load_with_model(saved_gpt2) -> None:
    om, example, folder = saved_gpt2
    loaded = rewrite.load(folder)
    loaded.to(torch.float64)
    with pytest.raises(RewriteError, match=r"cast to \['torch.float64'\].*runs in \['torch.float32'\].*model="):
        run(loaded, example)
    loaded.float()  # back to the saved dtype: runs again
    assert_outputs_close(run(loaded, example), run(om, example), rtol=0, atol=0)


def _damaged_copy(folder, tmp_path, name: str, data: bytes | None):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    if data is None:
        (copy / name).unlink()
    else:
        (copy / name).write_bytes(data)
    return copy


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [("meta.json", b"{", "not readable JSON"), ("weights.safetensors", None, "holds no weights.safetensors"),
     ("weights.safetensors", b"garbage", "not a readable safetensors file"),
     ("program.pt2", b"garbage", "not a readable exported program")],
)
def test_damaged_saved_folder_is_a_rewrite_error(saved_gpt2, tmp_path, name, data, message) -> None:
    _, _, folder = saved_gpt2
    copy = _damaged_copy(folder, tmp_path, name, data)
    with pytest.raises(RewriteError, match=message):
        rewrite.load(copy)
    if name != "program.pt2":
        with pytest.raises(RewriteError, match=message):
            rewrite.load(copy, model=gpt2()[0])
    with pytest.raises(RewriteError, match="is not a folder"):
        rewrite.load(copy / "plan.yaml")
    with pytest.raises(RewriteError, match="takes the source nn.Module"):
        rewrite.load(copy, model="gpt2")


def test_load_into_a_model_of_another_width_names_the_shapes(saved_gpt2, tmp_path) -> None:
    import safetensors.torch
    import transformers

    _, _, folder = saved_gpt2
    config = gpt2()[0].config
    config.n_embd = 32
    with pytest.raises(RewriteError, match=r"shapes differ\): .*saved \(\d+, 64\), model \(\d+, 32\)"):
        rewrite.load(folder, model=transformers.GPT2LMHeadModel(config).eval())
    state = safetensors.torch.load_file(str(folder / "weights.safetensors"))
    state["transformer.ln_f.weight"] = torch.zeros(3)
    copy = _damaged_copy(folder, tmp_path, "weights.safetensors", safetensors.torch.save(state))
    with pytest.raises(RewriteError, match=r"transformer.ln_f.weight: saved \(3,\), model \(64,\)"):
        rewrite.load(copy)


def test_deepcopy_is_independent_and_pickling_says_to_save() -> None:
    import copy
    import io

    model, example = handwritten()
    om = rewrite.optimize(model, PLAN, example)
    want = om(*example)
    twin = copy.deepcopy(om)
    assert twin.source is not model and twin.source.norm.bias is twin.get_parameter("norm.bias")
    torch.testing.assert_close(twin(*example), want, rtol=0, atol=0)
    with torch.no_grad():
        twin.source.norm.bias.add_(1.0)
    torch.testing.assert_close(om(*example), want, rtol=0, atol=0)
    assert not torch.equal(twin(*example), want)
    with pytest.raises(RewriteError, match=r"cannot be pickled.*om.save"):
        torch.save(om, io.BytesIO())


def test_lazy_module_captures_on_first_call() -> None:
    model, example = handwritten()
    lazy = rewrite.optimize(model, PLAN)
    assert isinstance(lazy, rewrite.LazyOptimizedModule)
    assert lazy.optimized is None
    assert {n for n, _ in lazy.named_parameters()} == {n for n, _ in model.named_parameters()}
    out = lazy(*example)
    assert isinstance(lazy.optimized, rewrite.OptimizedModule)
    torch.testing.assert_close(out, model(*example), rtol=1e-5, atol=1e-5)
    assert [r.name for r in lazy.report.results] == PLAN
    assert "scaled_dot_product_attention" in lazy.code
    first = lazy.optimized
    lazy(*handwritten(batch=1, length=5)[1])
    assert lazy.optimized is first


def test_verify_and_save_example_runs(tmp_path, capsys) -> None:
    from examples import verify_and_save

    loaded = verify_and_save.main(["--target", "gpt2", "--out", str(tmp_path / "gpt2")])
    out = capsys.readouterr().out
    assert "PASSED" in out and "['logits']" in out
    assert out.count("max diff 0") == 2
    assert isinstance(loaded, rewrite.OptimizedModule) and loaded.source is None
    assert (tmp_path / "gpt2" / "program.pt2").exists()
