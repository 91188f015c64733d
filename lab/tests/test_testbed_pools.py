"""The testbed's FusionBench pools through the real ``fusion_bench`` CLI, and the README's demo
on the ``ci`` recipe (same code paths as the quick/full runs, tiny sizes)."""

from __future__ import annotations

import json
import re

import pytest

from fusion_bench_larv import per_sample
from larv_lab.tiny_clip import run_fusion_bench

TASKS = ("mnist", "fashion_mnist", "animal_mnist", "sklearn_digits", "opencv_digits")


def _accuracy(report: dict, task: str) -> float:
    return float(report[task]["accuracy"])


@pytest.mark.slow
def test_cli_larv_ties_on_the_testbed(ci_testbed, tmp_path):
    root = str(ci_testbed.root)
    log_dir = tmp_path / "logs"
    report = run_fusion_bench(
        [
            "method=larv_ties",
            "modelpool=LarvTestbed/ci",
            "taskpool=LarvTestbed/ci",
            f"modelpool.testbed_dir={root}",
            f"taskpool.testbed_dir={root}",
        ],
        cwd=tmp_path,
        log_dir=log_dir,
    )
    for task in TASKS:
        assert 0.0 <= _accuracy(report, task) <= 1.0
    layers = json.loads((log_dir / "larv_layers.json").read_text())
    # DINOv2 ViT-S/14: twelve blocks, tiered gate 4/4/4 over twelve distinct scores
    assert [rec["index"] for rec in layers["layers"]] == list(range(1, 13))
    scales = sorted(rec["s"] for rec in layers["layers"])
    assert scales == sorted([0.5] * 4 + [1.0] * 4 + [1.5] * 4)
    assert all(rec["prefix"].startswith("encoder.layer.") for rec in layers["layers"])
    assert layers["settings"]["gate"] == "tiered"


@pytest.mark.slow
def test_demo_prints_a_measured_comparison(ci_testbed, tmp_path, capsys):
    from larv_lab import demo

    out = tmp_path / "demo"
    cache = ci_testbed.root.parent
    rc = demo.main(
        [
            "--recipe", "ci", "--cache-dir", str(cache), "--mergers", "ta",
            "--variants", "base", "tiered", "--out", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "(cached: nothing was rebuilt)" in printed
    assert "Task Arithmetic" in printed and "+ LARV tiered" in printed
    # the in-process launcher's cells: the references and TA alone and tiered
    runs = out / "runs" / "bench"
    cells = sorted(str(p.parent.relative_to(runs)) for p in runs.glob("*/*/program_report.json"))
    assert cells == ["finetuned/base", "pretrained/base", "ta/base", "ta/larv-tiered"]
    reports = {c: json.loads((runs / c / "program_report.json").read_text()) for c in cells}
    for c in ("ta/base", "ta/larv-tiered"):
        assert set(reports[c]) == {*TASKS, "average"}
    # the progress line and the printed table hold the average this run measured
    avg = 100 * sum(_accuracy(reports["ta/base"], t) for t in TASKS) / len(TASKS)
    assert f"bench/ta/base: avg {avg:6.2f}" in printed
    assert f"| {avg:.1f} |" in printed
    # the per-layer scales of the LARV cell, as written in its larv_layers.json
    layers = json.loads((runs / "ta" / "larv-tiered" / "larv_layers.json").read_text())
    assert " ".join(f"{rec['s']:.2f}" for rec in layers["layers"]) in printed
    # and the printed table is the collated bench.md, row for row
    table = (out / "artefacts" / "bench.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 1 + 2 + 2 and all(row in printed for row in rows)
    assert (out / "artefacts" / "fig2_bench.png").is_file()
    # per-sample correctness beside each merged cell's report: its mean is the reported accuracy
    for c in ("ta/base", "ta/larv-tiered"):
        (evaluation,) = per_sample.read(runs / c / per_sample.FILE)
        assert set(evaluation) == set(TASKS)
        for task in TASKS:
            assert evaluation[task].mean() == _accuracy(reports[c], task)
    # the Δ of the LARV row carries its paired 95% interval (average and every task)
    tiered_row = next(row for row in rows if "+ LARV tiered" in row)
    assert tiered_row.count(" [") == len(TASKS) + 1
    assert re.search(r"\(([+-]\d+\.\d) \[([+-]\d+\.\d), ([+-]\d+\.\d)\]\)\*? \|", tiered_row)
    assert "paired bootstrap 95% interval" in table
    assert (out / "artefacts" / "forest_bench.png").stat().st_size > 0
    # one verdict line for TA, from the collated average Δ and its interval
    import csv

    with open(out / "artefacts" / "bench.csv", newline="") as fh:
        (avg_row,) = [
            r for r in csv.DictReader(fh)
            if r["merger"] == "ta" and r["variant"] == "larv-tiered" and r["column"] == "average"
        ]  # fmt: skip
    lo, hi = float(avg_row["lo"]), float(avg_row["hi"])
    word = "better" if lo > 0 else "worse" if hi < 0 else "no significant difference"
    line = next(ln for ln in printed.splitlines() if ln.startswith("verdict Task Arithmetic"))
    assert f"tiered {float(avg_row['delta']):+.2f} pp [{lo:+.2f}, {hi:+.2f}]: {word}" in line
    assert "forest_bench.png" in printed
