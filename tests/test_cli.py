"""The `rewrite` command line, run in-process on the built-in targets (each captured once)."""

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from rewrite import cli
from rewrite.render import render_text
from rewrite.targets import TargetError, load_target, parse_spec

TARGETS = ["llama", "bert", "gpt2", "multihead_attention", "handwritten", "transformer_encoder"]
PLAN = "attention_normalize"
REPO = Path(__file__).resolve().parent.parent
_PREPARED: dict = {}


@pytest.fixture(autouse=True)
def capture_once(monkeypatch):
    """Every (target, plan) is captured and rewritten once for the whole module."""
    real = cli.prepare

    def cached(target, plan, log):
        key = (target, yaml.safe_dump(plan.to_data()))
        if key not in _PREPARED:
            _PREPARED[key] = real(target, plan, log)
        return _PREPARED[key]

    monkeypatch.setattr(cli, "prepare", cached)


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("target", TARGETS)
def test_every_format_renders(capsys, target):
    base = ["dump", target, "--plan", PLAN, "--stage", "all", "-q"]
    code, text, _ = run(capsys, *base, "--format", "text")
    assert code == 0
    for stage in ("captured", PLAN, "final"):
        assert f"stage: {stage}" in text
    assert any(line.startswith("+ ") for line in text.splitlines())
    assert "rewrite.attention" in text

    code, table, _ = run(capsys, *base, "--format", "table")
    assert code == 0 and "attention (" in table and "seq" in table

    code, dot, _ = run(capsys, *base, "--format", "dot")
    assert code == 0 and dot.count("digraph") == 3 and "subgraph cluster_" in dot and "->" in dot

    code, svg, _ = run(capsys, *base, "--format", "svg")
    root = ET.fromstring(svg)
    assert code == 0 and root.tag == "{http://www.w3.org/2000/svg}svg"
    assert len(root.findall(".//{http://www.w3.org/2000/svg}rect")) > 10

    code, raw, _ = run(capsys, *base, "--format", "json")
    data = json.loads(raw)
    assert code == 0 and [s["name"] for s in data["stages"]] == ["captured", PLAN, "final"]
    stage = data["stages"][1]
    assert stage["sites"] and all(s["form"] == "canonical" for s in stage["sites"])
    assert any(n["added"] and n["op"] == "rewrite.attention" for n in stage["nodes"])
    assert data["passes"][0]["matched"] == len(stage["sites"])
    names = {n["name"] for n in stage["nodes"]}
    assert all(a in names and b in names for a, b in stage["edges"])


def test_text_marks_removed_and_added_lines(capsys):
    code, text, err = run(capsys, "dump", "handwritten", "--plan", PLAN, "--stage", PLAN)
    assert code == 0
    lines = text.splitlines()
    assert any(line.startswith("- ") and "aten.softmax" in line for line in lines)
    assert any(line.startswith("+ ") and "rewrite.attention" in line for line in lines)
    assert "rendering" in err  # progress on stderr


def test_output_file_format_from_suffix(capsys, tmp_path):
    out = tmp_path / "graph.svg"
    code, stdout, err = run(capsys, "dump", "multihead_attention", "--plan", PLAN, "-o", str(out))
    assert code == 0 and stdout == "" and "wrote" in err
    assert ET.parse(out).getroot().tag.endswith("svg")


@pytest.mark.parametrize("target", ["llama", "bert", "handwritten"])
def test_explain_prints_formulas(capsys, target):
    code, out, _ = run(capsys, "explain", target, "--plan", PLAN, "--seq", "128,1k", "--batch", "2", "-q")
    assert code == 0
    assert "attention sites (2)" in out
    assert "seq**2" in out and "batch*seq" in out
    assert "seq=128" in out and "seq=1024" in out
    assert "total" in out and "activations" in out
    if target == "bert":
        assert "not causal" in out
    else:
        assert ", causal" in out


def test_explain_json(capsys):
    code, out, _ = run(capsys, "explain", "gpt2", "--plan", PLAN, "--seq", "64", "--json", "-q")
    data = json.loads(out)
    assert code == 0 and len(data["sites"]) == 2 and all(s["causal"] for s in data["sites"])
    assert "seq" in data["total"]["flops"]["formula"]
    assert data["total"]["flops"]["values"]["64"] > 0


def test_passes_lists_options(capsys):
    code, out, _ = run(capsys, "passes")
    assert code == 0 and "attention_normalize" in out and "--unfused: bool = True" in out


@pytest.mark.parametrize(
    ("plan", "field"),
    [
        ("{passes: [{attention_normalize: {bogus: 1}}]}", "passes[0].attention_normalize.bogus"),
        ("{passes: [no_such_pass]}", "passes[0]"),
        ("{passes: [attention_normalize], kernels: fast}", "kernels"),
        ("{passes: [", "<plan>"),
        ("missing.yaml", "<plan>"),
    ],
)
def test_bad_plan_exits_2_naming_the_field(capsys, plan, field):
    code, out, err = run(capsys, "dump", "llama", "--plan", plan)
    assert code == 2 and out == ""
    assert field in err and "Traceback" not in err


def test_bad_target_and_stage_exit_2(capsys):
    code, _, err = run(capsys, "dump", "no_such_model", "-q")
    assert code == 2 and "no_such_model" in err and "llama" in err
    code, _, err = run(capsys, "dump", "llama", "--plan", PLAN, "--stage", "mixer", "-q")
    assert code == 2 and "'mixer'" in err and "attention_normalize" in err
    code, _, err = run(capsys, "dump", "llama", "--format", "png")
    assert code == 2 and "invalid choice" in err


def test_capture_error_exits_2_without_traceback(capsys, tmp_path):
    path = tmp_path / "branchy.py"
    path.write_text(
        "import torch\n\n"
        "class Branchy(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return x * 2 if x.sum() > 0 else x\n\n"
        "def make(length=8):\n"
        "    return Branchy(), (torch.randn(2, length),)\n"
    )
    code, _, err = run(capsys, "dump", f"{path}:make?length=4", "-q")
    assert code == 2 and "could not capture Branchy" in err and "Traceback" not in err


def test_failing_target_file_or_factory_exits_2_without_traceback(capsys, tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("raise ImportError('no such dependency')\n")
    code, _, err = run(capsys, "dump", f"{path}:make", "-q")
    assert code == 2 and "broken.py" in err and "ImportError: no such dependency" in err and "Traceback" not in err
    code, _, err = run(capsys, "dump", "handwritten?batch=x", "-q")
    assert code == 2 and "handwritten" in err and "'batch': 'x'" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["--batch", "0"], ["--batch", "-1"], ["--seq", "0"], ["--seq", "2k,-5"]])
def test_explain_refuses_non_positive_sizes(capsys, argv):
    code, out, err = run(capsys, "explain", "handwritten", "-q", *argv)
    assert code == 2 and out == "" and ">= 1" in err


def test_target_specs(tmp_path):
    assert parse_spec("llama?batch=1,length=8&attn=eager") == ("llama", {"batch": 1, "length": 8, "attn": "eager"})
    model, args, kwargs = load_target("examples.models:handwritten?batch=3,length=5")
    assert type(model).__name__ == "HandwrittenLM" and args[0].shape == (3, 5) and kwargs == {}
    with pytest.raises(TargetError, match="takes: batch, length"):
        load_target("handwritten?width=3")
    with pytest.raises(TargetError, match="no file"):
        load_target("nowhere/model.py:make")
    with pytest.raises(TargetError, match="has no 'nope'"):
        load_target("examples.models:nope")


def test_python_m_rewrite_passes():
    proc = subprocess.run([sys.executable, "-m", "rewrite", "passes"], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "attention_normalize" in proc.stdout


def test_dump_and_explain_example(tmp_path, capsys):
    from examples import dump_and_explain

    result = dump_and_explain.main(["--target", "handwritten", "--seq", "256", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "attention_normalize: " in out and "seq=256" in out
    assert [v.name for v in result["views"]] == ["captured", PLAN, "final"]
    assert json.loads((tmp_path / "handwritten.json").read_text())["stages"]
    assert ET.parse(tmp_path / "handwritten.svg").getroot().tag.endswith("svg")


def test_dump_and_explain_example_on_a_hugging_face_folder(tmp_path, capsys):
    """The example takes a saved Hugging Face folder as its target: the mixer's calls replace its attention."""
    import transformers

    from examples import dump_and_explain

    config = transformers.Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=8, vocab_size=100)
    transformers.Qwen3ForCausalLM(config).save_pretrained(tmp_path / "qwen3")
    result = dump_and_explain.main(["--target", f"{tmp_path / 'qwen3'}?length=32", "--plan",
                                    "{passes: [{mixer: {kind: gla}}]}", "--seq", "256"])
    out = capsys.readouterr().out
    assert "Qwen3ForCausalLM" in out and "seq=256" in out
    final = result["views"][-1]
    assert "gla_mixer" in render_text(final) and "scaled_dot_product_attention" not in render_text(final)
