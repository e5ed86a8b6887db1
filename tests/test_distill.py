"""The recovery recipe: attention transfer (layer-local and joint), fine-tune (LoRA and full), merging the
LoRA adapters, checkpoints and resume, errors, the `rewrite distill` command and the example."""

from __future__ import annotations

import json

import pytest
import torch

import rewrite
from examples import distill as distill_example
from examples.models import TARGETS
from rewrite.cli import main as cli_main
from rewrite.distill import DistillConfig, FinetuneConfig, TransferConfig, distill, main_output
from rewrite.distill.sentences import stdlib_sentences
from rewrite.errors import PlanError, RewriteError
from rewrite.mixers.transfer import record_transfer
from rewrite.passes.base import op_counts


def llama_data(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {"input_ids": torch.randint(0, 128, (2, 12), generator=g)}


def quiet(**kw) -> DistillConfig:
    return DistillConfig(progress=False, **kw)


def sharp_llama() -> torch.nn.Module:
    """The tiny Llama with larger q / k weights, so its attention is far from uniform (a teacher worth matching)."""
    model, _ = TARGETS["llama"]()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    return model


def test_teacher_forcing_gives_the_original_model_and_one_error_per_layer():
    model, inputs = TARGETS["llama"]()
    om = rewrite.optimize(model, [{"mixer": {"kind": "gated_deltanet", "layers": "1:"}}], example_kwargs=inputs)
    with torch.no_grad():
        want = main_output(model(**inputs))
        linear = main_output(om(**inputs))
        with record_transfer(teacher_forcing=True) as record:
            forced = main_output(om(**inputs))
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(forced[valid], want[valid], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(linear[valid], want[valid], atol=1e-3)
    assert list(record.losses) == ["layer 1 (model.layers.1.self_attn)"]
    assert record.total().item() > 0


@pytest.mark.parametrize("mode", ["layer", "joint"])
def test_attention_transfer_lowers_the_error_and_trains_only_new_parameters(mode):
    model = sharp_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = [{"mixer": {"kind": "linear", "feature_map": "hedgehog"}}]
    result = distill(model, plan, lambda step: llama_data(0),
                     quiet(transfer=TransferConfig(steps=8, lr=2e-2, mode=mode)))
    losses = result.history["transfer"]
    assert len(losses) == 8 and losses[-1] < 0.9 * losses[0]
    trained = set(result.module.report.results[0].added_parameters)
    assert trained == {f"model.layers.{i}.self_attn.feature_map_{x}" for i in range(2) for x in "qk"}
    for name, p in result.module.named_parameters():
        if name in before:
            assert torch.equal(p, before[name]), name  # pretrained weights untouched
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])  # the teacher is never changed


def test_lora_finetune_trains_adapters_and_mixers_only_and_lowers_the_loss():
    model, _ = TARGETS["llama"]()
    plan = [{"mixer": {"kind": "retention"}}]
    cfg = quiet(transfer=TransferConfig(steps=2), finetune=FinetuneConfig(steps=6, lr=1e-2, method="lora",
                                                                         losses=("ce", "kl"), merge=False))
    result = distill(model, plan, lambda step: llama_data(0), cfg)
    assert result.lora_parameters and all("lora_" in n for n in result.lora_parameters)
    losses = result.history["finetune"]
    assert losses[-1] < losses[0]
    teacher = dict(model.named_parameters())
    for name, p in result.module.named_parameters():
        base = name.replace(".base_layer", "")
        if base in teacher and "lora_" not in name:
            assert torch.equal(p, teacher[base]), name


LORA_PLAN = [{"mixer": {"kind": "linear", "feature_map": "hedgehog"}}]


def lora_config(merge: bool, directory=None) -> DistillConfig:
    return quiet(transfer=TransferConfig(steps=2), checkpoint_dir=directory, checkpoint_every=2,
                 finetune=FinetuneConfig(steps=3, lr=1e-2, method="lora", losses=("ce", "kl"), merge=merge))


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """The same LoRA recipe (same seed and data) with the adapters kept and merged, and the merged run's checkpoints."""
    directory = tmp_path_factory.mktemp("lora_merge")
    unmerged = distill(TARGETS["llama"]()[0], LORA_PLAN, llama_data, lora_config(False))
    merged = distill(TARGETS["llama"]()[0], LORA_PLAN, llama_data, lora_config(True, directory))
    return unmerged, merged, directory


def fresh_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return {"input_ids": torch.randint(0, 128, (3, 9), generator=g)}  # another batch and length than training's


def test_merged_lora_module_computes_what_the_adapters_did(lora_runs):
    unmerged, merged, _ = lora_runs
    assert unmerged.history == merged.history
    x = fresh_inputs()
    with torch.no_grad():
        want, got = main_output(unmerged.module(**x)), main_output(merged.module(**x))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_merged_lora_weights_are_base_plus_scaled_product_under_the_models_own_names(lora_runs):
    unmerged, merged, _ = lora_runs
    teacher = dict(TARGETS["llama"]()[0].named_parameters())
    adapters = dict(unmerged.module.named_parameters())
    params = dict(merged.module.named_parameters())
    assert not [n for n in params if "lora_" in n or "base_layer" in n]
    added = set(merged.module.report.results[0].added_parameters)
    assert set(params) == set(teacher) | added
    scaling = 16.0 / 8  # lora_alpha / lora_rank
    adapted = {n.split(".lora_A.")[0] for n in unmerged.lora_parameters if ".lora_A." in n}
    assert len(adapted) == 2 * 7  # q, k, v, o, gate, up, down of both layers
    for name, p in params.items():
        if name in added:
            continue
        layer = name.removesuffix(".weight")
        if name.endswith(".weight") and layer in adapted:
            a, b = adapters[f"{layer}.lora_A.default.weight"], adapters[f"{layer}.lora_B.default.weight"]
            assert b.abs().max() > 0, layer  # the fine-tune moved B off zero
            torch.testing.assert_close(p, teacher[name] + scaling * b @ a, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(p, teacher[name]), name


def test_merged_lora_graph_has_no_adapter_and_keeps_the_trained_mixer_parameters(lora_runs):
    unmerged, merged, _ = lora_runs
    om = merged.module
    assert "lora" in unmerged.module.code
    assert "lora" not in om.code and "base_layer" not in om.code
    x = fresh_inputs()
    plain = rewrite.optimize(TARGETS["llama"]()[0], LORA_PLAN, example_kwargs=x)
    assert op_counts(om.program) == op_counts(plain.program)  # the plain model's program: no adapter matmuls
    added = om.report.results[0].added_parameters
    assert added == unmerged.module.report.results[0].added_parameters and len(added) == 4
    trained, fresh = dict(unmerged.module.named_parameters()), dict(plain.named_parameters())
    for name in added:
        assert torch.equal(om.get_parameter(name), trained[name]), name
        assert not torch.equal(trained[name], fresh[name]), name  # they did train


def test_merged_lora_module_saves_and_loads_into_the_plain_model(lora_runs, tmp_path):
    _, merged, _ = lora_runs
    merged.module.save(tmp_path / "m")
    x = fresh_inputs()
    with torch.no_grad():
        want = main_output(merged.module(**x))
        with_model = main_output(rewrite.load(tmp_path / "m", model=TARGETS["llama"]()[0])(**x))
        standalone = main_output(rewrite.load(tmp_path / "m")(**x))
    torch.testing.assert_close(with_model, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(standalone, want, rtol=1e-5, atol=1e-5)


def test_a_finished_lora_run_resumed_gives_the_same_merged_module(lora_runs):
    _, merged, directory = lora_runs
    calls = {"n": 0}

    def counted(step):
        calls["n"] += 1
        return llama_data(step)

    again = distill(TARGETS["llama"]()[0], LORA_PLAN, counted, lora_config(True, directory))
    assert calls["n"] == 1  # only the example inputs: both stages came from the checkpoint
    assert again.history == merged.history
    a, b = _params(merged), _params(again)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _params(result) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in result.module.named_parameters()}


def test_an_interrupted_run_resumes_to_the_same_result(tmp_path):
    model, _ = TARGETS["qwen2"]()
    plan = [{"mixer": {"kind": "lawcat"}}]

    def config(directory):
        return quiet(transfer=TransferConfig(steps=4, lr=1e-2), checkpoint_dir=directory, checkpoint_every=2,
                     finetune=FinetuneConfig(steps=4, lr=1e-3, method="full", losses=("kl",)))

    straight = distill(model, plan, llama_data, config(tmp_path / "a"))

    calls = {"n": 0}

    def crashing(step):
        calls["n"] += 1
        if calls["n"] == 8:  # example, 4 transfer steps, then the 3rd fine-tune step
            raise KeyboardInterrupt
        return llama_data(step)

    with pytest.raises(KeyboardInterrupt):
        distill(model, plan, crashing, config(tmp_path / "b"))
    resumed = distill(model, plan, llama_data, config(tmp_path / "b"))
    assert resumed.history == straight.history
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_transfer_with_no_new_parameters_says_what_to_do():
    model, _ = TARGETS["llama"]()
    with pytest.raises(RewriteError, match="hedgehog"):
        distill(model, [{"mixer": {"kind": "gla"}}], llama_data, quiet(transfer=TransferConfig(steps=2)))


@pytest.mark.parametrize(
    "config,field",
    [
        (DistillConfig(TransferConfig(mode="global")), "transfer.mode"),
        (DistillConfig(TransferConfig(steps=-1)), "transfer.steps"),
        (DistillConfig(finetune=FinetuneConfig(method="adapter")), "finetune.method"),
        (DistillConfig(finetune=FinetuneConfig(losses=("ce", "hinge"))), "finetune.losses"),
        (DistillConfig(finetune=FinetuneConfig(lr=0.0)), "finetune.lr"),
        (DistillConfig(finetune=FinetuneConfig(merge="no")), "finetune.merge"),
    ],
)
def test_bad_recipe_settings_name_the_field(config, field):
    with pytest.raises(PlanError) as info:
        config.validate()
    assert info.value.field == f"distill.{field}"


def test_cli_distill_runs_checkpoints_and_saves(tmp_path, capsys):
    plan = "{passes: [{mixer: {kind: mamba2, layers: '1:'}}]}"
    code = cli_main(["distill", "llama", "--plan", plan, "--transfer-steps", "3", "--finetune-steps", "2",
                     "--finetune", "full", "--loss", "ce", "--checkpoint", str(tmp_path / "ck"),
                     "--save", str(tmp_path / "model"), "--json", "-q"])
    assert code == 0
    history = json.loads(capsys.readouterr().out.splitlines()[0])
    assert len(history["transfer"]) == 3 and len(history["finetune"]) == 2
    assert (tmp_path / "ck" / "distill_checkpoint.pt").exists()
    loaded = rewrite.load(tmp_path / "model", model=TARGETS["llama"]()[0])
    assert "model.layers.1.self_attn.mamba_a_log" in loaded.state_dict()


@pytest.mark.parametrize("flags,adapters", [([], False), (["--no-merge"], True)])
def test_cli_lora_finetune_saves_merged_weights_unless_told_not_to(tmp_path, flags, adapters):
    code = cli_main(["distill", "llama", "--plan", "{passes: [{mixer: {kind: retention}}]}", "--transfer-steps", "0",
                     "--finetune-steps", "2", "--finetune", "lora", "--loss", "ce", "--save", str(tmp_path / "model"),
                     "-q", *flags])
    assert code == 0
    keys = json.loads((tmp_path / "model" / "meta.json").read_text())["state_keys"]
    assert any("lora_" in k for k in keys) == adapters
    assert any("base_layer" in k for k in keys) == adapters


def test_cli_refuses_byte_data_for_a_model_with_a_small_vocabulary(capsys):
    code = cli_main(["distill", "llama", "--plan", "{passes: [{mixer: {kind: retention}}]}", "--data",
                     "stdlib-bytes", "-q"])
    assert code == 2
    assert "byte-level model" in capsys.readouterr().err


def test_heldout_sentences_are_real_and_unseen():
    train, heldout = stdlib_sentences("train"), stdlib_sentences("heldout")
    assert len(train) > 1000 and len(heldout) > 100
    assert not set(train) & set(heldout)
    assert all(s[0].isupper() and s[-1] in ".!?" for s in heldout)


def test_distill_example_runs_tiny(capsys):
    out = distill_example.main(["--tiny"])
    assert out["after"] > out["before"]
    assert out["history"]["transfer"][-1] < out["history"]["transfer"][0]
    assert "held-out sentences" in capsys.readouterr().out
