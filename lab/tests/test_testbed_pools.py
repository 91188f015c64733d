"""The testbed's FusionBench pools through the real ``fusion_bench`` CLI, and the README's demo
on the ``ci`` recipe (same code paths as the quick/full runs, tiny sizes)."""

from __future__ import annotations

import json
import re

import pytest

from fusion_bench_larv.evaluation import per_sample
from larv_lab.testbed.tiny_clip import run_fusion_bench

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
    assert len(printed.splitlines()) <= 80
    assert "reusing the real-weights testbed" in printed
    # FusionBench's own output went to each cell's log, not the terminal
    assert "Merging " not in printed and "Evaluating tasks" not in printed
    # the in-process launcher's cells: the references and TA alone and tiered
    runs = out / "runs" / "bench"
    cells = sorted(str(p.parent.relative_to(runs)) for p in runs.glob("*/*/program_report.json"))
    assert cells == ["finetuned/base", "pretrained/base", "ta/base", "ta/larv-tiered"]
    assert all((runs / c / "fusion_bench.log").is_file() for c in cells)
    reports = {c: json.loads((runs / c / "program_report.json").read_text()) for c in cells}
    for c in ("ta/base", "ta/larv-tiered"):
        assert set(reports[c]) == {*TASKS, "average"}
    # the fine-tuned reference reads each model on its own task only
    assert set(reports["finetuned/base"]) == set(TASKS)
    for task, report in reports["finetuned/base"].items():
        assert set(report) - {"average", "model_info"} == {task}
    # the progress line and the printed averages hold the average this run measured
    avg = 100 * sum(_accuracy(reports["ta/base"], t) for t in TASKS) / len(TASKS)
    assert f"bench/ta/base: avg {avg:6.2f}" in printed
    assert re.search(rf"^Task Arithmetic +{avg:6.2f} *$", printed, re.M)
    # the per-layer scales of the LARV cell, as written in its larv_layers.json
    layers = json.loads((runs / "ta" / "larv-tiered" / "larv_layers.json").read_text())
    assert " ".join(f"{rec['s']:.2f}" for rec in layers["layers"]) in printed
    # the collated per-task table: every Δ with its paired 95% interval (average and every task)
    table = (out / "artefacts" / "bench.md").read_text()
    assert "| LARV tiered − base merger |" in table  # the questions block, after the table
    rows = [line for line in table.split("**The questions")[0].splitlines()
            if line.startswith("| ")]  # fmt: skip
    assert len(rows) == 1 + 1 + 2 + 2
    tiered_row = next(row for row in rows if "+ LARV tiered" in row)
    assert tiered_row.count(" [") == len(TASKS) + 1
    assert re.search(r"\(([+-]\d+\.\d) \[([+-]\d+\.\d), ([+-]\d+\.\d)\]\)\*? \|", tiered_row)
    assert "paired bootstrap 95% interval" in table
    assert (out / "artefacts" / "fig2_bench.png").is_file()
    assert (out / "artefacts" / "forest_bench.png").stat().st_size > 0
    # per-sample correctness beside each merged cell's report: its mean is the reported accuracy
    for c in ("ta/base", "ta/larv-tiered"):
        (evaluation,) = per_sample.read(runs / c / per_sample.FILE)
        assert set(evaluation) == set(TASKS)
        for task in TASKS:
            assert evaluation[task].mean() == _accuracy(reports[c], task)
    # one verdict line for TA tiered, from the collated average Δ and its interval, set against
    # the committed benchmark
    import csv

    with open(out / "artefacts" / "bench.csv", newline="") as fh:
        (avg_row,) = [
            r for r in csv.DictReader(fh)
            if r["merger"] == "ta" and r["variant"] == "larv-tiered" and r["column"] == "average"
        ]  # fmt: skip
    lo, hi = float(avg_row["lo"]), float(avg_row["hi"])
    word = "better" if lo > 0 else "worse" if hi < 0 else "no significant difference"
    line = next(ln for ln in printed.splitlines() if ln.startswith("verdict Task Arithmetic"))
    assert f"LARV tiered: {float(avg_row['delta']):+.2f} pp [{lo:+.2f}, {hi:+.2f}], {word}" in line
    assert "committed" in line and "(build seeds)" in line
    assert "forest_bench.png" in printed


def _bench_csv(path, rows):
    """A bench.csv holding the average rows ``(suite, merger, variant, ours, delta, lo, hi)``."""
    import csv

    fields = ["suite", "row", "merger", "variant", "column", "ours", "base", "delta", "lo", "hi",
              "significant", "paper", "paper_delta", "paper_derived"]  # fmt: skip
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fields)
        w.writeheader()
        for suite, merger, variant, ours, delta, lo, hi in rows:
            sig = "" if delta is None else str(lo > 0 or hi < 0)
            w.writerow({
                "suite": suite, "row": f"{merger} {variant}", "merger": merger,
                "variant": variant, "column": "average", "ours": ours,
                "delta": "" if delta is None else delta, "lo": "" if lo is None else lo,
                "hi": "" if hi is None else hi, "significant": sig,
            })  # fmt: skip
    return path


def test_demo_verdicts_against_the_committed_benchmark(tmp_path):
    from larv_lab.demo import verdicts

    demo = _bench_csv(tmp_path / "demo.csv", [
        ("d", "ta", "base", 70.0, None, None, None),
        ("d", "ta", "larv-tiered", 71.0, 1.0, 0.5, 1.5),
        ("d", "ties", "larv-tiered", 70.0, -2.0, -3.0, -1.0),
        ("d", "iso_c", "larv-tiered", 70.0, 0.2, -0.3, 0.7),
        ("d", "iso_c", "larv-continuous", 70.0, 0.4, -0.3, 1.1),
    ])  # fmt: skip
    committed = _bench_csv(tmp_path / "committed.csv", [
        ("s0", "ta", "larv-tiered", 73.0, 1.5, 0.8, 2.2),
        ("s1", "ta", "larv-tiered", 72.0, 0.6, -0.1, 1.4),
        ("s0", "ties", "larv-tiered", 73.0, 2.0, 1.4, 2.5),
        ("s1", "ties", "larv-tiered", 73.0, 2.2, 1.6, 2.8),
        ("s0", "iso_c", "larv-tiered", 80.0, -0.1, -0.5, 0.3),
        ("s1", "iso_c", "larv-tiered", 80.0, 0.1, -0.3, 0.5),
    ])  # fmt: skip
    lines = verdicts(demo, committed)
    assert len(lines) == 4  # one per variant row; the base row has none
    ta, ties, iso, iso_cont = lines
    assert ta.startswith("verdict ta larv-tiered: +1.00 pp [+0.50, +1.50], better")
    assert "committed +1.50* / +0.60 (build seeds): agrees in sign" in ta
    assert "worse (interval below 0)" in ties and "DIFFERS in sign" in ties
    assert "smaller than the benchmark's" in ties  # says why
    assert "no significant difference" in iso and "seeds disagree in sign" in iso
    assert "not in the committed benchmark" in iso_cont
    assert all("no committed benchmark at" in ln for ln in verdicts(demo, tmp_path / "none.csv"))


def test_every_recipe_has_a_model_pool_and_a_task_pool_config():
    """``modelpool=LarvTestbed/<recipe>`` and ``taskpool=LarvTestbed/<recipe>`` exist for every
    recipe of the three families, and name that recipe and the pool classes."""
    from omegaconf import OmegaConf

    from larv_lab import config_dir
    from larv_lab.testbed.build import RECIPES
    from larv_lab.testbed.decoder_build import DECODER_RECIPES
    from larv_lab.testbed.pools import recipe_modality
    from larv_lab.testbed.text_build import TEXT_RECIPES

    families = {"image": RECIPES, "text": TEXT_RECIPES, "generation": DECODER_RECIPES}
    for modality, recipes in families.items():
        for name in recipes:
            assert recipe_modality(name) == modality
            for kind, cls in (("modelpool", "TestbedModelPool"), ("taskpool", "TestbedTaskPool")):
                cfg = OmegaConf.load(config_dir() / kind / "LarvTestbed" / f"{name}.yaml")
                assert cfg.recipe == name, (kind, name)
                assert cfg._target_ == f"larv_lab.testbed.pools.{cls}", (kind, name)
