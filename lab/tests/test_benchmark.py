"""The benchmark grid through the in-process launcher (FusionBench pools and methods in one
process; table, figure, per-cell files) on the tiny CLIP suite, read back; resume and the reused
base merge. The cost benchmark runs in the GPU check's dry run (test_gpu_check.py)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from fusion_bench_larv.evaluation import per_sample
from larv_lab.reproduce import __main__ as cli
from larv_lab.reproduce import collate
from larv_lab.reproduce.inprocess import InProcessLauncher
from larv_lab.reproduce.results import Results

pytestmark = pytest.mark.slow


def _select(suite, out, mergers, variants, references=("pretrained", "finetuned")):
    args = cli.build_parser().parse_args(
        ["bench", "--pools", f"tiny_clip:{suite.root}", "--out", str(out),
         "--merger", *mergers, *references, "--variant", *variants,
         "-o", "fabric.accelerator=cpu"]
    )  # fmt: skip
    return cli.select(args)


class Recording(InProcessLauncher):
    """Records every method it runs: (cell folder, method target, base merge given?)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, progress=lambda _: None, **kwargs)
        self.ran: list[tuple[str, str, bool]] = []

    def merge(self, session, cell, cfg, base_merge=None):
        self.ran.append((str(cell.rel_dir), cfg.method._target_, base_merge is not None))
        return super().merge(session, cell, cfg, base_merge)


def _report(out, rel):
    return json.loads((out / "runs" / rel / "program_report.json").read_text())


def test_benchmark_grid_in_process_on_tiny_clip(tiny_clip_suite, tmp_path):
    groups, cells = _select(tiny_clip_suite, tmp_path, ["ta"], ["base", "tiered", "lines"])
    assert [str(c.rel_dir) for c in cells] == [
        "bench/pretrained/base", "bench/finetuned/base", "bench/ta/base",
        "bench/ta/larv-tiered", "bench/ta/sched-lines",
    ]  # fmt: skip
    launcher = Recording(tmp_path, ["fabric.accelerator=cpu"])
    assert launcher.run(cells) == cells
    collate.collate(tmp_path, groups)
    tasks = list(tiny_clip_suite.tasks)
    res = Results(cells, tmp_path)
    # the reference rows agree with the suite's own measurement of the same models
    pre, ft = res.get("bench", "pretrained", "base"), res.get("bench", "finetuned", "base")
    for t in tasks:
        assert pre.acc[t] == pytest.approx(100 * tiny_clip_suite.stats[t]["pretrained_accuracy"])
        assert ft.acc[t] == pytest.approx(100 * tiny_clip_suite.stats[t]["finetuned_accuracy"])
    # each fine-tuned model was evaluated on every task (as FusionBench's program does with a
    # dict of models); the row reads each on its own task
    assert set(_report(tmp_path, "bench/finetuned/base")) == set(tasks)
    base, tiered = res.get("bench", "ta", "base"), res.get("bench", "ta", "larv-tiered")
    assert list(base.acc) == tasks and base.layers is None
    assert len(tiered.layers["layers"]) == tiny_clip_suite.num_layers
    assert (tmp_path / "runs/bench/ta/larv-tiered/larv_layers.json").is_file()
    for rel in ("bench/ta/base", "bench/ta/larv-tiered"):
        report = _report(tmp_path, rel)
        assert {t: 100 * report[t]["accuracy"] for t in tasks} == res.get(
            "bench", "ta", rel.rsplit("/", 1)[1]
        ).acc
    # the table: per task, average, (±Δ) against the base merger, relative to the fine-tuned
    table = (tmp_path / "artefacts" / "bench.md").read_text()
    rel = 100 * tiered.average / ft.average

    def shown(x, t=None):
        # Δ against the base cell with its paired 95% interval (* when it excludes 0)
        ci = res.interval("bench", "ta", "larv-tiered", [t] if t else None)
        b = base.acc[t] if t else base.average
        star = "*" if ci.significant else ""
        return f"{x:.1f} ({x - b:+.1f} [{ci.lo:+.1f}, {ci.hi:+.1f}]){star}"

    task_deltas = " | ".join(shown(tiered.acc[t], t) for t in tasks)
    want = (
        f"| Task Arithmetic + LARV tiered | {task_deltas} | {shown(tiered.average)} | {rel:.1f}% |"
    )
    assert want in table
    # the per-sample files the intervals read: FusionBench's CLIP task pool, recording
    for rel_dir in ("bench/ta/base", "bench/ta/larv-tiered"):
        (evaluation,) = per_sample.read(tmp_path / "runs" / rel_dir / per_sample.FILE)
        for t in tasks:
            assert evaluation[t].mean() == pytest.approx(_report(tmp_path, rel_dir)[t]["accuracy"])
    with Image.open(tmp_path / "artefacts" / "forest_bench.png") as img:
        assert img.width > 500
    assert f"| Fine-tuned (upper bound) | {' | '.join(f'{ft.acc[t]:.1f}' for t in tasks)}" in table
    assert "| 100.0% |" in table and "| Pretrained (θ₀) |" in table
    # the `lines` schedule is a depth ramp, not LiNeS (faithful LiNeS: method=lines_ta)
    lines_row = "| Task Arithmetic + depth ramp α + β·ℓ/(L−1) (`lines` schedule, α = 0.5, β = 1) |"
    assert lines_row in table
    assert "LiNeS" not in table
    # the questions block: one merger, its tiered Δ's interval placed above / on / below 0
    ci = res.interval("bench", "ta", "larv-tiered")
    where = [ci.lo > 0, ci.lo <= 0 <= ci.hi, ci.hi < 0]
    assert f"| LARV tiered − base merger | {' / '.join(str(int(w)) for w in where)} of 1 |" in table
    c = [rec["c"] for rec in tiered.layers["layers"]]
    assert f"{min(c):.3f}–{max(c):.3f}" in table  # one merger: its own c_ℓ range
    table = table.split("**The questions")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 1 + 2 + 3  # header, suite, 2 references, 3 variants
    with Image.open(tmp_path / "artefacts" / "fig2_bench.png") as img:
        assert img.width > 800 and img.height > 300

    # an interrupted run resumes: the finished cells are skipped (their files untouched), only
    # the missing cell runs, and the earlier numbers are kept as measured
    reports = [c.run_dir(tmp_path) / "program_report.json" for c in cells]
    stamps = [p.stat().st_mtime_ns for p in reports]
    reports[-1].unlink()
    again = Recording(tmp_path, ["fabric.accelerator=cpu"])
    assert again.run(cells) == [cells[-1]]
    assert again.ran == [("bench/ta/sched-lines", "fusion_bench_larv.LARVAlgorithm", False)]
    assert [p.stat().st_mtime_ns for p in reports[:-1]] == stamps[:-1]
    assert (
        Results(cells, tmp_path).get("bench", "ta", "sched-lines").acc
        == res.get("bench", "ta", "sched-lines").acc
    )


def test_reused_base_merge_gives_the_same_cells(tiny_clip_suite, tmp_path):
    # --reuse-base-merge runs the base merger once per merger (here: once for three cells) and
    # must reproduce, number for number, the cells that run it every time
    variants = ["base", "tiered", "continuous"]
    launchers = {}
    for reuse in (False, True):
        _, cells = _select(tiny_clip_suite, tmp_path / str(reuse), ["ta"], variants, ())
        launchers[reuse] = Recording(
            tmp_path / str(reuse), reuse_base_merge=["ta"] if reuse else []
        )
        launchers[reuse].run(cells)
    ta, larv = "fusion_bench.method.TaskArithmeticAlgorithm", "fusion_bench_larv.LARVAlgorithm"
    assert [r[1:] for r in launchers[True].ran] == [(ta, False), (larv, True), (larv, True)]
    assert [r[1:] for r in launchers[False].ran] == [(ta, False), (larv, False), (larv, False)]
    # a finished base cell: its merge is computed once more (not evaluated) for the LARV cells
    for c in cells[1:]:
        (c.run_dir(tmp_path / "True") / "program_report.json").unlink()
    again = Recording(tmp_path / "True", reuse_base_merge=["ta"])
    again.run(cells)
    assert [r[1:] for r in again.ran] == [(ta, False), (larv, True), (larv, True)]
    for c in cells:
        a, b = (c.run_dir(tmp_path / str(reuse)) for reuse in (False, True))
        assert json.loads((a / "program_report.json").read_text()) == json.loads(
            (b / "program_report.json").read_text()
        )
        launch = json.loads((b / "cell.json").read_text())["launch"]
        assert launch["launcher"] == "inprocess"
        assert launch["base_merge"] == ("reused" if c.variant.larv else "computed")
        if c.variant.larv:
            la = json.loads((a / "larv_layers.json").read_text())
            lb = json.loads((b / "larv_layers.json").read_text())
            assert lb.pop("base_merge") == "reused" and la == lb
