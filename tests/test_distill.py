"""The recovery recipe: attention transfer (layer-local and joint), fine-tune (LoRA and full), checkpoints
and resume, errors, the `rewrite distill` command and the example."""

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
                                                                         losses=("ce", "kl")))
    result = distill(model, plan, lambda step: llama_data(0), cfg)
    assert result.lora_parameters and all("lora_" in n for n in result.lora_parameters)
    losses = result.history["finetune"]
    assert losses[-1] < losses[0]
    teacher = dict(model.named_parameters())
    for name, p in result.module.named_parameters():
        base = name.replace(".base_layer", "")
        if base in teacher and "lora_" not in name:
            assert torch.equal(p, teacher[base]), name


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
