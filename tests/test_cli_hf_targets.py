"""The CLI on Hugging Face model folders: tiny models saved with save_pretrained, loaded, rewritten, refused."""

import json
import shutil

import pytest
import torch
import transformers

from rewrite import cli
from rewrite.hf_targets import model_class, synthesize_inputs
from rewrite.targets import resolve_target

VOCAB = 300  # >= 256: layer-skip's byte-level text needs it
LAYERS = 2


def _decoder_sizes(**changes):
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, max_position_embeddings=128)
    return {**sizes, **changes}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Folders written by save_pretrained: Qwen3 and BERT with weights, Gemma as a config alone."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(1)
    qwen3 = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**_decoder_sizes())).eval()
    qwen3.save_pretrained(root / "qwen3")
    bert = transformers.BertModel(transformers.BertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, vocab_size=VOCAB,
        max_position_embeddings=128)).eval()
    bert.save_pretrained(root / "bert")
    transformers.GemmaConfig(**_decoder_sizes(num_key_value_heads=1), architectures=["GemmaForCausalLM"]
                             ).save_pretrained(root / "gemma")
    return {"root": root, "qwen3": qwen3, "bert": bert}


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", ["qwen3", "bert"])
def test_folder_loads_the_saved_weights(saved, name):
    reference = saved[name]
    loaded = resolve_target(str(saved["root"] / name))
    assert type(loaded.model) is type(reference)
    expected = reference.state_dict()
    got = loaded.model.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[key], expected[key]) for key in expected)
    with torch.no_grad():
        ours = loaded.model(**loaded.kwargs)[0]
        theirs = reference(**loaded.kwargs)[0]
    torch.testing.assert_close(ours, theirs)
    assert "weights loaded from" in loaded.notes[0] and "RANDOM" not in loaded.notes[0]


def test_config_alone_gives_announced_random_weights(saved, capsys):
    code, out, err = run(capsys, "dump", str(saved["root"] / "gemma"), "-q")
    assert code == 0
    assert "note: model: GemmaForCausalLM" in err and "weights are RANDOM" in err
    assert out.startswith("# model: GemmaForCausalLM") and "weights are RANDOM" in out.splitlines()[0]

    config_file = saved["root"] / "qwen3" / "config.json"  # a config file named directly: its folder's weights unused
    loaded = resolve_target(str(config_file))
    assert "weights are RANDOM" in loaded.notes[0] and f"name the folder {config_file.parent}" in loaded.notes[0]
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(loaded.model.state_dict()[weight], saved["qwen3"].state_dict()[weight])
    again = resolve_target(str(config_file))  # seeded: the same random model each time
    assert torch.equal(again.model.state_dict()[weight], loaded.model.state_dict()[weight])


def test_class_from_architectures_else_auto_by_model_type(saved):
    config = transformers.AutoConfig.from_pretrained(saved["root"] / "qwen3")
    assert model_class(config)[0] is transformers.Qwen3ForCausalLM
    config.architectures = ["NotInTransformersForCausalLM"]
    assert model_class(config)[0] is transformers.AutoModelForCausalLM
    bert = transformers.AutoConfig.from_pretrained(saved["root"] / "bert")
    bert.architectures = None
    assert model_class(bert)[0] is transformers.AutoModel  # BERT is a masked LM: built as an encoder


def test_synthesized_inputs(saved):
    kwargs, how = synthesize_inputs(VOCAB, 3, 16, "right", pad_token_id=7, seed=0)
    ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
    assert ids.shape == mask.shape == (3, 16)
    assert mask[0].all() and mask.sum(1).tolist() == [16, 14, 11] and "real lengths [16, 14, 11]" in how
    assert all(mask[row, : int(mask[row].sum())].all() for row in range(3))  # real tokens first: right padding
    assert (ids[mask == 0] == 7).all() and 0 <= int(ids.min()) and int(ids.max()) < VOCAB
    left, _ = synthesize_inputs(VOCAB, 3, 16, "left", pad_token_id=0, seed=0)
    assert torch.equal(left["attention_mask"], mask.flip(1))

    loaded = resolve_target(f"{saved['root'] / 'bert'}?batch=3,length=24")
    assert loaded.kwargs["input_ids"].shape == (3, 24) and loaded.kwargs["attention_mask"].all()
    assert int(loaded.kwargs["input_ids"].max()) < VOCAB
    assert "input_ids [3, 24] drawn uniformly from [0, 300)" in loaded.inputs_note


def test_dump_attention_normalize(saved, capsys):
    code, out, err = run(capsys, "dump", str(saved["root"] / "qwen3"), "--plan", "attention_normalize",
                         "--format", "json", "-q")
    data = json.loads(out)
    assert code == 0 and data["passes"][0]["matched"] == LAYERS
    stage = data["stages"][0]
    assert sum(n["added"] and n["op"] == "rewrite.attention" for n in stage["nodes"]) == 0  # final: lowered
    assert [s["causal"] for s in stage["sites"]] == [True] * LAYERS
    assert any(note.startswith("inputs: input_ids [2, 64]") for note in data["target_notes"])


def test_dump_mixer_gla(saved, capsys):
    code, out, _ = run(capsys, "dump", str(saved["root"] / "gemma"), "--plan", "{passes: [{mixer: {kind: gla}}]}", "-q")
    assert code == 0
    calls = [line for line in out.splitlines() if "gla_mixer(" in line]
    assert len(calls) == LAYERS and "scaled_dot_product_attention" not in out


def test_dump_varlen_removes_padding(saved, capsys):
    code, out, err = run(capsys, "dump", f"{saved['root'] / 'bert'}?padding=right", "--plan", "varlen", "-q")
    assert code == 0
    assert "attention_mask right-padded: real lengths [64, 48]" in err
    assert out.count("packed_attention(") == LAYERS and "unpad_layout" in out
    assert "scaled_dot_product_attention" not in out


def test_explain(saved, capsys):
    code, out, err = run(capsys, "explain", str(saved["root"] / "bert"), "--plan", "attention_normalize",
                         "--seq", "128", "-q")
    assert code == 0
    assert f"attention sites ({LAYERS})" in out and "not causal" in out and "seq**2" in out
    assert "model: BertModel (from the config's architectures); weights loaded from" in out
    assert "inputs: input_ids [2, 64]" in out


def _error(capsys, *argv):
    code, out, err = run(capsys, *argv, "-q")
    assert code == 2 and out == "" and "Traceback" not in err, err
    return err


def test_folder_without_config(saved, capsys, tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    err = _error(capsys, "dump", str(tmp_path))
    assert str(tmp_path) in err and "no config.json" in err and "weights.bin" in err and "save_pretrained" in err
    err = _error(capsys, "dump", "no-such-org/no-such-model")
    assert "no folder or file 'no-such-org/no-such-model'" in err and "nothing is downloaded" in err


def test_config_transformers_cannot_build(capsys, tmp_path):
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "frobnicator", "architectures": ["FrobLM"]}))
    err = _error(capsys, "dump", str(unknown))
    assert str(unknown / "config.json") in err and "cannot read this config" in err and "llama" in err
    no_model = tmp_path / "no_model"
    no_model.mkdir()
    (no_model / "config.json").write_text(json.dumps({"model_type": "blip_text_model"}))
    err = _error(capsys, "explain", str(no_model))
    assert str(no_model / "config.json") in err and "no model class for BlipTextConfig" in err and "AutoModel" in err


def test_weights_that_do_not_fit_the_config(saved, capsys, tmp_path):
    resized = tmp_path / "resized"
    shutil.copytree(saved["root"] / "qwen3", resized)
    config = json.loads((resized / "config.json").read_text())
    (resized / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    err = _error(capsys, "dump", str(resized))
    assert str(resized) in err and "do not match config.json" in err
    assert "21 tensors of another shape" in err and "lm_head.weight (file (300, 32), config (300, 64))" in err

    foreign = tmp_path / "foreign"  # BERT's weights beside Qwen3's config
    shutil.copytree(saved["root"] / "qwen3", foreign)
    shutil.copy(saved["root"] / "bert" / "model.safetensors", foreign / "model.safetensors")
    err = _error(capsys, "explain", str(foreign))
    assert str(foreign) in err and "tensors missing from the files" in err and "lm_head.weight" in err

    corrupt = tmp_path / "corrupt"
    shutil.copytree(saved["root"] / "bert", corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x10" * 64)
    err = _error(capsys, "dump", str(corrupt))
    assert str(corrupt) in err and "cannot load the weights in model.safetensors" in err


def test_pytorch_bin_weights(saved, tmp_path):
    folder = tmp_path / "bin"
    shutil.copytree(saved["root"] / "bert", folder, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(saved["bert"].state_dict(), folder / "pytorch_model.bin")
    loaded = resolve_target(str(folder))
    weight = "encoder.layer.1.attention.self.query.weight"
    assert torch.equal(loaded.model.state_dict()[weight], saved["bert"].state_dict()[weight])
    assert f"weights loaded from {folder / 'pytorch_model.bin'}" in loaded.notes[0]


def test_bad_options(saved, capsys):
    err = _error(capsys, "dump", f"{saved['root'] / 'bert'}?length=500")
    assert "max_position_embeddings (128)" in err
    err = _error(capsys, "dump", f"{saved['root'] / 'bert'}?padding=middle")
    assert "padding must be one of none, right, left" in err


def test_distill_on_a_folder(saved, capsys, tmp_path):
    code, out, err = run(capsys, "distill", f"{saved['root'] / 'qwen3'}?length=16,padding=right",
                         "--plan", "{passes: [{mixer: {kind: retention}}]}", "--transfer-steps", "2",
                         "--finetune-steps", "1", "--save", str(tmp_path / "out"), "-q")
    assert code == 0, err
    assert "transfer: 2 steps" in out and "finetune: 1 steps" in out and (tmp_path / "out").is_dir()
    assert "real lengths [16, 12]" in err  # the example inputs are the data: announced
    # an encoder's hidden states are not logits: the next-token loss is refused, not an IndexError
    err = _error(capsys, "distill", f"{saved['root'] / 'bert'}?length=16", "--plan",
                 "{passes: [{mixer: {kind: bidirectional, feature_map: hedgehog}}]}", "--transfer-steps", "0",
                 "--finetune-steps", "1", "--finetune", "full")
    assert "loss 'ce' needs logits over the vocabulary" in err and "--loss kl" in err


def test_layer_skip_on_a_folder(saved, capsys, tmp_path):
    code, out, err = run(capsys, "layer-skip", "train", str(saved["root"] / "qwen3"), "--steps", "2", "--batch", "2",
                         "--length", "32", "--eval-windows", "2", "--out", str(tmp_path), "-q")
    assert code == 0, err
    assert "held-out perplexity" in out and (tmp_path / "checkpoints" / "final.pt").is_file()
    assert "weights loaded from" in err and "inputs:" not in err  # trained on the byte corpus, not the inputs


def test_folder_named_like_a_builtin_is_written_as_a_path(saved, capsys, monkeypatch):
    monkeypatch.chdir(saved["root"])  # holds a folder `qwen3`, also a built-in name
    err = _error(capsys, "dump", "qwen3?padding=right")
    assert "unexpected keyword argument 'padding'" in err and "write ./qwen3 to load it" in err
    loaded = resolve_target("./qwen3")
    weight = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(loaded.model.state_dict()[weight], saved["qwen3"].state_dict()[weight])


def test_sharded_folder_loads_every_shard(saved, tmp_path):
    """A checkpoint saved in several shards (an index naming each tensor's file, as large models are published)
    loads every tensor from its shard."""
    reference = saved["qwen3"]
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    loaded = resolve_target(str(tmp_path / "sharded"))
    expected, got = reference.state_dict(), loaded.model.state_dict()
    assert set(got) == set(expected) and all(torch.equal(got[key], expected[key]) for key in expected)
    assert "weights loaded from" in loaded.notes[0]
