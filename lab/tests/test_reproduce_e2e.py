"""The paper-reproduction pipeline end to end, offline, on small grids: sweep (Hydra multirun of
the real ``fusion_bench`` CLI) → collate → tables and figures, read back and checked.

- tiny CLIP suite: Table 1 / Figure 2 cells; the sweep is killed after its first runs and
  started again, which must run only the missing cells; then the tables are checked against
  the reports FusionBench wrote.
- tiny CLIP suite: the benchmark's cells (TA base and tiered, pretrained and fine-tuned rows)
  under the Hydra multirun launcher and the in-process launcher give the same files and numbers,
  and the LARV cell through ``hydra-submitit-launcher``'s ``submitit_local`` (the cluster path
  minus the scheduler) gives the basic launcher's files.
- real-weights testbed (``ci``): Table 6 / Figure 4 cells with the joblib launcher.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from larv_lab.reproduce import __main__ as cli
from larv_lab.reproduce import experiments as X

pytestmark = pytest.mark.slow

TINY_ARGS = [
    "table1", "fig2",
    "--suite", "clip-vit-base-patch32_TA8",
    "--merger", "pretrained", "--merger", "ta",
    "--variant", "base", "--variant", "larv-tiered", "--variant", "larv-continuous",
    "-o", "fabric.accelerator=cpu", "-o", "seed=0",
]  # fmt: skip


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _reports(out: Path) -> dict[Path, float]:
    return {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/*/*/program_report.json")}


def _read_png(path: Path):
    import matplotlib.pyplot as plt

    img = plt.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(img.std()) > 0.01  # not a blank canvas
    return img


def _cells(args: list[str]) -> list[X.Cell]:
    parsed = cli.build_parser().parse_args(args)
    return cli.select(parsed)[1]


def test_tiny_clip_sweep_resumes_after_interruption_and_collates(tiny_clip_suite, tmp_path):
    out = tmp_path / "out"
    args = [*TINY_ARGS, "--pools", f"tiny_clip:{tiny_clip_suite.root}", "--out", str(out)]
    cells = _cells(args)
    assert len(cells) == 1 + 3  # pretrained + Task Arithmetic × 3 variants
    assert all(c.suite.mapped for c in cells)

    # 1. start the sweep, kill it (the whole process group) once two runs have finished
    proc = subprocess.Popen(
        [sys.executable, "-m", "larv_lab.reproduce", *args, "--no-collate", "--quiet"],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 900
        while len(_reports(out)) < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first = _reports(out)
    assert 2 <= len(first) < len(cells), "the sweep should have been interrupted mid-way"

    # 2. start again: only the missing cells run; the finished ones are not touched
    dry = subprocess.run(
        [sys.executable, "-m", "larv_lab.reproduce", *args, "--dry-run"],
        env=_env(), capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert f"{len(first)} done, {len(cells) - len(first)} to run" in dry.stdout
    rc = subprocess.run(
        [sys.executable, "-m", "larv_lab.reproduce", *args, "--quiet"],
        env=_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert rc.returncode == 0, rc.stdout[-3000:] + rc.stderr[-3000:]
    assert f"{len(first)} done (skipped), {len(cells) - len(first)} to run" in rc.stdout
    second = _reports(out)
    assert len(second) == len(cells)
    assert all(second[p] == t for p, t in first.items())  # not re-run
    launched = re.findall(r"\+cell=(\S+)", rc.stdout)
    assert len(launched) == 1
    done_before = {p.parent.parent.name + "__" + p.parent.name for p in first}
    assert set(launched[0].split(",")) == {c.name for c in cells} - done_before

    # 3. tables: every number is the one FusionBench reported
    art = out / "artefacts"
    md = (art / "table1.md").read_text()
    assert (
        "| Task Arithmetic + LARV tiered |" in md and "| Task Arithmetic + LARV continuous |" in md
    )
    assert "max(tiered, continuous)†" in md and "↳ *paper*" in md
    with open(art / "table1.csv") as f:
        rows = list(csv.DictReader(f))
    checked = 0
    for c in cells:
        report = json.loads((c.run_dir(out) / "program_report.json").read_text())
        tasks = [t for t in report if t not in ("model_info", "average")]
        assert tasks == list(tiny_clip_suite.tasks)
        mine = {
            r["column"]: r
            for r in rows
            if r["merger"] == c.merger and r["variant"] == c.variant.slug
        }
        for t in tasks:
            assert float(mine[t]["ours"]) == pytest.approx(100 * report[t]["accuracy"], abs=1e-3)
            checked += 1
        avg = sum(report[t]["accuracy"] for t in tasks) / len(tasks)
        assert float(mine["average"]["ours"]) == pytest.approx(100 * avg, abs=1e-3)
        if c.variant.larv is not None:
            base = json.loads(
                (out / "runs" / c.suite.key / c.merger / "base" / "program_report.json").read_text()
            )
            for t in tasks:
                want = 100 * (report[t]["accuracy"] - base[t]["accuracy"])
                assert float(mine[t]["delta"]) == pytest.approx(want, abs=1e-3)
                assert f"({want:+.1f} [" in md  # Δ with its paired 95% interval
                assert mine[t]["lo"] and float(mine[t]["lo"]) <= float(mine[t]["hi"])
            layers = json.loads((c.run_dir(out) / "larv_layers.json").read_text())
            assert layers["settings"]["gate"] == c.variant.larv["gate"]
            assert len(layers["layers"]) == tiny_clip_suite.num_layers
    assert checked == len(cells) * len(tiny_clip_suite.tasks)
    # paper anchors sit beside ours, labelled
    anchor = next(
        r
        for r in rows
        if r["merger"] == "ta" and r["variant"] == "larv-max" and r["column"] == "average"
    )
    assert float(anchor["paper"]) == 74.7 and float(anchor["paper_delta"]) == 7.1

    # 4. Figure 2: one PNG per suite, per-layer CSV with every LARV run's layers
    _read_png(art / "fig2_clip-vit-base-patch32_TA8.png")
    with open(art / "fig2.csv") as f:
        layer_rows = list(csv.DictReader(f))
    assert len(layer_rows) == 2 * tiny_clip_suite.num_layers  # 2 gates × L
    assert {float(r["s"]) for r in layer_rows if r["variant"] == "larv-tiered"} == {0.5, 1.0, 1.5}


def test_inprocess_hydra_and_submitit_launchers_agree(tiny_clip_suite, tmp_path):
    args = ["bench", "--pools", f"tiny_clip:{tiny_clip_suite.root}",
            "--merger", "ta", "--variant", "base", "tiered",
            "-o", "fabric.accelerator=cpu", "-o", "seed=0", "--no-collate"]  # fmt: skip
    hydra, inproc = tmp_path / "hydra", tmp_path / "inprocess"
    # both launchers in a process of their own with the same environment: float reductions (the
    # loss) depend on the torch thread count, which must not differ between the two
    for extra in (
        ["--out", str(hydra), "--quiet"],
        ["--out", str(inproc), "--launcher", "inprocess"],
    ):
        rc = subprocess.run(
            [sys.executable, "-m", "larv_lab.reproduce", *args, *extra],
            env=_env(), capture_output=True, text=True,
        )  # fmt: skip
        assert rc.returncode == 0, rc.stdout[-3000:] + rc.stderr[-3000:]
    cells = _cells([*args, "--out", str(hydra)])
    assert [str(c.rel_dir) for c in cells] == ["bench/ta/base", "bench/ta/larv-tiered"]
    for c in cells:
        a, b = c.run_dir(hydra), c.run_dir(inproc)
        # FusionBench's report, every number (accuracy and loss of every task), the same
        assert json.loads((a / "program_report.json").read_text()) == json.loads(
            (b / "program_report.json").read_text()
        ), c.rel_dir
        ca, cb = (json.loads((d / "cell.json").read_text()) for d in (a, b))
        assert cb.pop("launch")["launcher"] == "inprocess" and ca == cb
        if c.variant.larv is not None:  # byte for byte: the same LARV settings, scales, stats
            assert (a / "larv_layers.json").read_bytes() == (b / "larv_layers.json").read_bytes()
        else:
            assert not (b / "larv_layers.json").exists()
    # both launchers composed their cells from the same generated sweep folder
    for name in ("reproduce_suite.yaml", "cell/ta__larv-tiered.yaml"):
        texts = [(d / "_sweeps" / "bench" / name).read_text() for d in (hydra, inproc)]
        assert texts[0].replace(str(hydra), str(inproc)) == texts[1]
    _submitit_local_matches(args, hydra, tmp_path / "submitit")


def _submitit_local_matches(args: list[str], basic: Path, sub: Path) -> None:
    """The cluster path (``hydra-submitit-launcher``; ``submitit_local`` is ``submitit_slurm``
    without the scheduler: the same pickled Hydra job run by submitit in its own process) gives
    the basic launcher's files, number for number, for the LARV cell (one job: each costs a
    process start, and the base cell takes the same route)."""
    pytest.importorskip(
        "hydra_plugins.hydra_submitit_launcher", reason="pip install '.[cluster]' (or '.[test]')"
    )
    ta_args = [a for a in args if a != "base"]  # --variant tiered
    rc = subprocess.run(
        [sys.executable, "-m", "larv_lab.reproduce", *ta_args, "--out", str(sub), "--quiet",
         "--launcher", "submitit_local", "--jobs", "1"],
        env=_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert rc.returncode == 0, rc.stdout[-3000:] + rc.stderr[-3000:]
    assert "hydra/launcher=submitit_local hydra.sweeper.max_batch_size=1" in rc.stdout
    sweep = sub / "_sweeps" / "bench"
    log = (sweep / "sweep.log").read_text()
    # --jobs 1: the sweeper hands submitit one job at a time, run in its own process
    assert log.count("Submitit 'local' sweep output dir") == 1, log[-3000:]
    assert len(list((sweep / "hydra" / ".submitit").glob("*/*_result.pkl"))) == 1
    cells = _cells([*ta_args, "--out", str(sub)])
    assert [str(c.rel_dir) for c in cells] == ["bench/ta/larv-tiered"]
    for c in cells:
        a, b = c.run_dir(basic), c.run_dir(sub)
        for name in ("program_report.json", "cell.json"):  # every accuracy and loss
            want, got = (json.loads((d / name).read_text()) for d in (a, b))
            assert got == want, (c.rel_dir, name)
        if c.variant.larv is not None:
            assert (a / "larv_layers.json").read_bytes() == (b / "larv_layers.json").read_bytes()


def test_testbed_sweep_with_the_joblib_launcher(ci_testbed, ci_testbed_cache, tmp_path_factory):
    cache = ci_testbed_cache  # the session's one ci build (conftest.py)
    out = tmp_path_factory.mktemp("reproduce_testbed")
    variants = ["base", "sched-custom_0p5_1p0_1p5"]
    args = ["table6", "--merger", "ties", *sum((["--variant", v] for v in variants), [])]
    args += ["--pools", f"testbed:ci:{cache}", "--out", str(out), "-o", "fabric.accelerator=cpu"]
    args += ["--launcher", "joblib", "--jobs", "2"]
    rc = subprocess.run(
        [sys.executable, "-m", "larv_lab.reproduce", *args, "--quiet"],
        env=_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert rc.returncode == 0, rc.stdout[-3000:] + rc.stderr[-3000:]
    assert "hydra/launcher=joblib hydra.launcher.n_jobs=2" in rc.stdout
    log = (out / "_sweeps" / "clip-vit-base-patch32_TA8" / "sweep.log").read_text()
    assert "Joblib.Parallel(n_jobs=2" in log and "is launching 2 jobs" in log

    runs = out / "runs" / "clip-vit-base-patch32_TA8" / "ties"
    reports = {v: json.loads((runs / v / "program_report.json").read_text()) for v in variants}
    for v in variants[1:]:
        layers = json.loads((runs / v / "larv_layers.json").read_text())
        s = [rec["s"] for rec in layers["layers"]]
        want = [float(x.replace("p", ".")) for x in v.split("_")[1:]]
        n = len(s)
        assert s == [want[min(2, i * 3 // n)] for i in range(n)]  # thirds by depth

    table = (out / "artefacts" / "table6.md").read_text()
    avg = {}
    for v, r in reports.items():
        tasks = [t for t in r if t not in ("model_info", "average")]
        avg[v] = 100 * sum(r[t]["accuracy"] for t in tasks) / len(tasks)
    delta = avg["sched-custom_0p5_1p0_1p5"] - avg["base"]
    assert f"| (0.5, 1.0, 1.5) | {avg['sched-custom_0p5_1p0_1p5']:.1f} ({delta:+.1f} [" in table
    assert (runs / "base" / "per_sample.json").is_file()  # written by the task pool, CLI launcher
    # each cell names the build it merged: results of another build are never paired with it
    models = json.loads((runs / "base" / "cell.json").read_text())["models"]
    assert models == {
        "testbed": ci_testbed.root.name,
        "weights_sha256": ci_testbed.weights_digest(),
    }
    assert "| (1.0, 1.0, 1.0) base |" in table and "↳ *paper* | 71.9 |" in table
    _read_png(out / "artefacts" / "fig4_tiered_grid.png")
