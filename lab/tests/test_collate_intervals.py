"""Tables and the forest plot with paired intervals, from hand-written cell folders (reports and
per-sample files; no model runs): every Δ shows its interval, significant ones are marked, the
CSV has delta / lo / hi / significant, old runs without per-sample files fall back to the plain
Δ (and the notes say so), and a bench over two suites shows them side by side. LARV's rows are
also compared with the same merger's linear ramp (a last column, CSV fields *_linear, a second
forest panel); without a linear cell those stay out / empty."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import numpy as np
import pytest

from fusion_bench_larv.evaluation import intervals as iv
from fusion_bench_larv.evaluation import per_sample
from fusion_bench_larv.evaluation.compare import compare
from larv_lab.reproduce import collate
from larv_lab.reproduce import experiments as X
from larv_lab.reproduce.results import Results
from larv_lab.reproduce.timings import TIME_GROUPS, time_group

N = {"t1": 400, "t2": 250}


def _write(cell, out, correct: dict[str, np.ndarray], with_per_sample: bool = True) -> None:
    d = cell.run_dir(out)
    d.mkdir(parents=True, exist_ok=True)
    report = {t: {"accuracy": float(c.mean()), "loss": 0.0} for t, c in correct.items()}
    (d / "program_report.json").write_text(json.dumps(report))
    if with_per_sample:
        labels = {t: np.arange(n) % 10 for t, n in N.items()}
        entries = {t: per_sample.encode_task(c, labels[t]) for t, c in correct.items()}
        per_sample.write(d / per_sample.FILE, [entries])


def _cells(suite=None):
    cells = X.filter_cells(
        X.EXPERIMENTS["bench"].cells(), mergers=["ta"], variants=["base", "tiered", "linear"]
    )
    return [replace(c, suite=suite) for c in cells] if suite else cells


def _grid(out, cells, seed=0, per_sample_for=("base", "larv-tiered", "sched-linear")):
    rng = np.random.default_rng(seed)
    base = {t: rng.random(n) < 0.7 for t, n in N.items()}
    # tiered: clearly better (flips 15% of the wrong answers to right); linear: same as base but
    # for two images per task, one each way (Δ = 0, interval around 0)
    tiered = {t: c | (rng.random(c.size) < 0.5) for t, c in base.items()}
    linear = {}
    for t, c in base.items():
        c = c.copy()
        i, j = np.flatnonzero(c)[0], np.flatnonzero(~c)[0]
        c[i], c[j] = False, True
        linear[t] = c
    acc = {"base": base, "larv-tiered": tiered, "sched-linear": linear}
    for c in cells:
        _write(c, out, acc[c.variant.slug], c.variant.slug in per_sample_for)
    return acc


def test_bench_table_and_csv_show_intervals(tmp_path):
    cells = _cells()
    acc = _grid(tmp_path, cells)
    written = collate.collate(tmp_path, {"bench": cells})
    art = tmp_path / "artefacts"
    assert art / "forest_bench.png" in written and (art / "forest_bench.png").stat().st_size > 0
    table = (art / "bench.md").read_text()
    base, tiered = acc["base"], acc["larv-tiered"]
    # per task: Δ [lo, hi] from the paired bootstrap of that task's two vectors, * when > 0
    r = iv.paired_bootstrap(tiered["t1"], base["t1"])
    x = 100 * tiered["t1"].mean()
    want = f"{x:.1f} ({100 * r.delta:+.1f} [{100 * r.lo:+.1f}, {100 * r.hi:+.1f}])*"
    assert r.significant and want in table
    # the average: per-task resampling, equal task weights
    avg = iv.average_bootstrap([(tiered[t], base[t]) for t in N])
    ours = sum(100 * tiered[t].mean() for t in N) / 2
    assert (
        f"{ours:.1f} ({100 * avg.delta:+.1f} [{100 * avg.lo:+.1f}, {100 * avg.hi:+.1f}])*" in table
    )
    # linear: Δ = 0 per task, interval straddles 0, no *
    row = next(line for line in table.splitlines() if "+ Linear" in line)
    assert "(+0.0 [" in row and "*" not in row
    assert "paired bootstrap 95% interval" in table and "B = 2000" in table
    assert "No interval" not in table
    # CSV: delta, lo, hi, significant
    with open(art / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"delta", "lo", "hi", "significant"} <= set(rows[0])
    rec = next(r for r in rows if r["variant"] == "larv-tiered" and r["column"] == "average")
    assert float(rec["lo"]) == round(100 * avg.lo, 4) and rec["significant"] == "True"
    rec = next(r for r in rows if r["variant"] == "base" and r["column"] == "average")
    assert rec["delta"] == rec["lo"] == rec["significant"] == ""


def test_larv_rows_against_the_linear_ramp(tmp_path):
    cells = _cells()
    acc = _grid(tmp_path, cells)
    collate.collate(tmp_path, {"bench": cells})
    art = tmp_path / "artefacts"
    table = (art / "bench.md").read_text()
    tiered, linear = acc["larv-tiered"], acc["sched-linear"]
    # by hand: Δ̄ = mean over tasks of (acc_tiered − acc_linear); the interval resamples each
    # task's images for both (larv-compare's computation, A = linear, B = tiered)
    delta = sum(100 * (tiered[t].mean() - linear[t].mean()) for t in N) / len(N)
    avg = iv.average_bootstrap([(tiered[t], linear[t]) for t in N])
    assert 100 * avg.delta == pytest.approx(delta)
    r = compare(linear, tiered).average
    assert (r.delta, r.lo, r.hi) == (avg.delta, avg.lo, avg.hi)
    # the table: a last column, only on LARV's rows; the per-task cells stay against the base
    header = next(line for line in table.splitlines() if line.startswith("| Method |"))
    assert header.endswith("| Avg. / fine-tuned | Avg. Δ vs linear |")
    row = next(line for line in table.splitlines() if "+ LARV tiered" in line)
    want = f"| {delta:+.1f} [{100 * avg.lo:+.1f}, {100 * avg.hi:+.1f}]* |"
    assert avg.lo > 0 and row.endswith(want)
    for label in ("| Task Arithmetic |", "+ Linear |"):
        line = next(ln for ln in table.splitlines() if label in ln)
        assert line.endswith(" |  |")  # no Δ vs linear for the base and the schedule rows
    assert "Avg. Δ vs linear (LARV's rows only)" in table
    # the CSV: delta_linear, lo_linear, hi_linear, significant_linear after every other field,
    # for every column of LARV's rows (a task's: that task's paired bootstrap)
    with open(art / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    keys = list(rows[0])
    assert keys[:14] == ["suite", "row", "merger", "variant", "column", "ours", "base", "delta",
                         "lo", "hi", "significant", "paper", "paper_delta", "paper_derived"]  # fmt: skip
    assert keys[14:] == ["delta_linear", "lo_linear", "hi_linear", "significant_linear"]
    rec = next(r for r in rows if r["variant"] == "larv-tiered" and r["column"] == "average")
    assert float(rec["delta_linear"]) == round(delta, 4)
    assert float(rec["lo_linear"]) == round(100 * avg.lo, 4)
    assert float(rec["hi_linear"]) == round(100 * avg.hi, 4)
    assert rec["significant_linear"] == "True"
    t1 = iv.paired_bootstrap(tiered["t1"], linear["t1"])
    rec = next(r for r in rows if r["variant"] == "larv-tiered" and r["column"] == "t1")
    assert float(rec["lo_linear"]) == round(100 * t1.lo, 4)
    for v in ("base", "sched-linear"):
        rec = next(r for r in rows if r["variant"] == v and r["column"] == "average")
        assert rec["delta_linear"] == rec["lo_linear"] == rec["significant_linear"] == ""
    assert (art / "forest_bench.png").stat().st_size > 0  # two panels


def test_without_a_linear_cell_the_linear_fields_stay_empty(tmp_path):
    cells = [c for c in _cells() if c.variant.slug != "sched-linear"]
    _grid(tmp_path, cells)
    collate.collate(tmp_path, {"bench": cells})
    table = (tmp_path / "artefacts" / "bench.md").read_text()
    assert "vs linear" not in table
    with open(tmp_path / "artefacts" / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert "delta_linear" in rows[0]
    assert all(r["delta_linear"] == r["lo_linear"] == r["significant_linear"] == "" for r in rows)
    assert (tmp_path / "artefacts" / "forest_bench.png").stat().st_size > 0


def test_old_runs_without_per_sample_files_keep_the_plain_delta(tmp_path):
    cells = _cells()
    acc = _grid(tmp_path, cells, per_sample_for=("larv-tiered", "sched-linear"))  # base: none
    collate.collate(tmp_path, {"bench": cells})
    table = (tmp_path / "artefacts" / "bench.md").read_text()
    base, tiered = acc["base"], acc["larv-tiered"]
    x, b = 100 * tiered["t1"].mean(), 100 * base["t1"].mean()
    assert f"| {x:.1f} ({x - b:+.1f}) |" in table
    # no interval against the base anywhere in the table (its last column, against the linear
    # ramp, has one: both of those cells have per-sample files)
    lines = [ln for ln in table.split("\n\n")[1].splitlines() if ln.startswith("| ")]
    assert "[" not in "".join(ln.rsplit(" | ", 1)[0] for ln in lines)
    assert "[" in next(ln for ln in lines if "+ LARV tiered" in ln).rsplit(" | ", 1)[1]
    assert "No interval for 2 row(s)" in table and "per_sample.json" in table
    assert (tmp_path / "artefacts" / "forest_bench.png").is_file()  # hollow points, no bars
    # a per-sample file that disagrees with the report (stale) is not used either
    cell = next(c for c in cells if c.variant.slug == "base")
    wrong = {t: ~c for t, c in base.items()}
    entries = {t: per_sample.encode_task(c) for t, c in wrong.items()}
    per_sample.write(cell.run_dir(tmp_path) / per_sample.FILE, [entries])
    res = Results(cells, tmp_path)
    assert res.get("bench", "ta", "base").per_sample is None
    assert res.interval("bench", "ta", "larv-tiered") is None


def test_two_suites_side_by_side_and_in_one_forest_plot(tmp_path):
    s0 = replace(X.BENCH, key="full", label="testbed:full")
    s1 = replace(X.BENCH, key="full_seed1", label="testbed:full_seed1")
    cells = _cells(s0) + _cells(s1)
    _grid(tmp_path, _cells(s0), seed=0)
    _grid(tmp_path, _cells(s1), seed=1)
    collate.collate(tmp_path, {"bench": cells})
    table = (tmp_path / "artefacts" / "bench.md").read_text()
    side = table.split("**Average per suite, side by side**")[1]
    assert "| Method | testbed:full | testbed:full_seed1 |" in side
    res = Results(cells, tmp_path)
    s0s1 = ("full", "full_seed1")
    a, b = (res.interval(k, "ta", "larv-tiered") for k in s0s1)
    row = next(line for line in side.splitlines() if "+ LARV tiered" in line)
    assert f"[{a.lo:+.1f}, {a.hi:+.1f}]" in row and f"[{b.lo:+.1f}, {b.hi:+.1f}]" in row
    # then LARV's Δ against the linear ramp, one column per suite
    assert "| Δ vs linear, testbed:full | Δ vs linear, testbed:full_seed1 |" in side
    la, lb = (res.interval(k, "ta", "larv-tiered", against="sched-linear") for k in s0s1)
    assert row.endswith(
        f"| {la.delta:+.1f} [{la.lo:+.1f}, {la.hi:+.1f}]* | {lb.delta:+.1f} [{lb.lo:+.1f}, "
        f"{lb.hi:+.1f}]* |"
    )
    assert (tmp_path / "artefacts" / "forest_bench.png").stat().st_size > 0


def test_every_benchmark_row_has_its_run_time_group():
    """The run-time notes group rows by what a budget could keep or drop; each bench variant
    lands where its definition says (data-using rows apart, ablations and per-task apart)."""
    suite = X.EXPERIMENTS["bench"].suites[0]
    group = {v.slug: time_group(X.Cell(suite, "ta", v)) for v in X.BENCH_VARIANTS}
    assert group["base"] == "base mergers and references"
    assert {
        group[s] for s in ("larv-tiered", "larv-continuous", "sched-linear", "sched-lines")
    } == {"LARV gates and depth schedules"}
    assert (
        group["larv-tiered-r0e0c1"]
        == group["larv-tiered-per-task"]
        == ("ablation and per-task rows")
    )
    assert group["lines-val"] == group["larv-guarded"] == group["signed-ramp-val"]
    assert group["lines-val"] == "LiNeS, the signed depth ramp and guarded LARV (validation data)"
    assert (
        group["fitted-scales-val"]
        == group["fitted-scales-val-per-task"]
        == ("per-block scales fitted on validation labels (the ceiling)")
    )
    ada = X.Cell(suite, "testbed_adamerging", X.BASE)
    assert time_group(ada) == "AdaMerging (test inputs)"
    assert set(group.values()) | {time_group(ada)} == set(TIME_GROUPS.values())


def test_rows_whose_choice_missed_tasks_are_marked(tmp_path):
    """A data-using row whose value was chosen on validation that missed a task carries ‡ and
    the notes name the task; one that saw every task is unmarked; a cell from before coverage
    was recorded is marked 'not recorded'."""
    from larv_lab.reproduce import rows
    from larv_lab.reproduce.columns import avg_col
    from larv_lab.reproduce.tablefmt import Table

    cells = X.filter_cells(X.EXPERIMENTS["bench"].cells(), mergers=["ta"],
                           variants=["base", "lines-val", "signed-ramp-val", "guarded"])  # fmt: skip
    assert {c.variant.slug for c in cells} == {"base", "lines-val", "signed-ramp-val",
                                               "larv-guarded"}  # fmt: skip
    rng = np.random.default_rng(0)
    blocks = {"lines-val": ("lines_layers.json", {"beta": 0.5, "uncovered_tasks": ["t2"]}),
              "signed-ramp-val": ("signed_depth_ramp_layers.json", {"uncovered_tasks": []}),
              "larv-guarded": ("larv_layers.json", {"delta": 0.0})}  # fmt: skip
    for c in cells:
        _write(c, tmp_path, {t: rng.random(n) < 0.7 for t, n in N.items()})
        if c.variant.slug in blocks:
            name, block = blocks[c.variant.slug]
            (c.run_dir(tmp_path) / name).write_text(json.dumps({"validation": block}))
    res = Results(cells, tmp_path)
    suite = cells[0].suite.key
    t = Table("bench", "t", ["Avg."])
    t.header()
    variants = ["base", "lines-val", "signed-ramp-val", "larv-guarded"]
    rows.merger_blocks(t, res, [avg_col(suite)], cells, variants, None, rows.row_labels(cells),
                       None)  # fmt: skip
    rows.table_notes(t, res, None)
    marked = {r["variant"] for r in t.records if r["row"].endswith(rows.UNSEEN)}
    assert marked == {"lines-val", "larv-guarded"}
    (note,) = [n for n in t.notes if n.startswith(rows.UNSEEN)]
    assert f"{suite}: t2 (1 row)" in note and f"{suite}: not recorded (1 row)" in note
