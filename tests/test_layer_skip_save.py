"""Saving a `layer_skip` program and loading it without the source model: the routers and routed blocks come
back as they ran (same decisions, bitwise equal outputs under every per-call knob)."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from conftest import main_output, split_example

import rewrite
from examples import models
from rewrite.errors import RewriteError
from rewrite.routing import record_skips, routed_calls, skip_controls

PLAN = {"passes": [{"layer_skip": {}}]}
TARGETS = {"llama": models.llama, "transformer_encoder": models.transformer_encoder}
CONTROLS = [{}, {"threshold": 0.3}, {"budget": 0.5}, {"threshold": -1.0}, {"threshold": 1.0}]


def call(module, example, **controls):
    args, kwargs = split_example(example)
    with torch.no_grad(), skip_controls(**controls), record_skips() as report:
        out = module(*args, **kwargs)
    return main_output(out), report.decisions


def split_rows(om, example):
    """Router weights at random and each bias set so that the default threshold (0.5) skips about half of
    the example's rows at every routed block."""
    g = torch.Generator().manual_seed(3)
    routers = [c.layer for c in routed_calls(om.program)]
    with torch.no_grad():
        for layer in routers:
            weight = om.get_parameter(f"{layer}.router.weight")
            weight.copy_(torch.randn(weight.shape, generator=g))
        for column, layer in enumerate(routers):
            args, kwargs = split_example(example)
            with record_skips() as report:
                om(*args, **kwargs)
            p = report.last.probabilities[column].double().clamp(1e-12, 1 - 1e-12)
            logits = torch.sort(torch.log(p) - torch.log1p(-p)).values
            half = len(logits) // 2
            cut = float(logits[half - 1] + logits[half]) / 2
            om.get_parameter(f"{layer}.router.bias").sub_(cut)


def sequences(example):
    args, kwargs = split_example(example)
    return (args[0] if args else kwargs["input_ids"]).shape[0]


@pytest.fixture(scope="module", params=sorted(TARGETS))
def saved(request, tmp_path_factory):
    make = TARGETS[request.param]
    model, example = make(batch=4, length=8)
    args, kwargs = split_example(example)
    om = rewrite.optimize(model, PLAN, args, example_kwargs=kwargs)
    split_rows(om, example)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        folder = om.save(tmp_path_factory.mktemp("saved") / request.param)
    return make, om, example, folder


def test_folder_holds_the_program_and_one_body_per_routed_block(saved):
    _, om, _, folder = saved
    layers = [c.layer for c in routed_calls(om.program)]
    assert {p.name for p in folder.iterdir()} == {"plan.yaml", "weights.safetensors", "program.pt2", "meta.json", "routed"}
    assert sorted(p.name for p in (folder / "routed").iterdir()) == sorted(f"{layer}.pt2" for layer in layers)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["program_error"] is None
    assert [b["layer"] for b in meta["routed_blocks"]] == layers


def test_loaded_without_the_model_routes_and_computes_as_saved(saved):
    make, om, example, folder = saved
    loaded = rewrite.load(folder)
    assert loaded.source is None
    assert [c.layer for c in routed_calls(loaded.program)] == [c.layer for c in routed_calls(om.program)]
    _, decisions = call(om, example)
    partly = [(0 < s < sequences(example)) for s in decisions.sum(0).tolist()]
    assert all(partly), decisions  # every block runs some rows and skips others
    for other in (example, make(batch=3, length=5)[1], make(batch=6, length=11)[1]):
        batch = sequences(other)
        mask = torch.zeros(batch, len(partly), dtype=torch.bool)
        mask[::2, 0] = True
        mask[1::3, -1] = True
        for controls in [*CONTROLS, {"skip_mask": mask}]:
            want, want_decisions = call(om, other, **controls)
            got, got_decisions = call(loaded, other, **controls)
            assert torch.equal(got_decisions, want_decisions), controls
            assert torch.equal(got, want), controls


def test_missing_body_names_the_layer(saved, tmp_path):
    _, om, _, folder = saved
    layer = routed_calls(om.program)[-1].layer
    copy = shutil.copytree(folder, tmp_path / "copy")
    (copy / "routed" / f"{layer}.pt2").unlink()
    with pytest.raises(RewriteError, match=rf"body of routed block {layer}.*model="):
        rewrite.load(copy)
    (copy / "routed" / f"{layer}.pt2").write_bytes(b"not a program")
    with pytest.raises(RewriteError, match=rf"routed block {layer}\) is not a readable exported program"):
        rewrite.load(copy)


def test_saving_prints_nothing(tmp_path, capfd):
    model, example = models.transformer_encoder(batch=3, length=6)
    om = rewrite.optimize(model, PLAN, example)
    capfd.readouterr()
    om.save(tmp_path / "saved")
    out, err = capfd.readouterr()
    assert out == ""
    assert err == ""


def test_stand_in_ops_say_what_they_are():
    hidden = torch.zeros(2, 3, 4)
    with pytest.raises(RuntimeError, match="layers.0: rewrite::saved_route only stands for the router"):
        torch.ops.rewrite.saved_route(hidden, torch.zeros(4), torch.zeros(1), None, 0, 1, "layers.0", 0, 1, 0.5, None)
    with pytest.raises(RuntimeError, match="layers.0: rewrite::saved_routed_block only stands for a routed block"):
        torch.ops.rewrite.saved_routed_block(torch.zeros(2), torch.zeros(2, dtype=torch.long),
                                             torch.tensor(2), hidden, [], [], "layers.0")


def test_moving_a_loaded_module_retargets_its_routed_bodies(saved):
    """A loaded body's graph bakes the save device into ops' `device=` (Llama's metadata asserts); `.to()` points
    them at the new device, as it does the main program's."""
    _, om, _, folder = saved
    loaded = rewrite.load(folder)

    def devices(module):
        graphs = [module.program.graph] + [c.block.body.graph for c in routed_calls(module.program)]
        return {str(n.kwargs["device"]) for g in graphs for n in g.nodes if isinstance(n.kwargs.get("device"), torch.device)}

    before = devices(loaded)
    assert before <= {"cpu"}
    loaded.to("meta")
    assert devices(loaded) == ({"meta"} if before else set())
