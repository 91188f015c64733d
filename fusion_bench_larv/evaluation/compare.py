"""Compare two FusionBench runs image by image: per task, Δ = acc(B) − acc(A) with its paired
bootstrap interval over the test images, and the average Δ over tasks (equal task weights) with
its interval (:mod:`fusion_bench_larv.evaluation.intervals`).

A run is a folder written by a recording task pool
(:class:`~fusion_bench_larv.RecordingCLIPVisionModelTaskPool`, the lab's testbed
task pool): FusionBench's ``program_report.json`` and ``per_sample.json``
(:mod:`fusion_bench_larv.evaluation.per_sample`), or the path of such a ``per_sample.json``::

    larv-compare RUN_A RUN_B [--resamples 2000] [--seed 0] [--level 0.95] [--json]
    python -m fusion_bench_larv.evaluation.compare RUN_A RUN_B ...

Notation for one task t with n_t test images, a = A's correctness, b = B's (same images, same
order): acc_A = Σ a_i / n_t, acc_B = Σ b_i / n_t, Δ_t = acc_B − acc_A = (n₁₀ − n₀₁) / n_t with
n₁₀ = #{i : b_i ∧ ¬a_i}, n₀₁ = #{i : ¬b_i ∧ a_i}; over the T shared tasks Δ̄ = (1/T) Σ_t Δ_t.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CompareError
from . import intervals as iv
from . import per_sample as per_sample_mod

REPORT = "program_report.json"
AVERAGE = "average"
RECORDING_HINT = (
    "run FusionBench with a recording task pool: "
    "taskpool=CLIPVisionModelTaskPool/larv_recording_TA8 (or _TALL14, _TALL20), or "
    "taskpool._target_=fusion_bench_larv.RecordingCLIPVisionModelTaskPool over "
    "any CLIP task pool config; per_sample.json then lands beside program_report.json"
)


# ------------------------------------------------------------------------------------------------
# the computation: plain vectors in, plain rows out
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One task (or the average over tasks): accuracies of A and B, Δ = B − A and its interval
    [lo, hi], all as fractions; ``n`` test images (the average: their sum over tasks)."""

    task: str
    n: int
    acc_a: float
    acc_b: float
    delta: float
    lo: float
    hi: float

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (the rule of :class:`~fusion_bench_larv.evaluation.intervals.Interval`)."""
        return iv.Interval(self.delta, self.lo, self.hi).significant


@dataclass(frozen=True)
class Comparison:
    """Every shared task's row (in A's task order), the average row, and the tasks that only one
    run holds (not compared)."""

    rows: tuple[Row, ...]
    average: Row
    only_a: tuple[str, ...] = ()
    only_b: tuple[str, ...] = ()
    resamples: int = iv.DEFAULT_RESAMPLES
    seed: int = iv.DEFAULT_SEED
    level: float = iv.DEFAULT_LEVEL

    @property
    def verdict(self) -> str:
        """One plain-language line on the average Δ."""
        if not self.average.significant:
            return "no significant difference (interval includes 0)"
        word = "better" if self.average.delta > 0 else "worse"
        return f"B is {word} than A on average (interval excludes 0)"


def compare(
    a: Mapping[str, Sequence[bool]],
    b: Mapping[str, Sequence[bool]],
    resamples: int = iv.DEFAULT_RESAMPLES,
    seed: int = iv.DEFAULT_SEED,
    level: float = iv.DEFAULT_LEVEL,
) -> Comparison:
    """Δ_t = acc_B − acc_A per task t shared by ``a`` and ``b`` (``{task: correctness vector}``,
    one bool per test image, same images in the same order in both), each with its paired
    bootstrap interval (:func:`.intervals.paired_bootstrap` of (b_t, a_t), ``seed``), and
    Δ̄ = (1/T) Σ_t Δ_t over the T shared tasks in A's order, with its interval
    (:func:`.intervals.average_bootstrap`: task t's images drawn from ``default_rng([seed, t])``).
    With T = 1 the average is that task's row (Δ̄ = Δ_1, the same interval). Accuracies of the
    average row are the task means (1/T) Σ_t acc_t. Tasks in only one of the two are listed in
    ``only_a`` / ``only_b``, not compared. Raises :class:`CompareError` when no task is shared
    or a task's vectors differ in length."""
    shared = [t for t in a if t in b]
    if not shared:
        raise CompareError(
            f"the two runs share no task (A: {sorted(a)}, B: {sorted(b)}): compare runs "
            "evaluated on the same task pool"
        )
    pairs = []
    for t in shared:
        va, vb = np.asarray(a[t], dtype=bool).ravel(), np.asarray(b[t], dtype=bool).ravel()
        if va.size != vb.size:
            raise CompareError(
                f"task {t!r}: {va.size} test images in A but {vb.size} in B: not the same test "
                "set (another split, or a subsampled task pool); compare runs on the same test "
                "images"
            )
        pairs.append((vb, va))
    rows = []
    for t, (vb, va) in zip(shared, pairs, strict=True):
        r = iv.paired_bootstrap(vb, va, resamples=resamples, seed=seed, level=level)
        rows.append(Row(t, int(va.size), float(va.mean()), float(vb.mean()), *r))
    if len(rows) == 1:
        average = rows[0]
    else:
        r = iv.average_bootstrap(pairs, resamples=resamples, seed=seed, level=level)
        average = Row(
            AVERAGE,
            sum(row.n for row in rows),
            sum(row.acc_a for row in rows) / len(rows),
            sum(row.acc_b for row in rows) / len(rows),
            *r,
        )
    return Comparison(
        tuple(rows),
        average,
        tuple(t for t in a if t not in b),
        tuple(t for t in b if t not in a),
        resamples,
        seed,
        level,
    )


# ------------------------------------------------------------------------------------------------
# loading run folders
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunFiles:
    """One evaluation of a run: ``{task: correctness}``, ``{task: labels' digest or None}``, the
    per-sample file it came from and the report it was checked against (None: none found)."""

    correct: dict[str, np.ndarray]
    digests: dict[str, str | None]
    per_sample: Path
    report: Path | None


def _locate(path: str | os.PathLike) -> tuple[Path, Path]:
    """(per_sample.json, program_report.json) of a run folder or a per-sample file's path."""
    p = Path(path)
    if not p.exists():
        raise CompareError(f"{p}: no such run folder or file")
    if p.is_dir():
        return p / per_sample_mod.FILE, p / REPORT
    return p, p.parent / REPORT


def _accuracies(report: Any) -> dict[str, float]:
    """``{task: accuracy}`` of one task pool report (``{task: {"accuracy": ...}}``)."""
    if not isinstance(report, Mapping):
        return {}
    return {
        t: float(v["accuracy"])
        for t, v in report.items()
        if t not in ("model_info", AVERAGE)
        and isinstance(v, Mapping)
        and isinstance(v.get("accuracy"), (int, float))
        and not isinstance(v.get("accuracy"), bool)
    }


def _report_for(report: Any, index: int, count: int) -> dict[str, float]:
    """The accuracies of evaluation ``index`` of ``count``: the report itself for one
    evaluation; for several (a dict of models) the ``index``-th model's report."""
    if count == 1:
        return _accuracies(report)
    if isinstance(report, Mapping):
        models = [v for k, v in report.items() if k not in ("model_info", AVERAGE)]
        if len(models) == count:
            return _accuracies(models[index])
    return {}


def load_run(path: str | os.PathLike, evaluation: int | None = None) -> RunFiles:
    """One evaluation of a run folder (or of a per-sample file): its ``per_sample.json`` must
    exist and hold one evaluation, or several and ``evaluation`` (0-based) picks one. When
    ``program_report.json`` lies beside it, each task's per-sample accuracy must be the report's
    (:func:`.per_sample.matches_accuracy`), so a stale file never stands in for the run."""
    file, report_path = _locate(path)
    if not file.is_file():
        found = " (it holds program_report.json only)" if report_path.is_file() else ""
        raise CompareError(
            f"{file.parent}: no {per_sample_mod.FILE}{found}; per-test-image correctness is "
            f"needed to compare runs: {RECORDING_HINT}"
        )
    loaded = per_sample_mod.load(file)
    if loaded is None:
        raise CompareError(
            f"{file}: not a readable per-sample file (format {per_sample_mod.FORMAT!r}, version "
            f"{per_sample_mod.VERSION}); {RECORDING_HINT}"
        )
    evaluations, digests = loaded
    count = len(evaluations)
    if count == 0:
        raise CompareError(f"{file}: holds no evaluation")
    if count == 1:
        index = 0
    elif evaluation is None:
        raise CompareError(
            f"{file}: holds {count} evaluations (one per evaluated model, e.g. a dict of models); "
            f"choose one with --evaluation K, K in 0..{count - 1}"
        )
    elif not 0 <= evaluation < count:
        raise CompareError(f"{file}: --evaluation {evaluation} out of range 0..{count - 1}")
    else:
        index = evaluation
    correct, digest = evaluations[index], digests[index]
    if not correct:
        raise CompareError(f"{file}: evaluation {index} holds no task")
    report = None
    if report_path.is_file():
        try:
            doc = json.loads(report_path.read_text())
        except (OSError, ValueError) as e:
            raise CompareError(f"{report_path}: unreadable ({e})") from e
        acc = _report_for(doc, index, count)
        for t, c in correct.items():
            if t in acc and not per_sample_mod.matches_accuracy(c, acc[t]):
                raise CompareError(
                    f"{file}: task {t!r} has accuracy {c.mean():.6f} but {report_path.name} "
                    f"says {acc[t]:.6f}: the two files come from different runs (a stale "
                    f"{per_sample_mod.FILE}?); rerun, or pass the per-sample file's path alone"
                )
        report = report_path
    return RunFiles(correct, digest, file, report)


def compare_runs(
    path_a: str | os.PathLike,
    path_b: str | os.PathLike,
    evaluation: int | None = None,
    resamples: int = iv.DEFAULT_RESAMPLES,
    seed: int = iv.DEFAULT_SEED,
    level: float = iv.DEFAULT_LEVEL,
) -> Comparison:
    """:func:`compare` of two runs (:func:`load_run`; ``evaluation`` picks one evaluation in a
    file that holds several). A shared task must have the same test labels in the same order in
    both (their SHA-256 in ``per_sample.json``; a task without a digest is not checked)."""
    a, b = load_run(path_a, evaluation), load_run(path_b, evaluation)
    for t in a.correct:
        if t not in b.correct:
            continue
        na, nb = a.correct[t].size, b.correct[t].size
        da, db = a.digests.get(t), b.digests.get(t)
        if na == nb and da is not None and db is not None and da != db:
            raise CompareError(
                f"task {t!r}: the runs were evaluated on different test images (the labels' "
                f"SHA-256 differ: {da[:12]}… in A, {db[:12]}… in B); compare runs on the same "
                "test split, in the same order"
            )
    return compare(a.correct, b.correct, resamples=resamples, seed=seed, level=level)


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------
def _row_dict(row: Row) -> dict[str, Any]:
    return {
        "task": row.task,
        "n": row.n,
        "acc_a": row.acc_a,
        "acc_b": row.acc_b,
        "delta": row.delta,
        "lo": row.lo,
        "hi": row.hi,
        "significant": row.significant,
    }


def to_dict(cmp: Comparison, name_a: str = "A", name_b: str = "B") -> dict[str, Any]:
    """The comparison as plain JSON values (accuracies, Δ, lo, hi as fractions)."""
    return {
        "a": name_a,
        "b": name_b,
        "unit": "fraction",
        "resamples": cmp.resamples,
        "seed": cmp.seed,
        "level": cmp.level,
        "tasks": [_row_dict(r) for r in cmp.rows],
        AVERAGE: _row_dict(cmp.average),
        "skipped": {"only_in_a": list(cmp.only_a), "only_in_b": list(cmp.only_b)},
        "verdict": cmp.verdict,
    }


def from_dict(doc: Mapping[str, Any]) -> Comparison:
    """The :class:`Comparison` of :func:`to_dict`'s output."""

    def row(d: Mapping[str, Any]) -> Row:
        return Row(d["task"], d["n"], d["acc_a"], d["acc_b"], d["delta"], d["lo"], d["hi"])

    return Comparison(
        tuple(row(d) for d in doc["tasks"]),
        row(doc[AVERAGE]),
        tuple(doc["skipped"]["only_in_a"]),
        tuple(doc["skipped"]["only_in_b"]),
        doc["resamples"],
        doc["seed"],
        doc["level"],
    )


def _pp(x: float) -> str:
    return f"{100 * x:+.2f}"


def format_text(cmp: Comparison, name_a: str = "A", name_b: str = "B") -> str:
    """The comparison as text: one line per task and the average (accuracies in %, Δ = B − A in
    percentage points with its interval, ``*`` when the interval excludes 0), skipped tasks, and
    the verdict."""
    width = max(len(r.task) for r in (*cmp.rows, cmp.average))
    level = f"{100 * cmp.level:g}%"
    lines = [
        f"A: {name_a}",
        f"B: {name_b}",
        f"Δ = B − A in percentage points, [lo, hi] its {level} paired bootstrap interval over "
        f"the test images ({cmp.resamples} resamples, seed {cmp.seed}); * = excludes 0",
        f"{'task':<{width}}  {'n':>6}  {'acc A':>6}  {'acc B':>6}  Δ [lo, hi]",
    ]
    for r in (*cmp.rows, cmp.average):
        lines.append(
            f"{r.task:<{width}}  {r.n:>6}  {100 * r.acc_a:>6.2f}  {100 * r.acc_b:>6.2f}  "
            f"{_pp(r.delta)} [{_pp(r.lo)}, {_pp(r.hi)}]" + (" *" if r.significant else "")
        )
    for name, only in (("A", cmp.only_a), ("B", cmp.only_b)):
        if only:
            lines.append(f"skipped (only in {name}): {', '.join(only)}")
    lines.append(cmp.verdict)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="larv-compare",
        description="Compare two FusionBench runs recorded by a recording task pool, image by "
        "image: per task and on average, Δ = accuracy of B − accuracy of A with its paired "
        "bootstrap interval over the test images.",
    )
    p.add_argument(
        "run_a", metavar="RUN_A", help="run folder or its per_sample.json (A, e.g. base)"
    )
    p.add_argument(
        "run_b", metavar="RUN_B", help="run folder or its per_sample.json (B, e.g. LARV)"
    )
    p.add_argument("--resamples", type=int, default=iv.DEFAULT_RESAMPLES, help="bootstrap B")
    p.add_argument("--seed", type=int, default=iv.DEFAULT_SEED)
    p.add_argument("--level", type=float, default=iv.DEFAULT_LEVEL, help="interval level")
    p.add_argument(
        "--evaluation",
        type=int,
        default=None,
        metavar="K",
        help="in a per_sample.json holding several evaluations (a dict of models), use the "
        "K-th (0-based); files holding one are used as they are",
    )
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``larv-compare``: print the comparison; 0 on success, 2 when the runs cannot be
    compared (the reason on stderr), 1 when the output's reader left early."""
    args = _parser().parse_args(argv)
    try:
        cmp = compare_runs(
            args.run_a,
            args.run_b,
            evaluation=args.evaluation,
            resamples=args.resamples,
            seed=args.seed,
            level=args.level,
        )
    except ValueError as e:  # CompareError, and intervals' checks of resamples / level
        print(f"larv-compare: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        text = json.dumps(to_dict(cmp, args.run_a, args.run_b), indent=2, ensure_ascii=False)
    else:
        text = format_text(cmp, args.run_a, args.run_b)
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader left early (`larv-compare a b | head -1`): no traceback, and none at exit
        # either (Python docs, "Note on SIGPIPE")
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
