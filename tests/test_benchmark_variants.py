"""The benchmarks' variant switch: constants changed for one timing are merged (dicts) and put back."""

import pytest

from benchmarks.variants import apply_changes, restore


def test_variant_changes_merge_dicts_and_are_restored():
    from rewrite.kernels.linear_attention import triton_backward, triton_gated

    tiles, paths = dict(triton_backward.DQK_TILES), dict(triton_gated.SUB_PRODUCTS)
    undo = apply_changes("rewrite.kernels.linear_attention", [
        ("triton_backward", "DQK_TILES", {2: (16, 16, 2)}),
        ("triton_gated", "SUB_PRODUCTS", {"backward": "batched"}),
    ])
    assert triton_backward.DQK_TILES == {**tiles, 2: (16, 16, 2)}
    assert triton_gated.SUB_PRODUCTS == {**paths, "backward": "batched"}
    restore(undo)
    assert triton_backward.DQK_TILES == tiles and triton_gated.SUB_PRODUCTS == paths


def test_variant_changes_replace_other_values_and_are_restored():
    from rewrite.kernels.delta_rule import triton_backward

    version = triton_backward.BACKWARD_VERSION
    undo = apply_changes("rewrite.kernels.delta_rule", [("triton_backward", "BACKWARD_VERSION", "v2"),
                                                        ("triton_backward", "BACKWARD_VERSION", "v9")])
    assert triton_backward.BACKWARD_VERSION == "v9"
    restore(undo)  # in reverse: the value before the first change comes back
    assert triton_backward.BACKWARD_VERSION == version


def test_decode_benchmark_reads_inductor_options():

    from benchmarks.decode import inductor_options

    assert inductor_options("max_autotune=1, coordinate_descent_tuning=false,cpp.simdlen=8,x=y") == {
        "max_autotune": True, "coordinate_descent_tuning": False, "cpp.simdlen": 8, "x": "y"}
    assert inductor_options("") == {}
    with pytest.raises(SystemExit, match="expected name=value, got 'max_autotune'"):
        inductor_options("max_autotune")


def test_layer_skip_kv_kernel_variants_name_the_kernels_constants():
    """`--kv-kernel-variants` sets only launch constants the split-KV kernel has, as ints or booleans."""
    from benchmarks.layer_skip import KV_KERNEL_CONSTANTS, kv_kernel_variants
    from rewrite.kernels.kv_cache_attention import triton_decode

    assert all(isinstance(getattr(triton_decode, name), int) for name in KV_KERNEL_CONSTANTS)
    assert kv_kernel_variants("BLOCK_N=128; TARGET_PROGRAMS=2048,MAX_SPLITS=128;SKIP_EMPTY_TILES=0") == [
        ("BLOCK_N=128", [("triton_decode", "BLOCK_N", 128)]),
        ("TARGET_PROGRAMS=2048,MAX_SPLITS=128", [("triton_decode", "TARGET_PROGRAMS", 2048),
                                                 ("triton_decode", "MAX_SPLITS", 128)]),
        ("SKIP_EMPTY_TILES=0", [("triton_decode", "SKIP_EMPTY_TILES", False)]),
    ]
    for bad in ("BLOCK=64", "BLOCK_N=big", "NUM_WARPS"):
        with pytest.raises(SystemExit, match="expected NAME=integer"):
            kv_kernel_variants(bad)


def test_mixer_speed_kernel_variants_are_the_sweep_variants():
    from benchmarks.linear_attention import SWEEP
    from benchmarks.mixer_speed import kernel_changes

    assert kernel_changes("scan g4 32x16") == SWEEP["scan g4 32x16"]
    with pytest.raises(SystemExit, match="unknown kernel variant 'no such'"):
        kernel_changes("no such")


def test_linear_attention_sweep_variants_name_existing_constants():
    """A SWEEP variant naming a constant the kernels do not have would time the default under its name."""
    import importlib

    from benchmarks.linear_attention import SWEEP

    for name, changes in SWEEP.items():
        for module, attr, _ in changes:
            mod = importlib.import_module(f"rewrite.kernels.linear_attention.{module}")
            assert hasattr(mod, attr), f"sweep variant {name!r}: {module}.{attr} does not exist"


def test_linear_attention_sweep_variant_turns_the_default_saving_off_and_restores_it():
    """SAVE_STATES is on by default; the "recompute states" variant turns it off while it is timed and the default
    comes back after."""
    from benchmarks.linear_attention import SWEEP
    from rewrite.kernels.linear_attention import op

    assert op.SAVE_STATES is True
    undo = apply_changes("rewrite.kernels.linear_attention", SWEEP["recompute states"])
    assert op.SAVE_STATES is False
    restore(undo)
    assert op.SAVE_STATES is True


def test_decode_benchmark_times_ring_caches_of_a_sliding_window(monkeypatch, tmp_path):
    """`--tiny --sliding-window 16`: a Mistral-shaped model whose rewrite softmax step runs over ring caches of 16
    slots (contexts 64 and 128 wrap them), with the split-KV op (its CPU reference here) and with SDPA, checked
    against the full forward past the window, beside the original's step."""
    import json

    from benchmarks.decode import main
    from rewrite.decode import sites

    shapes = []
    op = sites.kv_cache_attention

    def kernel(q, keys, values, visible, scale, last_slot=None):
        shapes.append(tuple(keys.shape))
        return op(q, keys, values, visible, scale, last_slot)

    monkeypatch.setattr(sites, "KV_CACHE_ATTENTION_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(sites, "kv_cache_attention", kernel)
    out = tmp_path / "decode.json"
    main(["--tiny", "--sliding-window", "16", "--sdpa-attention-too", "--out", str(out)])
    result = json.loads(out.read_text())
    assert "sliding window 16" in result["title"]
    assert float(result["env"]["rewrite softmax: step vs full rel err"]) < 1e-4
    assert float(result["env"]["original: KV cache vs full rel err"]) < 1e-4
    rows = {(r["name"], r["params"]["context"], r["params"]["batch"]): r for r in result["rows"]}
    assert all(r["params"]["window"] == 16 for r in result["rows"])
    for name in ("rewrite softmax (ring KV cache)", "rewrite softmax (ring KV cache, SDPA)",
                 "original (HF, SDPA, DynamicCache)", "linearized"):
        assert all(rows[name, context, batch]["runs"] > 0 for context in (64, 128) for batch in (1, 4)), name
    assert shapes and all(shape[2] == 16 for shape in shapes)  # the kernel ran over the rings' 16 slots


LAYER_SKIP_TINY = ["--layers", "2", "--hidden", "128", "--decode-batch", "4", "--decode-context", "64",
                   "--fractions", "0.5", "--runs", "2"]
"""The layer-skip benchmark at a size the CPU runs in seconds."""


def test_layer_skip_benchmark_runs_tiny_and_checks_skipped_variants(tmp_path):
    """The layer-skip benchmark at tiny size on the CPU: every variant runs, the per-sequence check against the
    original model with the skipped blocks made the identity passes (the script exits non-zero otherwise), and the
    rows it prints as it goes are the ones it writes."""
    import json

    from benchmarks import layer_skip

    out = tmp_path / "layer_skip.json"
    layer_skip.FAILURES.clear()
    layer_skip.main([*LAYER_SKIP_TINY, "--lengths", "64", "--batch", "2", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    names = {r["name"] for r in rows}
    for variant in ("none", "all", "f=0.5 spread", "f=0.5 shared"):
        assert f"prefill {variant}" in names and f"decode step (KV cache) {variant}" in names
    errors = [float(r["extra"]["rel err"]) for r in rows if r["name"].startswith("prefill f=")]
    assert errors and max(errors) < 1e-4


def test_layer_skip_benchmark_runs_the_decode_variants_asked_for(tmp_path):
    """`--decode-only --decode-variants` times only those real decode steps, with their share of the ideal; an
    unknown variant is refused before any model is built."""
    import json

    from benchmarks import layer_skip

    with pytest.raises(SystemExit, match="not among"):
        layer_skip.main([*LAYER_SKIP_TINY, "--decode-variants", "f=0.25 spread", "--out", str(tmp_path / "x.json")])
    out = tmp_path / "layer_skip.json"
    layer_skip.FAILURES.clear()
    layer_skip.main([*LAYER_SKIP_TINY, "--decode-only", "--decode-variants", "none,all,f=0.5 spread", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == [f"decode step (KV cache) {v}" for v in ("none", "all", "f=0.5 spread")]
    assert "of ideal" in rows[-1]["extra"]


def test_layer_skip_kv_kernel_set_holds_for_the_run_and_is_restored(tmp_path, monkeypatch):
    """`--kv-kernel-set` sets the split-KV kernel's launch constants while the run lasts (the decode steps read
    them) and puts the defaults back after; a constant the kernel lacks is refused before any model is built."""
    from benchmarks import layer_skip
    from rewrite.kernels.kv_cache_attention import triton_decode

    default = triton_decode.BLOCK_N
    seen = []
    monkeypatch.setattr(layer_skip, "run", lambda *args: seen.append((triton_decode.BLOCK_N, triton_decode.NUM_WARPS)))
    layer_skip.main([*LAYER_SKIP_TINY, "--kv-kernel-set", "BLOCK_N=32,NUM_WARPS=8", "--out", str(tmp_path / "x.json")])
    assert seen == [(32, 8)]
    assert triton_decode.BLOCK_N == default
    with pytest.raises(SystemExit, match="BLOCK_M"):
        layer_skip.main([*LAYER_SKIP_TINY, "--kv-kernel-set", "BLOCK_M=32", "--out", str(tmp_path / "x.json")])


def test_decode_benchmark_times_programs_with_decode_fusions(tmp_path):
    """`--tiny --fusions norms,rotary,kv_write`: the linearized and rewrite softmax programs built with the fusions
    hold one fused norm per RMSNorm and one rotary call per softmax layer (and write KV caches by one call), decode
    like the full forward, and their steps are timed beside the default programs'."""
    import json

    from benchmarks.decode import main

    out = tmp_path / "decode.json"
    main(["--tiny", "--fusions", "norms,rotary,kv_write", "--out", str(out)])
    result = json.loads(out.read_text())
    env = result["env"]
    layers = 2  # benchmarks.decode's tiny model
    linearized_norms, softmax_norms = (int(n) for n in env["fused norms (linearized / softmax)"].split(" / "))
    assert linearized_norms == softmax_norms == 2 * layers + 1
    assert int(env["fused rotary (linearized / softmax)"].split(" / ")[1]) == layers
    for name in ("linearized (fused norms + rotary + kv_write)", "rewrite softmax (fused norms + rotary + kv_write)"):
        assert float(env[f"{name}: step vs full rel err"]) < 1e-4, name
    names = {r["name"] for r in result["rows"] if r["runs"] > 0}
    assert {"linearized (fused norms + rotary + kv_write)",
            "rewrite softmax (KV cache, fused norms + rotary + kv_write)"} <= names
