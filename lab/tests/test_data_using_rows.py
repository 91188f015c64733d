"""The benchmark's data-using rows on the real-weights testbed (``ci`` recipe): the held-out
validation split, LiNeS and guarded LARV choosing on it through the harness, and FusionBench's
layer-wise AdaMerging with the testbed's heads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch


@pytest.mark.slow
def test_held_out_split_is_disjoint_from_training_and_test(ci_testbed):
    from larv_lab.testbed import build as B
    from larv_lab.testbed import toolkit as K
    from larv_lab.testbed.pools import TestbedTaskPool
    from larv_lab.testbed.sources import load_source

    pool = TestbedTaskPool(testbed_dir=str(ci_testbed.root), split="validation", val_size=12)
    for task in ci_testbed.tasks:
        data = load_source(task)
        train_x, _, test_x, _, train_idx, test_idx, rest = K.split_indices(data, ci_testbed.recipe)
        assert not set(rest.tolist()) & set(train_idx.tolist())  # never a training image
        if train_x is test_x:  # one pool split in two: never a test image either
            assert not set(rest.tolist()) & set(test_idx.tolist())
        x, y = pool.examples(task)
        assert len(y) == min(12, len(rest))
        images, labels = K.held_out_split(data, ci_testbed.recipe, 12)
        assert np.array_equal(labels, y.numpy())
        torch.testing.assert_close(
            x["pixel_values"], B.preprocess(images, ci_testbed.resolution), rtol=0, atol=0
        )
    report = pool.evaluate(ci_testbed.load_pretrained())
    assert "validation" in report["average"]["split"]
    # kept in memory for a choice's guard; the pool has no program, and a validation split
    # never writes per_sample.json
    assert len(pool.per_sample_evaluations) == 1


def _cell_method(cell, out):
    """The cell's method node as the launchers compose it (``+cell=<name>``), resolved."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from larv_lab.reproduce import sweep

    sweep_dir = sweep.write_sweep(cell.suite, [cell], out)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(sweep_dir), version_base=None):
            cfg = compose(sweep.PRIMARY, overrides=[f"+cell={cell.name}"])
            return OmegaConf.to_container(cfg.method, resolve=True)
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.slow
def test_data_using_cells_choose_on_validation(ci_testbed, ci_testbed_cache, tmp_path):
    """The harness's three data-using cells over TA on the testbed, composed as the launchers
    compose them; LiNeS's and guarded LARV's run in process (two-value grids without growing, to
    keep the test short): each report holds the grid, a score per value, the coverage and the
    chosen value: the best score's, or for guarded LARV δ = 0 where the guard finds its gain not
    significant."""
    from hydra.utils import instantiate

    from larv_lab.reproduce import experiments as X
    from larv_lab.testbed.pools import TestbedModelPool

    pool_spec = X.parse_pool(f"testbed:ci:{ci_testbed_cache}")
    variants = {"lines": X.LINES_VAL, "signed": X.SIGNED_RAMP_VAL, "delta": X.GUARDED}
    cells = X.map_pools([X.Cell(X.BENCH, "ta", v) for v in variants.values()], pool_spec)
    for cell, row in zip(cells, variants, strict=True):
        key = "delta" if row == "delta" else "beta"
        method = _cell_method(cell, tmp_path / row)
        v = method["validation"]
        assert v["taskpool"]["split"] == "validation"
        assert v["taskpool"]["cache_dir"] == str(ci_testbed_cache.resolve())  # the suite's pool
        assert v["grid"][0] == 0.0 and len(v["grid"]) > 2  # larv/validation.yaml's grid
        assert v["grow"]["bounds"][0] == (-2.0 if row == "signed" else 0.0)
        assert v["uncovered"] == "choose"
        if key == "beta":
            target = "SignedDepthRamp" if row == "signed" else "LiNeSAlgorithm"
            assert method["_target_"].endswith(target)
            assert method["base_method"]["_target_"].endswith("TaskArithmeticAlgorithm")
            assert method["base_method"]["scaling_factor"] == 1.0  # LiNeS replaces it
        if row == "signed":
            continue  # LiNeS's code with β's domain widened (tests/test_selection.py runs it)
        v["grid"], v["grow"] = ([0.0, 1.0] if key == "beta" else [0.0, 0.5]), None
        v["taskpool"]["val_size"] = 8
        alg = instantiate(method, _recursive_=False)
        alg.report_dir = str(tmp_path / row)
        alg.run(TestbedModelPool(testbed_dir=str(ci_testbed.root)))
        rep = alg.last_report["validation"]
        assert rep["parameter"] == key and len(rep["scores"]) == 2
        assert rep["best"] == rep["grid"][int(np.argmax(rep["scores"]))]
        assert rep["uncovered_tasks"] == [] and rep["tasks"] == list(ci_testbed.tasks)
        guard = rep["guard"]
        if key == "beta":
            assert guard is None and rep[key] == rep["best"]
        else:
            assert guard["level"] == 0.95
            assert rep[key] == (rep["best"] if guard["significant"] is not False else 0.0)


@pytest.mark.slow
def test_lines_reuses_a_base_merge_only_of_the_identical_merger_config(
    ci_testbed, ci_testbed_cache, tmp_path
):
    # LiNeS over Task Arithmetic runs TA at coefficient 1, not the base cell's TA: no reuse;
    # over the simple average (no coefficient) the base cell's merge is LiNeS's own
    from larv_lab.reproduce import experiments as X
    from larv_lab.reproduce.inprocess import InProcessLauncher, SuiteSession
    from larv_lab.reproduce.sweep import write_sweep

    pool_spec = X.parse_pool(f"testbed:ci:{ci_testbed_cache}")
    cells = X.map_pools([X.Cell(X.BENCH, m, v) for m in ("ta", "simple_average")
                         for v in (X.BASE, X.LINES_VAL)], pool_spec)  # fmt: skip
    launcher = InProcessLauncher(tmp_path, reuse_base_merge=["ta", "simple_average"])
    session = SuiteSession(write_sweep(cells[0].suite, cells, tmp_path))
    try:
        same = {
            c.merger: launcher._same_base_config(session, c, session.compose(c))
            for c in cells
            if c.variant == X.LINES_VAL
        }
    finally:
        session.close()
    assert same == {"ta": False, "simple_average": True}


def test_adamerging_stops_when_the_window_means_level_off():
    # the means of the last two windows: 10 → 9.96 is a 0.4 % change (stops at 0.5 %), 10 → 9.9
    # a 1 % change (does not); fewer than two windows never stop
    from larv_lab.testbed.adamerging import levelled_off

    assert levelled_off([10.0, 10.0, 9.96, 9.96], 2, 0.005)
    assert not levelled_off([10.0, 10.0, 9.9, 9.9], 2, 0.005)
    assert levelled_off([11.0, 9.0, 9.97, 9.95], 2, 0.005)  # means 10 and 9.96: noise averages out
    assert not levelled_off([10.0, 10.0, 10.0], 2, 0.005)


@pytest.mark.slow
def test_adamerging_on_the_testbed(ci_testbed, tmp_path):
    """The lab's method config (its interpolations read the task pool's testbed) instantiated
    and run until its stopping rule ends FusionBench's loop (a one-step window, a loose
    tolerance: after two steps): λ moves, and the curve, λ and why it stopped are written."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from larv_lab import config_dir
    from larv_lab.testbed.pools import TestbedModelPool, TestbedTaskPool

    root = str(ci_testbed.root)
    method = OmegaConf.load(config_dir() / "method" / "LarvTestbed" / "adamerging.yaml")
    doc = OmegaConf.create({"taskpool": {"recipe": "ci", "cache_dir": None, "testbed_dir": root},
                            "method": method})  # fmt: skip
    doc.method.max_steps, doc.method.batch_size = 5, 4
    doc.method.stop_window, doc.method.stop_rel_change = 1, 0.99
    alg = instantiate(doc.method, _recursive_=False)
    alg.report_dir = str(tmp_path)
    merged = alg.run(TestbedModelPool(testbed_dir=root))
    report = TestbedTaskPool(testbed_dir=root).evaluate(merged)
    assert all(0.0 <= report[t]["accuracy"] <= 1.0 for t in ci_testbed.tasks)
    curve = json.loads((tmp_path / "adamerging_curve.json").read_text())
    assert curve["steps"] == 2 and len(curve["curve"]) == 2 and curve["max_steps"] == 5
    assert curve["stopped"] == "levelled off" and curve["stop_rule"]["window"] == 1
    weights = torch.load(tmp_path / "merging_weights.pt")
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
