"""larv-compare (fusion_bench_larv.evaluation.compare) on hand-made run folders: per_sample.json written with
per_sample.write beside a small program_report.json, as a recording task pool leaves them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fusion_bench_larv.evaluation import compare as C
from fusion_bench_larv.evaluation import intervals as iv
from fusion_bench_larv.evaluation import per_sample

ROOT = Path(__file__).resolve().parents[1]
N = {"t1": 100, "t2": 60}


def _labels(n: int, shift: int = 0) -> np.ndarray:
    return (np.arange(n) + shift) % 10


def _run(folder: Path, correct, labels=None, report: bool = True, evaluations=None) -> Path:
    """A run folder: per_sample.json (one evaluation unless ``evaluations``) and a report."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = labels or {}
    evs = evaluations or [correct]
    entries = [
        {t: per_sample.encode_task(c, labels.get(t, _labels(len(c)))) for t, c in ev.items()}
        for ev in evs
    ]
    per_sample.write(folder / per_sample.FILE, entries)
    if report:
        doc = {t: {"accuracy": float(np.mean(c)), "loss": 0.0} for t, c in evs[0].items()}
        (folder / C.REPORT).write_text(json.dumps(doc))
    return folder


def _base(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {t: rng.random(n) < 0.6 for t, n in N.items()}


def _ten_more(base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """B: right on 10 more images than A in t1 (10 of A's wrong ones), the same elsewhere."""
    b = {t: c.copy() for t, c in base.items()}
    b["t1"][np.flatnonzero(~base["t1"])[:10]] = True
    return b


def test_identical_runs_give_zero_and_a_point_interval(tmp_path):
    base = _base()
    a, b = _run(tmp_path / "a", base), _run(tmp_path / "b", base)
    cmp = C.compare_runs(a, b)
    for row in (*cmp.rows, cmp.average):
        assert (row.delta, row.lo, row.hi) == (0.0, 0.0, 0.0) and not row.significant
        assert row.acc_a == row.acc_b
    assert [r.task for r in cmp.rows] == list(N) and cmp.average.n == sum(N.values())
    assert cmp.verdict == "no significant difference (interval includes 0)"
    assert cmp.only_a == cmp.only_b == ()


def test_ten_more_right_out_of_a_hundred_is_plus_ten_points(tmp_path):
    base = _base()
    better = _ten_more(base)
    cmp = C.compare(base, better)
    t1, t2 = cmp.rows
    assert t1.delta == pytest.approx(0.10) and t1.acc_b - t1.acc_a == pytest.approx(0.10)
    assert t1.acc_a == pytest.approx(base["t1"].mean())
    # all ten discordant pairs go one way: no resample can give a negative Δ
    assert 0.0 < t1.lo <= t1.delta <= t1.hi and t1.significant
    assert (t2.delta, t2.lo, t2.hi) == (0.0, 0.0, 0.0)
    assert cmp.average.delta == pytest.approx(0.05)  # (10 pp + 0 pp) / 2, equal task weights
    assert cmp.average.acc_a == pytest.approx((base["t1"].mean() + base["t2"].mean()) / 2)
    # exactly the intervals module's numbers: per task, and the average over tasks
    assert (t1.delta, t1.lo, t1.hi) == tuple(iv.paired_bootstrap(better["t1"], base["t1"]))
    avg = iv.average_bootstrap([(better[t], base[t]) for t in N])
    assert (cmp.average.delta, cmp.average.lo, cmp.average.hi) == tuple(avg)
    assert cmp.verdict == "B is better than A on average (interval excludes 0)"
    # swapped: Δ and its interval negate
    rev = C.compare(better, base)
    assert (rev.rows[0].delta, rev.rows[0].lo, rev.rows[0].hi) == (-t1.delta, -t1.hi, -t1.lo)
    assert rev.verdict == "B is worse than A on average (interval excludes 0)"
    # one shared task: the average is that task's row
    one = C.compare({"t1": base["t1"]}, {"t1": better["t1"]})
    assert one.average == one.rows[0] == t1


def test_cli_prints_one_line_per_task_the_average_and_the_verdict(tmp_path, capsys):
    base = _base()
    a, b = _run(tmp_path / "a", base), _run(tmp_path / "b", _ten_more(base))
    assert C.main([str(a), str(b), "--resamples", "500"]) == 0
    out = capsys.readouterr().out.splitlines()
    cmp = C.compare_runs(a, b, resamples=500)
    t1 = next(line for line in out if line.startswith("t1 "))
    assert f"{100 * cmp.rows[0].acc_a:.2f}" in t1 and f"{100 * cmp.rows[0].acc_b:.2f}" in t1
    r = cmp.rows[0]
    assert f"+10.00 [{100 * r.lo:+.2f}, {100 * r.hi:+.2f}] *" in t1
    t2 = next(line for line in out if line.startswith("t2 "))
    assert "+0.00 [+0.00, +0.00]" in t2 and not t2.endswith("*")
    avg = next(line for line in out if line.startswith("average "))
    assert "+5.00 [" in avg and avg.endswith("*")
    assert out[-1] == "B is better than A on average (interval excludes 0)"
    assert "500 resamples, seed 0" in "\n".join(out)
    # a per-sample file's path works as well as its folder
    assert C.main([str(a / per_sample.FILE), str(b), "--resamples", "500"]) == 0


def test_json_round_trips(tmp_path, capsys):
    base = _base()
    a, b = _run(tmp_path / "a", base), _run(tmp_path / "b", _ten_more(base))
    assert C.main([str(a), str(b), "--json", "--seed", "3", "--level", "0.9"]) == 0
    doc = json.loads(capsys.readouterr().out)
    cmp = C.compare_runs(a, b, seed=3, level=0.9)
    assert C.from_dict(doc) == cmp
    assert doc == json.loads(json.dumps(C.to_dict(cmp, str(a), str(b))))
    assert doc["verdict"] == cmp.verdict and doc["average"]["significant"] is True
    assert (doc["a"], doc["b"], doc["unit"]) == (str(a), str(b), "fraction")


def test_tasks_in_one_run_only_are_reported_as_skipped(tmp_path, capsys):
    base = _base()
    a = _run(tmp_path / "a", {**base, "only_a": base["t1"]})
    b = _run(tmp_path / "b", {"t2": base["t2"], "t1": base["t1"], "only_b": base["t2"]})
    cmp = C.compare_runs(a, b)
    assert [r.task for r in cmp.rows] == ["t1", "t2"]  # A's order
    assert (cmp.only_a, cmp.only_b) == (("only_a",), ("only_b",))
    assert C.main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "skipped (only in A): only_a" in out and "skipped (only in B): only_b" in out


def _refused(capsys, a, b, *extra) -> str:
    assert C.main([str(a), str(b), *extra]) == 2
    return capsys.readouterr().err


def test_missing_per_sample_file_says_which_task_pool_records_it(tmp_path, capsys):
    base = _base()
    a = _run(tmp_path / "a", base)
    b = tmp_path / "b"
    b.mkdir()
    (b / C.REPORT).write_text(json.dumps({"t1": {"accuracy": 0.5}}))
    with pytest.raises(C.CompareError) as e:
        C.compare_runs(a, b)
    msg = str(e.value)
    assert "no per_sample.json" in msg and "program_report.json only" in msg
    assert "taskpool=CLIPVisionModelTaskPool/larv_recording_TA8" in msg
    assert "fusion_bench_larv.RecordingCLIPVisionModelTaskPool" in msg
    assert "larv_recording_TA8" in _refused(capsys, a, b)
    with pytest.raises(C.CompareError, match="no such run folder"):
        C.compare_runs(a, tmp_path / "nowhere")


def test_no_shared_task_is_refused(tmp_path, capsys):
    base = _base()
    a = _run(tmp_path / "a", {"t1": base["t1"]})
    b = _run(tmp_path / "b", {"t2": base["t2"]})
    with pytest.raises(C.CompareError, match="share no task"):
        C.compare_runs(a, b)
    assert "share no task" in _refused(capsys, a, b)


def test_other_test_images_are_refused(tmp_path, capsys):
    base = _base()
    a = _run(tmp_path / "a", base)
    b = _run(tmp_path / "b", base, labels={"t2": _labels(N["t2"], shift=1)})
    with pytest.raises(C.CompareError, match="task 't2'.*different test images"):
        C.compare_runs(a, b)
    assert "SHA-256" in _refused(capsys, a, b)


def test_other_lengths_are_refused(tmp_path, capsys):
    base = _base()
    a = _run(tmp_path / "a", base)
    b = _run(tmp_path / "b", {**base, "t1": base["t1"][:80]})
    with pytest.raises(C.CompareError, match="task 't1': 100 test images in A but 80 in B"):
        C.compare_runs(a, b)
    assert "not the same test set" in _refused(capsys, a, b)
    with pytest.raises(C.CompareError, match="test images in A"):
        C.compare(base, {**base, "t2": base["t2"][:-1]})


def test_several_evaluations_need_evaluation_k(tmp_path, capsys):
    base, other = _base(0), _base(1)
    a = _run(tmp_path / "a", base)
    # a dict of models: one evaluation per model, the report nested per model
    b = _run(tmp_path / "b", None, evaluations=[other, base], report=False)
    report = {
        m: {t: {"accuracy": float(c.mean())} for t, c in ev.items()}
        for m, ev in (("m0", other), ("m1", base))
    }
    (b / C.REPORT).write_text(json.dumps(report))
    with pytest.raises(C.CompareError, match="holds 2 evaluations.*--evaluation K"):
        C.compare_runs(a, b)
    assert "--evaluation K" in _refused(capsys, a, b)
    assert "out of range" in _refused(capsys, a, b, "--evaluation", "2")
    # K = 1 is `base` again: Δ = 0; A, holding one evaluation, is used as it is
    cmp = C.compare_runs(a, b, evaluation=1)
    assert all(r.delta == 0.0 for r in cmp.rows)
    assert C.compare_runs(a, b, evaluation=0).average.delta != 0.0


def test_a_stale_per_sample_file_is_refused(tmp_path):
    base = _base()
    a = _run(tmp_path / "a", base)
    b = _run(tmp_path / "b", base)
    (b / C.REPORT).write_text(json.dumps({"t1": {"accuracy": 0.99}, "t2": {"accuracy": 0.5}}))
    with pytest.raises(C.CompareError, match="different runs"):
        C.compare_runs(a, b)
    # without a report beside it, the per-sample file is read alone
    (b / C.REPORT).unlink()
    assert C.compare_runs(a, b).average.delta == 0.0


def test_python_dash_m_runs_the_command(tmp_path):
    base = _base()
    a, b = _run(tmp_path / "a", base), _run(tmp_path / "b", _ten_more(base))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "fusion_bench_larv.evaluation.compare",
        str(a),
        str(b),
        "--resamples",
        "200",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "B is better than A on average (interval excludes 0)"
    bad = subprocess.run(
        [*cmd[:3], str(a), str(tmp_path)], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert bad.returncode == 2 and "larv-compare: error:" in bad.stderr


def test_the_plugin_module_does_not_import_the_lab():
    code = "import sys, fusion_bench_larv.evaluation.compare; print('larv_lab' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


def test_cli_into_a_closed_pipe_prints_no_traceback(tmp_path):
    """`larv-compare a b | head -1`: the reader gone before the output is written is exit 1 and
    nothing on stderr, not a BrokenPipeError traceback."""
    base = _base()
    a, b = _run(tmp_path / "a", base), _run(tmp_path / "b", _ten_more(base))
    read, write = os.pipe()
    os.close(read)  # no reader at all
    rc = subprocess.run(
        [sys.executable, "-m", "fusion_bench_larv.evaluation.compare", str(a), str(b), "--resamples", "200"],
        stdout=write, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    os.close(write)
    assert rc.returncode == 1 and "Traceback" not in rc.stderr, rc.stderr
