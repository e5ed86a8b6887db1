"""Plans: every input form, validation errors that name the field and the allowed values, selectors,
`strict`, and `disable`."""

from __future__ import annotations

import dataclasses
import json
import textwrap
from dataclasses import dataclass, field
from typing import Literal

import pytest
import torch
import yaml

import rewrite
from rewrite.errors import PlanError
from rewrite.passes import PASSES
from rewrite.passes.attention_normalize import AttentionNormalizeOptions
from rewrite.passes.base import GraphPass, PassResult
from rewrite.plan import TOP_LEVEL_KEYS, PassSpec, Plan
from rewrite.selectors import select_layers, validate_selector


@dataclass
class ProbeOptions:
    """Options of a test-only pass covering each kind of option the plan validates."""

    mode: str = field(default="fast", metadata={"choices": ["fast", "exact"]})
    kind: Literal["a", "b"] = "a"
    ratio: float = 0.5
    layers: int | str | list | None = None

    def validate(self, where: str) -> None:
        validate_selector(self.layers, f"{where}.layers")


class ProbePass(GraphPass):
    """Matches nothing and changes nothing; exists to exercise plan parsing."""

    name = "probe"
    summary = "test-only pass"
    Options = ProbeOptions

    def run(self, gm, ctx) -> PassResult:
        return PassResult(self.name)


@pytest.fixture
def probe(monkeypatch):
    monkeypatch.setitem(PASSES, "probe", ProbePass)
    return ProbePass


EXPECTED = {
    "passes": [{"attention_normalize": dataclasses.asdict(AttentionNormalizeOptions(unfused=False))}],
    "kernels": "reference",
    "strict": True,
    "debug": False,
    "disable": [],
}


def test_plan_from_dict_list_and_none() -> None:
    plan = Plan.from_data({"passes": [{"attention_normalize": {"unfused": False}}], "kernels": "reference",
                           "strict": True})
    assert plan.to_data() == EXPECTED
    assert plan.passes[0].options == AttentionNormalizeOptions(unfused=False)
    listed = Plan.from_data(["attention_normalize"])
    assert [p.name for p in listed.passes] == ["attention_normalize"]
    assert listed.passes[0].options == AttentionNormalizeOptions()
    assert Plan.from_data({"passes": [{"name": "attention_normalize", "unfused": False}]}).passes[0].options.unfused is False
    assert Plan.from_data(None).passes == []
    assert Plan.from_data(plan) is plan


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".toml", ".json", ".py"])
def test_plan_files(tmp_path, suffix: str) -> None:
    texts = {
        ".yaml": "kernels: reference\nstrict: true\npasses:\n  - attention_normalize:\n      unfused: false\n",
        ".toml": 'kernels = "reference"\nstrict = true\n[[passes]]\n[passes.attention_normalize]\nunfused = false\n',
        ".json": json.dumps({"kernels": "reference", "strict": True,
                             "passes": [{"attention_normalize": {"unfused": False}}]}),
        ".py": textwrap.dedent("""
            from rewrite.passes.attention_normalize import AttentionNormalizeOptions
            plan = {"kernels": "reference", "strict": True,
                    "passes": [{"attention_normalize": AttentionNormalizeOptions(unfused=False)}]}
        """),
    }
    texts[".yml"] = texts[".yaml"]
    path = tmp_path / f"plan{suffix}"
    path.write_text(texts[suffix])
    assert Plan.load(path).to_data() == EXPECTED
    assert Plan.parse(str(path)).to_data() == EXPECTED


def test_inline_yaml_and_dump_round_trip() -> None:
    plan = Plan.parse("{passes: [{attention_normalize: {unfused: false}}], kernels: reference, strict: true}")
    assert plan.to_data() == EXPECTED
    assert Plan.from_data(yaml.safe_load(plan.dump_yaml())).to_data() == EXPECTED


def test_dataclass_options_and_pass_specs() -> None:
    options = AttentionNormalizeOptions(unfused=False)
    plan = Plan.from_data([{"attention_normalize": options}])
    assert plan.passes[0].options is options
    spec = PassSpec("attention_normalize", AttentionNormalizeOptions())
    assert Plan.from_data([spec]).passes[0] is spec


def test_python_plan_file_without_plan_variable(tmp_path) -> None:
    path = tmp_path / "plan.py"
    path.write_text("passes = []\n")
    with pytest.raises(PlanError, match="defines no variable named 'plan'"):
        Plan.load(path)


def _error(data) -> PlanError:
    with pytest.raises(PlanError) as info:
        Plan.from_data(data)
    return info.value


def test_unknown_pass_lists_passes() -> None:
    err = _error(["attention_normalise"])
    assert err.field == "passes[0]"
    assert "attention_normalise" in str(err)
    assert "attention_normalize" in err.allowed and "attention_normalize" in str(err)


def test_unknown_option_lists_options() -> None:
    err = _error([{"attention_normalize": {"unfuse": True}}])
    assert err.field == "passes[0].attention_normalize.unfuse"
    assert err.allowed == sorted(f.name for f in dataclasses.fields(AttentionNormalizeOptions))
    assert "unfused" in str(err)


def test_bad_value_type_names_field_and_type() -> None:
    err = _error(["attention_normalize", {"attention_normalize": {"unfused": "yes"}}])
    assert err.field == "passes[1].attention_normalize.unfused"
    assert "'yes'" in str(err) and "bool" in str(err)


@pytest.mark.parametrize("options", [[], [{"kind": "gla"}], "gla", 0, False, ""])
def test_options_that_are_not_a_mapping_are_a_plan_error_naming_the_pass(options) -> None:
    """`{mixer: []}` once read as `{}`: every non-mapping is refused, naming the field and the expected form."""
    err = _error(["attention_normalize", {"mixer": options}])
    assert err.field == "passes[1].mixer"
    assert "mapping of option names to values" in str(err) and repr(options) in str(err)
    assert "kind" in err.allowed
    err = _error([PassSpec("mixer", options)])
    assert err.field == "passes[0].mixer"


def test_options_left_empty_are_the_defaults() -> None:
    """`- mixer:` in YAML (None) and `{mixer: {}}` both mean the pass's default options."""
    for plan in (Plan.parse("passes: [{mixer: }]"), Plan.from_data([{"mixer": {}}]), Plan.from_data(["mixer"])):
        assert plan.passes[0].options == PASSES["mixer"].Options()


def test_sequence_parallel_strategy_field_is_named_with_its_pass_position() -> None:
    err = _error(["attention_normalize", {"sequence_parallel": {"strategy": "nope"}}])
    assert err.field == "passes[1].sequence_parallel.strategy" and "ulysses" in str(err)
    err = _error([{"sequence_parallel": {"strategy": {"softmax": "lasp2"}}}])
    assert err.field == "passes[0].sequence_parallel.strategy.softmax"


def test_bad_choice_and_literal_list_allowed_values(probe) -> None:
    err = _error([{"probe": {"mode": "slow"}}])
    assert err.field == "passes[0].probe.mode"
    assert "'fast'" in str(err) and "'exact'" in str(err)
    err = _error([{"probe": {"kind": "c"}}])
    assert err.field == "passes[0].probe.kind"
    assert "Literal" in str(err) or "'a'" in str(err)
    err = _error([{"probe": {"ratio": "half"}}])
    assert err.field == "passes[0].probe.ratio" and "float" in str(err)
    assert Plan.from_data([{"probe": {"mode": "exact", "kind": "b", "ratio": 1}}]).passes[0].options.ratio == 1


def test_bad_selector_names_field(probe) -> None:
    err = _error([{"probe": {"layers": [1, 2.5]}}])
    assert err.field == "passes[0].probe.layers"
    assert "2.5" in str(err) and "slice" in str(err)
    assert Plan.from_data([{"probe": {"layers": ["1:-1", 0, "model.layers.*"]}}]).passes[0].options.layers


def test_bad_top_level_key_lists_keys() -> None:
    err = _error({"pases": ["attention_normalize"]})
    assert err.field == "pases"
    assert err.allowed == TOP_LEVEL_KEYS
    assert all(key in str(err) for key in TOP_LEVEL_KEYS)


def test_unknown_disable_name_lists_passes() -> None:
    err = _error({"passes": ["attention_normalize"], "disable": ["atention_normalize"]})
    assert err.field == "disable"
    assert "attention_normalize" in err.allowed


def test_bad_kernels_and_flags() -> None:
    err = _error({"kernels": "cuda"})
    assert err.field == "kernels" and err.allowed == ["auto", "triton", "reference"]
    assert _error({"strict": "yes"}).field == "strict"
    assert _error({"passes": "attention_normalize"}).field == "passes"
    assert _error(42).field == "<plan>"


def test_missing_or_unknown_plan_file(tmp_path) -> None:
    with pytest.raises(PlanError, match="no plan file"):
        Plan.load(tmp_path / "missing.yaml")
    other = tmp_path / "plan.ini"
    other.write_text("[x]\n")
    with pytest.raises(PlanError) as info:
        Plan.load(other)
    assert ".yaml" in info.value.allowed


PATHS = [f"model.layers.{i}" for i in range(6)]


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        (2, [2]),
        (-1, [5]),
        ("-2", [4]),
        ("1:-1", [1, 2, 3, 4]),
        ("::2", [0, 2, 4]),
        ("-2:", [4, 5]),
        ("model.layers.[0-2]", [0, 1, 2]),
        ("*.3", [3]),
        (None, list(range(6))),
        ("all", list(range(6))),
        ([0, "-2:", "model.layers.3", 5], [0, 4, 5, 3]),
        ([1, 1, "1"], [1]),
    ],
)
def test_selectors(selector, expected: list[int]) -> None:
    assert select_layers(selector, PATHS) == expected


def test_selector_errors() -> None:
    with pytest.raises(IndexError, match="out of range"):
        select_layers(6, PATHS)
    with pytest.raises(ValueError):
        select_layers(True, PATHS)
    assert select_layers("decoder.*", PATHS) == []
    with pytest.raises(PlanError) as info:
        validate_selector(1.5, "passes[0].x.layers")
    assert info.value.field == "passes[0].x.layers"


class TinyMLP(torch.nn.Module):
    """A model with no attention at all."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


def test_strict_pass_matching_nothing_raises() -> None:
    with pytest.raises(PlanError) as info:
        rewrite.optimize(TinyMLP(), {"passes": ["attention_normalize"], "strict": True}, torch.randn(2, 8))
    assert info.value.field == "passes[0].attention_normalize"
    assert "matched nothing" in str(info.value)


def test_non_strict_pass_matching_nothing_warns() -> None:
    model = TinyMLP()
    x = torch.randn(2, 8)
    with pytest.warns(UserWarning, match="'attention_normalize' matched nothing"):
        om = rewrite.optimize(model, ["attention_normalize"], x)
    torch.testing.assert_close(om(x), model(x), rtol=0, atol=0)


def test_disabled_pass_does_not_run() -> None:
    from examples.models import handwritten

    model, (ids,) = handwritten()
    om = rewrite.optimize(model, {"passes": ["attention_normalize"], "disable": "attention_normalize"}, ids)
    assert om.report.results == []
    assert om.plan.enabled_passes == []
    assert any("softmax" in str(n.target) for n in om.graph.nodes)


@pytest.mark.parametrize(
    ("suffix", "text", "parser"),
    [(".yaml", "passes: [attention_normalize\n", "ParserError"), (".toml", "passes = [\n", "TOMLDecodeError"),
     (".json", '{"passes": [}', "JSONDecodeError"), (".py", "plan = {'passes': [}\n", "SyntaxError"),
     (".py", "raise RuntimeError('boom')\n", "RuntimeError")],
)
def test_unreadable_plan_file_is_a_plan_error_naming_the_file(tmp_path, suffix, text, parser) -> None:
    path = tmp_path / f"plan{suffix}"
    path.write_text(text)
    for read in (Plan.load, Plan.parse):
        with pytest.raises(PlanError) as info:
            read(str(path))
        assert info.value.field == "<plan>" and str(path) in str(info.value) and parser in str(info.value)


def test_folder_bad_inline_yaml_and_bare_pass_name_are_plan_errors(tmp_path) -> None:
    with pytest.raises(PlanError, match="is not a file"):
        Plan.parse(str(tmp_path))
    with pytest.raises(PlanError, match="not valid inline YAML"):
        Plan.parse("{passes: [attention_normalize")
    with pytest.raises(PlanError, match="pass names go in a list"):
        Plan.parse("attention_normalize")
    assert Plan.parse("").passes == []


def test_disable_of_another_type_is_a_plan_error() -> None:
    err = _error({"disable": 3})
    assert err.field == "disable" and "attention_normalize" in err.allowed


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"layer_skip": {"layers": "decoder.*"}}, "passes[1].layer_skip.layers"),
        ({"mixer": {"layers": "decoder.*"}}, "passes[1].mixer.layers"),
        ({"mixer": {"layers": []}}, "passes[1].mixer.layers"),
        ({"stateful": {"sliding_window": 4, "window_layers": "decoder.*"}}, "passes[1].stateful.window_layers"),
    ],
    ids=["layer_skip", "mixer", "mixer-empty-list", "stateful-window_layers"],
)
def test_layer_selector_matching_no_layer_is_a_plan_error_in_every_pass(entry, field) -> None:
    """`layer_skip` once only warned (it matched nothing), `mixer` raised a PassError and `stateful` ignored it: each
    now names the field with its pass position, the model's layers and the selector forms."""
    from examples import models

    model, example = models.llama(batch=2, length=8)
    with pytest.raises(PlanError) as info:
        rewrite.optimize(model, ["attention_normalize", entry], example_kwargs=example)
    assert info.value.field == field
    assert "selects no layer" in str(info.value)
    assert "0: model.layers.0, 1: model.layers.1" in str(info.value)
    assert "module-path glob" in str(info.value)


def test_layer_selector_out_of_range_names_the_field_with_its_pass_position() -> None:
    from examples import models

    model, example = models.llama(batch=2, length=8)
    plan = {"passes": ["attention_normalize", {"mixer": {"layers": 5}}], "disable": ["attention_normalize"]}
    with pytest.raises(PlanError) as info:
        rewrite.optimize(model, plan, example_kwargs=example)
    assert info.value.field == "passes[1].mixer.layers"  # its position in the plan, not among the enabled passes
    assert "out of range for 2 layers" in str(info.value) and "1: model.layers.1" in str(info.value)
