"""The benchmark pipeline (FusionBench pools and methods in process, table, figure, JSON) on the
tiny CLIP suite, checked against the CLI path and read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from fusion_bench_larv.benchmark import InProcessFusionBench, run_benchmark, run_overrides

pytestmark = pytest.mark.slow


def test_run_overrides():
    assert run_overrides("iso_c", "base") == (
        "isotropic_merging/iso_c",
        ["method.scaling_factor=1.3"],
    )
    method, over = run_overrides("ties", "lines", {"ties": ["threshold=10"]})
    assert method == "larv_ties"
    assert "method.base_method.threshold=10" in over and "method.schedule=lines" in over


def test_benchmark_on_tiny_clip(tiny_clip_suite, tmp_path):
    runner = InProcessFusionBench(
        tiny_clip_suite.config_dir,
        tiny_clip_suite.modelpool_config,
        tiny_clip_suite.taskpool_config,
    )
    try:
        result = run_benchmark(
            runner, ["ta"], ["base", "tiered", "lines"], tmp_path, "pytest", progress=lambda _: None
        )
    finally:
        runner.close()
    tasks = list(tiny_clip_suite.tasks)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["tasks"] == tasks and len(data["runs"]) == 3
    # the reference rows agree with the suite's own measurement of the same models
    for t in tasks:
        assert data["finetuned"][t] == pytest.approx(
            tiny_clip_suite.stats[t]["finetuned_accuracy"], abs=1e-6
        )
        assert data["pretrained"][t] == pytest.approx(
            tiny_clip_suite.stats[t]["pretrained_accuracy"], abs=1e-6
        )
    base = result.get("ta", "base")
    tiered = result.get("ta", "tiered")
    assert (
        base.larv_layers is None and len(tiered.larv_layers["layers"]) == tiny_clip_suite.num_layers
    )
    assert (tmp_path / "runs" / "ta_tiered" / "larv_layers.json").is_file()
    table = (tmp_path / "table.md").read_text()
    delta = 100 * (tiered.average - base.average)
    assert f"({delta:+.1f})" in table and "Task Arithmetic +LARV tiered" in table
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 1 + 2 + 3
    with Image.open(tmp_path / "fig2_layer_metrics.png") as img:
        assert img.width > 800 and img.height > 300
    # an interrupted benchmark resumes: the cells saved above are read back, only the new
    # variant runs, and the earlier numbers are kept as measured
    (tmp_path / "runs" / "ta_lines" / "run.json").unlink()
    ran = []

    class Recording(InProcessFusionBench):
        def merge(self, method, overrides, report_dir=None, base_merge=None):
            ran.append((method, tuple(overrides)))
            return super().merge(method, overrides, report_dir, base_merge)

    runner = Recording(
        tiny_clip_suite.config_dir,
        tiny_clip_suite.modelpool_config,
        tiny_clip_suite.taskpool_config,
    )
    try:
        again = run_benchmark(
            runner, ["ta"], ["base", "tiered", "lines"], tmp_path, "pytest", progress=lambda _: None,
            resume=True,
        )  # fmt: skip
    finally:
        runner.close()
    assert ran == [("larv_ta", tuple(run_overrides("ta", "lines")[1]))]
    assert again.get("ta", "tiered").accuracy == tiered.accuracy
    assert again.get("ta", "lines").accuracy == result.get("ta", "lines").accuracy
    assert again.pretrained == result.pretrained and again.finetuned == result.finetuned


def test_reused_base_merge_gives_the_same_cells(tiny_clip_suite, tmp_path):
    # --reuse-base-merge runs the base merger once per merger (here: once for three cells) and
    # must reproduce, number for number, the cells that run it every time
    calls = []

    class Counting(InProcessFusionBench):
        def merge(self, method, overrides, report_dir=None, base_merge=None):
            calls.append((method, base_merge is not None))
            return super().merge(method, overrides, report_dir, base_merge)

    results = {}
    for reuse in ([], ["ta"]):
        runner = Counting(
            tiny_clip_suite.config_dir,
            tiny_clip_suite.modelpool_config,
            tiny_clip_suite.taskpool_config,
        )
        try:
            results[bool(reuse)] = run_benchmark(
                runner, ["ta"], ["base", "tiered", "continuous"], tmp_path / str(bool(reuse)),
                "pytest", progress=lambda _: None, reference=False, reuse_base_merge=reuse,
            )  # fmt: skip
        finally:
            runner.close()
    assert calls[3:] == [("task_arithmetic", False), ("larv_ta", True), ("larv_ta", True)]
    for variant in ("base", "tiered", "continuous"):
        a, b = results[False].get("ta", variant), results[True].get("ta", variant)
        assert a.accuracy == b.accuracy
        assert b.base_merge_reused == (variant != "base")
        if variant != "base":
            assert b.larv_layers.pop("base_merge") == "reused"
            assert a.larv_layers == b.larv_layers
    saved = json.loads((tmp_path / "True" / "runs" / "ta_tiered" / "run.json").read_text())
    assert saved["base_merge_reused"] is True


def test_cost_benchmark_smoke_on_a_tiny_tower(tmp_path):
    # the cost benchmark end to end on the smoke-test tower (real-size runs: benchmarks/RESULTS.md)
    cmd = [sys.executable, "-m", "fusion_bench_larv.lab.bench_cost", "--models", "tiny",
           "--tasks", "2", "--mergers", "ta", "--repeats", "1", "--spectra-models", "tiny",
           "--spearman-models", "tiny", "--tag", "smoke", "--out", str(tmp_path)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    res = json.loads((tmp_path / "cost-smoke.json").read_text())
    run = res["models"]["tiny"]["pool_runs"][0]["mergers"]["ta"]
    assert run["base_seconds"] > 0 and run["larv_extra_seconds_cold"] > 0
    assert run["larv_extra_seconds_randomized_warm"] > 0
    floor = res["models"]["tiny"]["floor"]
    assert floor["floor_exact_seconds"] >= floor["floor_randomized_seconds"] > 0
    spectra = res["models"]["tiny"]["spectra"]
    # the synthetic updates spread their energy with depth: the spec's top-k entropy inverts the
    # exact ranking of e, the uniform tail keeps it
    assert spectra["spearman_e_uniform_tail"] > spectra["spearman_e"]
    assert "Spearman e (uniform tail)" in (tmp_path / "cost-smoke.md").read_text()
