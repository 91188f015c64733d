"""The one result type: each cell's run read back from its files, and every cell's Δ intervals."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusion_bench_larv.evaluation import intervals as iv
from fusion_bench_larv.evaluation import per_sample as per_sample_mod
from fusion_bench_larv.evaluation.compare import compare

from .experiments import CONTINUOUS, TIERED, Cell
from .registry import registry
from .selection import MAX
from .sweep import CELL, CHOICE_REPORTS, LAYERS, REPORT, read_json

#: :func:`unseen_tasks` of a choice whose cell predates the record of its coverage
UNRECORDED = "not recorded"


@dataclass
class Run:
    """One cell's result: accuracy per task in % (FusionBench reports fractions) and LARV's
    per-layer report (``larv_layers.json``; None for a base or reference cell)."""

    cell: Cell
    acc: dict[str, float]  # task -> %
    layers: dict | None = None
    #: task -> per-sample correctness (test-set order), from ``per_sample.json``; only tasks
    #: whose count agrees with the report's accuracy
    per_sample: dict[str, Any] | None = None
    digests: dict[str, str | None] | None = None  # task -> SHA-256 of its test labels
    #: the ``validation`` block of the cell's wrapper report: a value chosen on validation
    #: (grid searched, scores, coverage, guard); None for a data-free cell
    validation: dict | None = None
    #: ``cell.json``'s ``models``: the build the cell merged (:func:`.sweep.models_fingerprint`);
    #: None for pools without one and for cells written before it was recorded
    models: dict | None = None

    @property
    def average(self) -> float:
        return sum(self.acc.values()) / len(self.acc)


def metric(entry: Any) -> float | None:
    """A task's score in %: its ``accuracy``, else its first number."""
    if not isinstance(entry, Mapping):
        return None
    if isinstance(entry.get("accuracy"), (int, float)):
        return 100.0 * float(entry["accuracy"])
    for v in entry.values():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return 100.0 * float(v)
    return None


def load_run(cell: Cell, out: Path) -> Run | None:
    run_dir = cell.run_dir(out)
    report = read_json(run_dir / REPORT)
    if not isinstance(report, Mapping):
        return None
    ref = registry().references.get(cell.merger)
    if ref is not None and ref.own_task:
        # {model: <task pool report>}: each model on its own task
        report = {t: r.get(t) for t, r in report.items() if isinstance(r, Mapping)}
    acc = {
        k: m
        for k, v in report.items()
        if k not in ("model_info", "average") and (m := metric(v)) is not None
    }
    if not acc:
        return None
    run = Run(cell, acc, read_json(run_dir / LAYERS), validation=_choice(run_dir),
              models=(read_json(run_dir / CELL) or {}).get("models"))  # fmt: skip
    if ref is None or not ref.own_task:
        run.per_sample, run.digests = _per_sample(run_dir, acc)
    return run


def _choice(run_dir: Path) -> dict | None:
    """The ``validation`` block of the cell's wrapper report, if it chose a value on validation."""
    for name in CHOICE_REPORTS:
        block = (read_json(run_dir / name) or {}).get("validation")
        if isinstance(block, Mapping):
            return dict(block)
    return None


def unseen_tasks(run: Run | None) -> list[str] | str | None:
    """The tasks a run's choice on validation did not see (``[]``: it saw every task), or
    :data:`UNRECORDED` for a cell written before the coverage was recorded; None when the run
    chose nothing on validation."""
    if run is None or run.validation is None:
        return None
    if "uncovered_tasks" not in run.validation:
        return UNRECORDED
    return list(run.validation["uncovered_tasks"])


def _per_sample(run_dir: Path, acc: Mapping[str, float]) -> tuple[dict | None, dict | None]:
    """The cell's per-sample correctness when its file holds exactly one evaluation; a task is
    kept only when its count is the one the report's accuracy implies
    (:func:`fusion_bench_larv.evaluation.per_sample.matches_accuracy`), so a stale or foreign
    file never stands in for the report."""
    loaded = per_sample_mod.load(run_dir / per_sample_mod.FILE)
    if loaded is None or len(loaded[0]) != 1:
        return None, None
    evaluations, (digests,) = loaded
    kept = {}
    for task, c in evaluations[0].items():
        if task in acc and per_sample_mod.matches_accuracy(c, acc[task] / 100.0):
            kept[task] = c
    return (kept or None), digests


def check_one_build(runs: Iterable[Run]) -> None:
    """``ValueError`` when runs of one suite record different models (``Run.models``): their
    Δ would compare two builds of a testbed, not two methods. Runs without a record are not
    checked (cells written before it was recorded)."""
    seen: dict[str, dict[str, list[str]]] = {}
    for r in runs:
        if r.models is not None:
            key = repr(sorted(r.models.items()))
            seen.setdefault(r.cell.suite.key, {}).setdefault(key, []).append(r.cell.rel_dir)
    for suite, builds in seen.items():
        if len(builds) > 1:
            parts = [f"{len(cells)} cell(s) such as {cells[0]} on {key}" for key, cells in builds.items()]  # fmt: skip
            raise ValueError(
                f"suite {suite}: its cells merged different builds of the models, so their "
                f"differences would compare builds, not methods: {'; '.join(parts)}. Re-run "
                "the cells of one build (delete the others' run folders) or give each build its "
                "own --out."
            )


class Results:
    """Every cell's run, and the paired intervals of their Δ (B = ``resamples`` bootstrap
    resamples, ``seed``; :mod:`.intervals`)."""

    def __init__(
        self,
        cells: Sequence[Cell],
        out: Path,
        resamples: int = iv.DEFAULT_RESAMPLES,
        seed: int = iv.DEFAULT_SEED,
    ):
        self.out = Path(out)
        self.cells = list(cells)
        self.resamples, self.seed = resamples, seed
        self.runs: dict[tuple[str, str, str], Run] = {}
        self._intervals: dict[tuple, iv.Interval | None] = {}
        self.no_interval: set[tuple[str, str, str]] = set()  # Δ shown without one
        for c in cells:
            r = load_run(c, out)
            if r is not None:
                self.runs[(c.suite.key, c.merger, c.variant.slug)] = r
        check_one_build(self.runs.values())

    def get(self, suite: str, merger: str, variant: str) -> Run | None:
        if variant == MAX:
            cands = [self.get(suite, merger, v.slug) for v in (TIERED, CONTINUOUS)]
            cands = [c for c in cands if c is not None]
            return max(cands, key=lambda r: r.average) if cands else None
        return self.runs.get((suite, merger, variant))

    def tasks(self, suite: str) -> list[str]:
        for (s, _, _), r in self.runs.items():
            if s == suite:
                return list(r.acc)
        return []

    @property
    def missing(self) -> int:
        return len(self.cells) - len(self.runs)

    def interval(
        self,
        suite: str,
        merger: str,
        variant: str,
        tasks: Sequence[str] | None = None,
        against: str | tuple[str, str] = "base",
    ) -> iv.Interval | None:
        """Δ (variant − the merger's ``against`` cell: its base cell, or e.g.
        :data:`.selection.LINEAR`; a ``(merger, variant)`` pair names another merger's cell, e.g.
        AdaMerging's)
        and its 95% interval, in percentage points, over ``tasks``
        (:func:`fusion_bench_larv.evaluation.compare.compare`, as ``larv-compare``: one task, its
        :func:`.intervals.paired_bootstrap`; several, the average's
        :func:`.intervals.average_bootstrap`; None: every task of the variant's run). None when
        a cell or a task's per-sample correctness is missing or the two do not pair (other test
        examples): never an interval from anything else."""
        other = against if isinstance(against, tuple) else (merger, against)
        run, base = self.get(suite, merger, variant), self.get(suite, *other)
        if run is None or base is None or (merger, variant) == other:
            return None
        tasks = tuple(tasks) if tasks is not None else tuple(run.acc)
        key = (suite, merger, run.cell.variant.slug, tasks, against)
        if key not in self._intervals:
            self._intervals[key] = self._compute(run, base, tasks)
        return self._intervals[key]

    def _compute(self, run: Run, base: Run, tasks: Sequence[str]) -> iv.Interval | None:
        ours, theirs = {}, {}  # task -> correctness: the variant's (B), the base cell's (A)
        for t in tasks:
            v = (run.per_sample or {}).get(t)
            b = (base.per_sample or {}).get(t)
            if v is None or b is None or v.shape != b.shape:
                return None
            dv, db = (run.digests or {}).get(t), (base.digests or {}).get(t)
            if dv is not None and db is not None and dv != db:
                return None
            ours[t], theirs[t] = v, b
        if not ours:
            return None
        # larv-compare's computation: the average row (one task: that task's row)
        r = compare(theirs, ours, resamples=self.resamples, seed=self.seed).average
        return iv.Interval(100 * r.delta, 100 * r.lo, 100 * r.hi)
