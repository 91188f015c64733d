"""The benchmark's data-using rows on the real-weights testbed (``ci`` recipe): the held-out
validation split, LiNeS and guarded LARV choosing on it through the harness, and FusionBench's
layer-wise AdaMerging with the testbed's heads."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from larv_lab.tiny_clip import run_fusion_bench


@pytest.mark.slow
def test_held_out_split_is_disjoint_from_training_and_test(ci_testbed):
    from larv_lab.testbed import build as B
    from larv_lab.testbed.pools import TestbedTaskPool
    from larv_lab.testbed.sources import load_source

    pool = TestbedTaskPool(testbed_dir=str(ci_testbed.root), split="validation", val_size=12)
    for task in ci_testbed.tasks:
        data = load_source(task)
        train_x, _, test_x, _, train_idx, test_idx, rest = B._split_indices(data, ci_testbed.recipe)
        assert not set(rest.tolist()) & set(train_idx.tolist())  # never a training image
        if train_x is test_x:  # one pool split in two: never a test image either
            assert not set(rest.tolist()) & set(test_idx.tolist())
        x, y = pool.examples(task)
        assert len(y) == min(12, len(rest))
        images, labels = B.held_out_split(data, ci_testbed.recipe, 12)
        assert np.array_equal(labels, y.numpy())
        torch.testing.assert_close(x, B.preprocess(images, ci_testbed.resolution), rtol=0, atol=0)
    report = pool.evaluate(ci_testbed.load_pretrained())
    assert "validation" in report["average"]["split"]
    assert not getattr(pool, "per_sample_evaluations", None)  # nothing recorded per sample


def _env():
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_lines_val_and_guarded_cells_choose_on_validation(ci_testbed, ci_testbed_cache, tmp_path):
    """The harness's two data-using variants over TA on the testbed: each cell's report holds
    the grid, a score per value and the chosen value, and the chosen value is the best score."""
    out = tmp_path / "out"
    args = ["bench", "--merger", "ta", "--variant", "lines-val", "guarded",
            "--pools", f"testbed:ci:{ci_testbed_cache}", "--out", str(out),
            "--launcher", "inprocess", "--no-collate", "--quiet"]  # fmt: skip
    rc = subprocess.run([sys.executable, "-m", "larv_lab.reproduce", *args], env=_env(),
                        capture_output=True, text=True)  # fmt: skip
    assert rc.returncode == 0, rc.stdout[-3000:] + rc.stderr[-3000:]
    runs = next((out / "runs").iterdir()) / "ta"
    for variant, report, key in (("lines-val", "lines_layers.json", "beta"),
                                 ("larv-guarded", "larv_layers.json", "delta")):  # fmt: skip
        rep = json.loads((runs / variant / report).read_text())
        v = rep["validation"]
        assert v["parameter"] == key and len(v["scores"]) == len(v["grid"]) > 1
        assert v[key] == v["grid"][int(np.argmax(v["scores"]))]
        assert v["taskpool"]["split"] == "validation"
        assert (runs / variant / "per_sample.json").is_file()  # the test evaluation, as usual


@pytest.mark.slow
def test_cli_adamerging_on_the_testbed(ci_testbed, tmp_path):
    root = str(ci_testbed.root)
    log_dir = tmp_path / "logs"
    report = run_fusion_bench(
        ["method=LarvTestbed/adamerging", "method.max_steps=3", "method.batch_size=4",
         "modelpool=LarvTestbed/ci", "taskpool=LarvTestbed/ci",
         f"modelpool.testbed_dir={root}", f"taskpool.testbed_dir={root}"],
        cwd=tmp_path, log_dir=log_dir,
    )  # fmt: skip
    assert all(0.0 <= report[t]["accuracy"] <= 1.0 for t in ci_testbed.tasks)
    curve = json.loads((log_dir / "adamerging_curve.json").read_text())
    assert curve["steps"] == 3 and len(curve["curve"]) == 3
    weights = torch.load(log_dir / "merging_weights.pt")
    assert weights.shape[0] == len(ci_testbed.tasks)
    assert not torch.allclose(weights, torch.full_like(weights, 0.3))  # the steps moved λ


def test_validation_node_is_one_override_the_cli_reads():
    """A data-using cell's human command gives `validation` whole (it is null in the method
    configs, so dotted keys below it would not compose), in Hydra's grammar."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from larv_lab.reproduce.experiments import flat_overrides, hydra_value

    node = {"taskpool": {"_target_": "a.B", "cache_dir": "/x y/'q'", "tasks": None,
                         "build_if_missing": False}, "grid": [0.0, 0.5]}  # fmt: skip
    assert hydra_value([1, "a"]) == '[1,"a"]'
    (ov,) = flat_overrides({"validation": node, "gate": "tiered"}, "method.")[:1]
    assert ov.startswith("method.validation={")
    parsed = OverridesParser.create().parse_overrides([ov])[0]
    assert parsed.value() == node
    assert flat_overrides({"base_method": {"scaling_factor": 1.0}}, "method.") == [
        "method.base_method.scaling_factor=1.0"
    ]
