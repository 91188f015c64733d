"""Read every run's reports and write the tables (markdown + CSV) and figures (PNG): the paper's
and the benchmark's, whatever launched the runs (every launcher leaves the same files).

One result type (:class:`Run`: a cell's per-task accuracy in %, read from FusionBench's
``program_report.json``, where it is a fraction; LARV's per-layer report), one table renderer
(:class:`Table`, :func:`per_task_table` and friends), one Figure 2 (:func:`plots.fig2`).

Tables follow the paper's layouts: accuracy (%) with "(±Δ)" = variant − base merger in
percentage points, and, where both cells recorded per-sample correctness (``per_sample.json``),
"(±Δ [lo, hi])" with the paired bootstrap 95% interval over test examples
(:mod:`.intervals`; the average resamples within each task) and "*" after it when the interval
excludes 0. Without per-sample files (older runs) a Δ has no interval, and the notes say so. The
benchmark's table also sets LARV's rows against the same merger's linear depth ramp
(``sched-linear``), the same way: a last column "Avg. Δ vs linear" and the CSV fields
``delta_linear, lo_linear, hi_linear, significant_linear``. Where the paper prints a number, a "↳ paper" row under ours shows it
(``paper_anchors.json``, transcribed from the paper, approximate; base values the paper only
implies are marked "derived"). The paper reports the better of the tiered and continuous gates
per cell, a choice made on test accuracy: our "max†" rows make the same oracle choice and say so.
A run that has not finished shows as "—"; every table says how many runs it is missing.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from fusion_bench_larv import intervals as iv
from fusion_bench_larv import per_sample as per_sample_mod
from fusion_bench_larv.compare import compare
from fusion_bench_larv.io import atomic_path, write_text_atomic

from .experiments import (
    ABLATION_ROWS,
    BACKBONES,
    BENCH_VARIANTS,
    CONTINUOUS,
    CONTINUOUS_MEDIAN,
    EXPERIMENTS,
    FIG4_GRID,
    GUARDED,
    LINES_VAL,
    SCHEDULE_LABELS,
    SCHEDULES,
    TABLE6_ROWS,
    TIERED,
    Cell,
    Suite,
    ablation,
    by_suite,
    custom,
    schedule,
)
from .registry import display_label, registry
from .sweep import CELL, LAYERS, REPORT, read_json

ANCHORS_FILE = Path(__file__).with_name("paper_anchors.json")
MAX = "larv-max"  # pseudo variant: the better gate per cell (oracle, as in the paper)
FINETUNED = "finetuned"  # the reference whose average the benchmark's relative column divides by
#: the benchmark's second reference: LARV's rows (:data:`VS_LINEAR`) are also compared with the
#: same merger's plain linear depth ramp (``schedule: linear``), on the same test examples
LINEAR = schedule("linear").slug
VS_LINEAR = (
    *(v.slug for v in BENCH_VARIANTS if v.larv is not None and v.larv.get("gate") != "schedule"),
    MAX,
)
#: the CSV fields of that comparison, after every other field
LINEAR_KEYS = ("delta_linear", "lo_linear", "hi_linear", "significant_linear")


# ------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------
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
    run = Run(cell, acc, read_json(run_dir / LAYERS))
    if ref is None or not ref.own_task:
        run.per_sample, run.digests = _per_sample(run_dir, acc)
    return run


def _per_sample(run_dir: Path, acc: Mapping[str, float]) -> tuple[dict | None, dict | None]:
    """The cell's per-sample correctness when its file holds exactly one evaluation; a task is
    kept only when its count is the one the report's accuracy implies
    (:func:`fusion_bench_larv.per_sample.matches_accuracy`), so a stale or foreign file never
    stands in for the report."""
    loaded = per_sample_mod.load(run_dir / per_sample_mod.FILE)
    if loaded is None or len(loaded[0]) != 1:
        return None, None
    evaluations, (digests,) = loaded
    kept = {}
    for task, c in evaluations[0].items():
        if task in acc and per_sample_mod.matches_accuracy(c, acc[task] / 100.0):
            kept[task] = c
    return (kept or None), digests


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
        """Δ (variant − the merger's ``against`` cell: its base cell, or e.g. :data:`LINEAR`;
        a ``(merger, variant)`` pair names another merger's cell, e.g. AdaMerging's)
        and its 95% interval, in percentage points, over ``tasks``
        (:func:`fusion_bench_larv.compare.compare`, as ``larv-compare``: one task, its
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


@cache
def _anchor_doc() -> dict:
    return json.loads(ANCHORS_FILE.read_text())


def anchors(table: str) -> dict[tuple[str, str, str, str], dict]:
    return {
        (a["suite"], a["merger"], a["variant"], a["task"]): a
        for a in _anchor_doc()["anchors"]
        if a["table"] == table
    }


def anchor_notes(table: str) -> str:
    notes = _anchor_doc()["notes"]
    parts = [notes["general"], notes["larv-best"], notes["derived"]]
    if table in notes:
        parts.append(notes[table])
    return " ".join(parts)


# ------------------------------------------------------------------------------------------------
# a table: markdown + long CSV
# ------------------------------------------------------------------------------------------------
def pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}"


def with_delta(x: float | None, base: float | None, ci: iv.Interval | None = None) -> str:
    """``x``, ``x (±Δ)`` or, with an interval, ``x (±Δ [lo, hi])``, then ``*`` when the
    interval excludes 0."""
    if x is None:
        return "—"
    if base is None:
        return f"{x:.1f}"
    return f"{x:.1f} ({delta_text(x - base, ci)})" + ("*" if ci and ci.significant else "")


def delta_text(delta: float, ci: iv.Interval | None) -> str:
    """``±Δ``, or with an interval ``±Δ [lo, hi]`` (percentage points, one decimal)."""
    return f"{delta:+.1f}" + (f" [{ci.lo:+.1f}, {ci.hi:+.1f}]" if ci is not None else "")


def delta_cell(
    res: Results, suite: str, merger: str, variant: str, col: Col, against: str = "base"
) -> tuple[str, dict[str, Any]]:
    """One table cell (``variant`` against the merger's ``against`` cell, by default its base
    cell, in ``col``) and its CSV fields: ours, base (the ``against`` cell's value), delta, lo,
    hi, significant (a base row has no base, so no Δ)."""
    run = res.get(suite, merger, variant)
    base = res.get(suite, merger, against) if variant != against else None
    x = col.value(run) if run else None
    b = col.value(base) if base else None
    ci = None
    if col.delta and x is not None and b is not None:
        ci = res.interval(suite, merger, variant, col.tasks(run), against)
        if ci is None and against == "base":
            res.no_interval.add((suite, merger, variant))
    shown = with_delta(x, b if col.delta else None, ci)
    fields = {
        "ours": x, "base": b, "delta": None if x is None or b is None else x - b,
        "lo": ci.lo if ci else None, "hi": ci.hi if ci else None,
        "significant": ci.significant if ci else None,
    }  # fmt: skip
    return shown + (col.suffix if x is not None else ""), fields


def linear_cell(
    res: Results, suite: str, merger: str, variant: str, col: Col
) -> tuple[str, dict[str, Any]]:
    """A LARV row's Δ (:data:`VS_LINEAR`) against the same merger's linear depth ramp
    (:data:`LINEAR`) in ``col``, as :func:`delta_cell` computes it: the table cell
    ``±Δ [lo, hi]`` (``*`` when the interval excludes 0; ``±Δ`` alone without per-sample files;
    "—" when either cell has no run) and the CSV fields :data:`LINEAR_KEYS`. Any other row, or a
    column without Δ: "" and no fields."""
    if variant not in VS_LINEAR or not col.delta:
        return "", {}
    _, f = delta_cell(res, suite, merger, variant, col, against=LINEAR)
    fields = {f"{k}_linear": f[k] for k in ("delta", "lo", "hi", "significant")}
    if f["delta"] is None:
        return "—", fields
    ci = None if f["lo"] is None else iv.Interval(f["delta"], f["lo"], f["hi"])
    return delta_text(f["delta"], ci) + ("*" if ci and ci.significant else ""), fields


@dataclass
class Table:
    name: str
    title: str
    columns: list[str]
    lines: list[str] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: CSV fields after the usual ones (the benchmark: :data:`LINEAR_KEYS`)
    extra_keys: tuple[str, ...] = ()

    def header(self, first: str = "Method") -> None:
        self.lines += [
            f"| {first} | " + " | ".join(self.columns) + " |",
            "|---" * (len(self.columns) + 1) + "|",
        ]

    def section(self, label: str) -> None:
        self.lines.append(f"| **{label}** |" + " |" * len(self.columns))

    def row(self, label: str, cells: Sequence[str]) -> None:
        self.lines.append(f"| {label} | " + " | ".join(cells) + " |")

    def record(self, **kw) -> None:
        self.records.append(kw)

    def write(self, folder: Path) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        md, csv_path = folder / f"{self.name}.md", folder / f"{self.name}.csv"
        write_text_atomic(md, self.markdown())
        keys = [
            "suite", "row", "merger", "variant", "column", "ours", "base", "delta", "lo", "hi",
            "significant", "paper", "paper_delta", "paper_derived", *self.extra_keys,
        ]  # fmt: skip
        write_csv(csv_path, keys, [{k: _csv(r.get(k)) for k in keys} for r in self.records])
        return [md, csv_path]

    def markdown(self) -> str:
        text = f"# {self.title}\n\n" + "\n".join(self.lines) + "\n"
        if self.notes:
            text += "\n" + "\n\n".join(self.notes) + "\n"
        return text


def _csv(v: Any) -> Any:
    return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else v)


def write_csv(path: Path, keys: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(keys), extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    return path


VARIANT_ROWS = {"base": "", TIERED.slug: " + LARV tiered", CONTINUOUS.slug: " + LARV continuous"}
VARIANT_ROWS[MAX] = " + LARV max(tiered, continuous)†"
ANCHOR_VARIANT = {"base": "base", MAX: "larv-best"}


@dataclass
class Col:
    """One column: a label and how to read its value from (results, merger, variant)."""

    label: str
    suite: str
    value: Callable[[Run], float | None]
    key: str  # anchor task key / CSV column
    delta: bool = True  # show (±Δ) against the base row
    suffix: str = ""
    #: the tasks behind the value (its Δ's interval resamples them); None: every task of the run
    task_list: Sequence[str] | None = None

    def tasks(self, run: Run | None) -> list[str]:
        if self.task_list is not None:
            return list(self.task_list)
        return list(run.acc) if run is not None else []


def task_col(suite: str, task: str) -> Col:
    return Col(task, suite, lambda r, t=task: r.acc.get(t), task, task_list=(task,))


def avg_col(suite: str, label: str = "Avg.", tasks: Sequence[str] | None = None) -> Col:
    def f(r: Run) -> float | None:
        vals = [r.acc[t] for t in (tasks if tasks is not None else r.acc) if t in r.acc]
        return sum(vals) / len(vals) if vals else None

    key = "average" if tasks is None else label
    return Col(label, suite, f, key, task_list=tuple(tasks) if tasks is not None else None)


def relative_col(suite: str, res: Results, label: str = "Avg. / fine-tuned") -> Col:
    """Each row's average relative to the fine-tuned models' average (%), no Δ."""
    ft = res.get(suite, FINETUNED, "base")

    def f(r: Run) -> float | None:
        return 100 * r.average / ft.average if ft is not None and ft.average else None

    return Col(label, suite, f, "relative_to_finetuned", delta=False, suffix="%")


def rows_block(
    t: Table,
    res: Results,
    cols: Sequence[Col],
    mergers: Sequence[str],
    variants: Sequence[str],
    anchor_table: str | None,
    labels: Mapping[str, str] | None = None,
    anchor_variant: Mapping[str, str] | None = None,
    linear: Sequence[Col] | None = None,
    held_by: Sequence[Cell] | None = None,
) -> None:
    """Rows ``merger × variant`` (Δ against the merger's base row), each followed by a paper
    row where the paper has numbers for it; with ``held_by``, only the pairs those cells hold (a variant
    that runs for some mergers only has no row for the others). ``linear`` (the benchmark): LARV's rows are also
    compared with the merger's linear ramp (:func:`linear_cell`), in every column's CSV record
    and, for each column in ``linear``, in a cell after the row's others (other rows: empty)."""
    anc = anchors(anchor_table) if anchor_table else {}
    labels = {**VARIANT_ROWS, **(labels or {})}
    anchor_variant = {**ANCHOR_VARIANT, **(anchor_variant or {})}
    held = None if held_by is None else {(c.merger, c.variant.slug) for c in held_by}
    for m in mergers:
        for v in variants:
            if held is not None and v != MAX and (m, v) not in held:
                continue
            cells, paper_cells, any_paper = [], [], False
            for col in cols:
                shown, fields = delta_cell(res, col.suite, m, v, col)
                if linear is not None:
                    fields.update(linear_cell(res, col.suite, m, v, col)[1])
                cells.append(shown)
                a = anc.get((col.suite, m, anchor_variant.get(v, v), col.key))
                if a is not None:
                    any_paper = True
                    s = f"{a['value']:.1f}"
                    if a.get("delta") is not None:
                        s += f" ({a['delta']:+.1f})"
                    paper_cells.append(s + ("*" if a.get("derived") else ""))
                else:
                    paper_cells.append("")
                t.record(
                    suite=col.suite, row=display_label(m) + labels.get(v, f" {v}"), merger=m,
                    variant=v, column=col.key, **fields,
                    paper=a["value"] if a else None, paper_delta=a.get("delta") if a else None,
                    paper_derived=bool(a and a.get("derived")),
                )  # fmt: skip
            cells += [linear_cell(res, col.suite, m, v, col)[0] for col in linear or ()]
            t.row(display_label(m) + labels.get(v, f" {v}"), cells)
            if any_paper:
                t.row("↳ *paper*", paper_cells + [""] * len(linear or ()))


def paper_only_rows(t: Table, cols: Sequence[Col], table: str, mergers: Sequence[str]) -> None:
    """Rows the paper has and we do not run (fine-tuned upper bound, AdaMerging in Table 1)."""
    anc = anchors(table)
    for m in mergers:
        cells = []
        for col in cols:
            a = anc.get((col.suite, m, "base", col.key))
            cells.append(f"{a['value']:.1f}" if a else "")
        if any(cells):
            t.row(f"*paper: {display_label(m)}*", cells)


def _notes(t: Table, res: Results, anchor_table: str | None) -> None:
    oracle = any("†" in line for line in t.lines)
    t.notes.append(
        "Accuracy (%); (±Δ) = row − the same merger's base row, in percentage points."
        + (
            " † = the better of the tiered and continuous gates per cell, chosen on test "
            "accuracy (an oracle choice, as in the paper)."
            if oracle
            else ""
        )
    )
    _interval_notes(t, res)
    if anchor_table:
        t.notes.append(
            "↳ *paper* rows: the paper's numbers (paper_anchors.json), approximate; "
            "* = derived (paper LARV value minus its printed gain). " + anchor_notes(anchor_table)
        )
    if res.missing:
        t.notes.append(f"**{res.missing} run(s) not finished yet** (shown as —).")
    mapped = sorted({c.suite.pool.label for c in res.cells if c.suite.mapped})
    if mapped:
        t.notes.append(
            f"Pools mapped to {', '.join(mapped)}: our numbers come from those models; the "
            "paper's rows still refer to the paper's CLIP / Flan-T5 models."
        )


def _interval_notes(t: Table, res: Results) -> None:
    """What the intervals are, and which Δ have none (no per-sample files: older runs)."""
    shown = any(r.get("lo") is not None for r in t.records)
    if shown:
        t.notes.append(
            "[lo, hi] = paired bootstrap 95% interval of Δ over the test examples: both cells' "
            "per-sample correctness (per_sample.json), the same examples resampled with "
            f"replacement for both, B = {res.resamples} resamples, seed {res.seed}, percentile "
            "interval; for an average, each task's examples are resampled independently and the "
            "per-task Δ averaged with equal task weights. * = the interval excludes 0."
            + (" The max† rows' intervals ignore that the gate was chosen on the same test "
               "examples." if any("†" in line for line in t.lines) else "")
        )  # fmt: skip
    missing = sorted({f"{s}/{m}/{v}" for s, m, v in res.no_interval if any(
        r.get("suite") == s and r.get("merger") == m and r.get("variant") == v
        and r.get("delta") is not None for r in t.records)})  # fmt: skip
    if missing:
        t.notes.append(
            f"No interval for {len(missing)} row(s) ({', '.join(missing[:6])}"
            + (", …" if len(missing) > 6 else "")
            + "): their cell or its base cell has no per-sample file (per_sample.json; runs "
            "from before it was recorded, or a task pool that does not record it), or the two "
            "do not cover the same test examples; their Δ is shown alone."
        )


def _mergers(cells: Sequence[Cell]) -> list[str]:
    out: list[str] = []
    for c in cells:
        if not c.is_reference and c.merger not in out:
            out.append(c.merger)
    return out


def _refs(cells: Sequence[Cell]) -> list[str]:
    return [r for r in registry().references if any(c.merger == r for c in cells)]


def _suites(cells: Sequence[Cell]) -> list[Suite]:
    seen: dict[str, Suite] = {}
    for c in cells:
        seen.setdefault(c.suite.key, c.suite)
    return list(seen.values())


def _variants(cells: Sequence[Cell], order: Sequence[str]) -> list[str]:
    have = {c.variant.slug for c in cells}
    if TIERED.slug in have and CONTINUOUS.slug in have:
        have.add(MAX)  # the pseudo row, where the order places it
    return [v for v in order if v in have]


# ------------------------------------------------------------------------------------------------
# the artefacts
# ------------------------------------------------------------------------------------------------
MAIN_ORDER = ["base", TIERED.slug, CONTINUOUS.slug, MAX]


def per_task_table(
    name: str,
    title: str,
    cells: Sequence[Cell],
    res: Results,
    anchor_table: str | None,
    order: Sequence[str] = (),
    relative: bool = False,
    linear: bool = False,
) -> Table:
    """Table 1 layout: one block per suite, one column per task, plus the average; rows in
    ``order`` (default: base, tiered, continuous, max†), then any other variant of the cells.
    ``relative``: a column with each row's average relative to the fine-tuned models'; ``linear``:
    the CSV fields :data:`LINEAR_KEYS` (LARV's rows against the merger's linear ramp, every
    column) and, when the cells hold the linear ramp, a last column "Avg. Δ vs linear" with the
    average's (the benchmark's table)."""
    suites = _suites(cells)
    tasks0 = res.tasks(suites[0].key) if suites else []
    extra = ["Avg. / fine-tuned"] if relative else []
    vs_linear = linear and _has_linear(cells)
    extra += [LINEAR_COLUMN] if vs_linear else []
    t = Table(name, title, [*tasks0, "Avg.", *extra], extra_keys=LINEAR_KEYS if linear else ())
    t.header()
    order = list(order or MAIN_ORDER)
    order += [c.variant.slug for c in cells if c.variant.slug not in order]
    labels = _labels(cells)
    for s in suites:
        scells = [c for c in cells if c.suite.key == s.key]
        tasks = res.tasks(s.key) or tasks0
        avg = avg_col(s.key)
        cols = [task_col(s.key, x) for x in tasks] + [avg]
        cols += [relative_col(s.key, res)] if relative else []
        lin = ([avg] if vs_linear else []) if linear else None
        if tasks != tasks0:
            t.row("*tasks*", [*tasks, "Avg.", *extra])
        t.section(s.label + (" (pools mapped)" if s.mapped else ""))
        if anchor_table:
            paper_only_rows(t, cols, anchor_table, ["finetuned", "adamerging"])
        refs, data_refs = _refs_by_data(scells)
        rows_block(t, res, cols, refs, ["base"], anchor_table, linear=lin)
        merger_blocks(t, res, cols, scells, _variants(scells, order), anchor_table, labels, lin,
                      data_refs)  # fmt: skip
    _notes(t, res, anchor_table)
    if relative:
        t.notes.append(
            "Avg. / fine-tuned = the row's average accuracy relative to the fine-tuned models' "
            "average (each fine-tuned model on its own task: the upper bound)."
        )
    if vs_linear:
        t.notes.append(LINEAR_NOTE)
    return t


LINEAR_COLUMN = "Avg. Δ vs linear"
LINEAR_NOTE = (
    "Avg. Δ vs linear (LARV's rows only) = the row's average − the same merger's Linear row "
    "(the plain depth ramp 0.5 → 1.5, `schedule: linear`), in percentage points, on the same "
    "test examples, with the same paired bootstrap 95% interval; * = the interval excludes 0. The "
    "(±Δ) in the other columns stay against the base merger. bench.csv carries it for every "
    "column (delta_linear, lo_linear, hi_linear, significant_linear)."
)


DATA_BLOCK = (
    "*uses data: LiNeS and guarded LARV choose one value on labelled validation examples, "
    "AdaMerging adapts on unlabelled test examples, LOT reads training exemplars; every row above "
    "is data-free*"
)


def merger_blocks(
    t: Table,
    res: Results,
    cols: Sequence[Col],
    cells: Sequence[Cell],
    variants: Sequence[str],
    anchor_table: str | None,
    labels: Mapping[str, str] | None,
    linear: Sequence[Col] | None,
    data_refs: Sequence[str] = (),
) -> None:
    """The mergers' rows (:func:`rows_block`) in two blocks: the data-free rows, then, under
    :data:`DATA_BLOCK`, the data-using reference rows ``data_refs``, the data-using variants of
    the data-free mergers and every row of the mergers that read data themselves."""
    uses = _uses_data(cells)
    free, data_mergers = _mergers_by_data(cells)
    rows_block(t, res, cols, free, [v for v in variants if v not in uses], anchor_table, labels,
               linear=linear, held_by=cells)  # fmt: skip
    if not (data_refs or data_mergers or any(v in uses for v in variants)):
        return
    t.row(DATA_BLOCK, [""] * len(t.columns))
    rows_block(t, res, cols, data_refs, ["base"], anchor_table, linear=linear)
    rows_block(t, res, cols, free, [v for v in variants if v in uses], anchor_table, labels,
               linear=linear, held_by=cells)  # fmt: skip
    rows_block(t, res, cols, data_mergers, variants, anchor_table, labels, linear=linear,
               held_by=cells)  # fmt: skip


def _mergers_by_data(cells: Sequence[Cell]) -> tuple[list[str], list[str]]:
    """The cells' mergers: (data-free ones, those that read data themselves, such as LOT)."""
    mergers = _mergers(cells)
    using = [m for m in mergers if not registry().mergers[m].data_free]
    return [m for m in mergers if m not in using], using


def _refs_by_data(cells: Sequence[Cell]) -> tuple[list[str], list[str]]:
    """The cells' reference rows: (data-free ones, data-using ones such as AdaMerging)."""
    refs = _refs(cells)
    using = [r for r in refs if registry().references[r].needs_data]
    return [r for r in refs if r not in using], using


def _uses_data(cells: Sequence[Cell]) -> dict[str, str]:
    """variant slug -> the data it uses, for the cells' data-using variants."""
    return {c.variant.slug: c.variant.uses_data for c in cells if c.variant.uses_data}


def _has_linear(cells: Sequence[Cell]) -> bool:
    """The cells hold the linear ramp and at least one of LARV's rows compared with it."""
    have = {c.variant.slug for c in cells}
    return LINEAR in have and any(v in have for v in VS_LINEAR)


def suites_side_by_side(
    t: Table, cells: Sequence[Cell], res: Results, order: Sequence[str]
) -> None:
    """Append to ``t`` the average of every merger × variant row, one column per suite, side by
    side (same renderer, :func:`rows_block`; its CSV records are already in ``t``, per suite),
    then, when the cells hold the linear ramp, LARV's Δ against it, one column per suite."""
    suites = _suites(cells)
    cols = [avg_col(s.key, s.label) for s in suites]
    lin = cols if _has_linear(cells) else None
    vs = [f"Δ vs linear, {c.label}" for c in lin or ()]
    side = Table(t.name, t.title, [c.label for c in cols] + vs)
    side.header()
    merger_blocks(side, res, cols, cells, _variants(cells, order), None, _labels(cells), lin)
    t.lines += ["", "**Average per suite, side by side**", "", *side.lines]
    table5_side_by_side(t, cells, res)
    versus_layerwise(t, cells, res)


def versus_layerwise(t: Table, cells: Sequence[Cell], res: Results) -> None:
    """Append to ``t`` LARV tiered (data-free) against the layer-wise methods, per merger and
    suite: the linear depth ramp (data-free), faithful LiNeS with β chosen on validation examples,
    and layer-wise AdaMerging (unlabelled test inputs); then guarded LARV against LiNeS (both
    choose one value on the same validation examples). Average Δ with its paired interval."""
    have = {(c.merger, c.variant.slug) for c in cells}
    suites = _suites(cells)
    ada = ("testbed_adamerging", "base")
    pairs = [(TIERED.slug, LINEAR, "tiered − linear ramp"),
             (TIERED.slug, LINES_VAL.slug, "tiered − LiNeS (β on val.)"),
             (TIERED.slug, ada, "tiered − AdaMerging"),
             (GUARDED.slug, LINES_VAL.slug, "guarded − LiNeS")]  # fmt: skip
    slugs = {v for _, v in have}

    def present(against) -> bool:
        return against in have if isinstance(against, tuple) else against in slugs

    pairs = [p for p in pairs if present(p[1])]
    if not any(p[1] != LINEAR for p in pairs):
        return
    heads = [f"{lab}, {s.label}" for _, _, lab in pairs for s in suites]
    side = Table(t.name, t.title, heads)
    side.header("Merger")
    for m in _mergers(cells):
        row = []
        for v, against, _ in pairs:
            for s in suites:
                ci = res.interval(s.key, m, v, None, against)
                row.append("—" if ci is None else
                           delta_text(ci.delta, ci) + ("*" if ci.significant else ""))  # fmt: skip
        side.row(display_label(m), row)
    t.lines += [
        "",
        "**LARV against the layer-wise methods** (average Δ in pp, paired bootstrap 95% "
        "intervals on the same test examples, * = excludes 0; LiNeS and guarded LARV choose one "
        "value on labelled validation examples held out from training; AdaMerging, one model over "
        "Task Arithmetic's task vectors, adapts on the unlabelled test examples)",
        "",
        *side.lines,
    ]


def verdict_counts(res: Results, suite: str, mergers: Sequence[str], variant: str,
                   against: str) -> str:  # fmt: skip
    """``above / includes 0 / below`` (with ``of n``): how many of ``mergers`` have the average
    Δ of ``variant`` − ``against`` (paired interval) above 0, including 0, below 0; mergers
    without both cells are left out."""
    cis = [res.interval(suite, m, variant, None, against) for m in mergers]
    cis = [ci for ci in cis if ci is not None]
    if not cis:
        return "—"
    up = sum(ci.lo > 0 for ci in cis)
    down = sum(ci.hi < 0 for ci in cis)
    return f"{up} / {len(cis) - up - down} / {down} of {len(cis)}"


def conflict_spread(res: Results, suite: str, mergers: Sequence[str]) -> str:
    """c_ℓ over depth in the suite's LARV tiered cells: the range of the per-layer median over
    the mergers, and max / min (1.00 = flat)."""
    per_layer: dict[int, list[float]] = {}
    for m in mergers:
        run = res.get(suite, m, TIERED.slug)
        for rec in (run.layers or {}).get("layers", []) if run else []:
            per_layer.setdefault(int(rec["index"]), []).append(float(rec["c"]))
    if not per_layer:
        return "—"
    med = [statistics.median(v) for _, v in sorted(per_layer.items())]
    lo, hi = min(med), max(med)
    return f"{lo:.3f}–{hi:.3f} (×{hi / lo:.2f})" if lo > 0 else f"{lo:.3f}–{hi:.3f}"


def questions(t: Table, cells: Sequence[Cell], res: Results) -> None:
    """Append to ``t`` the benchmark's questions, one column per suite, counted over the
    data-free mergers: does LARV tiered beat the base merger, the linear depth ramp, faithful
    LiNeS (β on validation), and is c_ℓ flat with depth?"""
    free, _ = _mergers_by_data(cells)
    have = {c.variant.slug for c in cells}
    if TIERED.slug not in have:
        return
    suites = _suites(cells)
    side = Table(t.name, t.title, [s.label for s in suites])
    side.header("Question")
    rows = [("LARV tiered − base merger", "base"),
            ("LARV tiered − linear depth ramp", LINEAR),
            ("LARV tiered − LiNeS (β on validation; uses data)", LINES_VAL.slug)]  # fmt: skip
    for label, against in rows:
        if against == "base" or against in have:
            side.row(label, [verdict_counts(res, s.key, free, TIERED.slug, against)
                             for s in suites])  # fmt: skip
    side.row("c_ℓ over depth: range of the per-layer median (max / min)",
             [conflict_spread(res, s.key, free) for s in suites])  # fmt: skip
    t.lines += [
        "",
        "**The questions, per suite** (data-free mergers; mergers whose average Δ has its paired "
        "95% interval above 0 / including 0 / below 0; c_ℓ from LARV tiered's per-layer report)",
        "",
        *side.lines,
    ]


#: the paper's Table 5 "Composite Score" row is its continuous gate (App. D.1); its anchors are
#: stored under the pseudo variant ``larv-best``
PAPER_TABLE5_SUITES = ("clip-vit-base-patch32_TA8", "clip-vit-base-patch16_TA8",
                       "clip-vit-large-patch14_TA8")  # fmt: skip


def table5_side_by_side(t: Table, cells: Sequence[Cell], res: Results) -> None:
    """Append to ``t`` our continuous − linear, tiered − linear and max† − linear (average, paired
    interval, per suite) beside the paper's Table 5 composite − linear (B/32, B/16, L/14)."""
    suites = _suites(cells)
    if not _has_linear(cells):
        return
    anc = anchors("table5")
    ours = [(v, lab) for v, lab in ((CONTINUOUS.slug, "continuous"), (TIERED.slug, "tiered"),
                                    (MAX, "max†")) if v == MAX or any(c.variant.slug == v for c in cells)]  # fmt: skip
    heads = [f"{lab} − linear, {s.label}" for _, lab in ours for s in suites]
    heads += [
        f"paper composite − linear, {BACKBONES[p.split('_')[0]]}" for p in PAPER_TABLE5_SUITES
    ]
    side = Table(t.name, t.title, heads)
    side.header("Merger")
    for m in _mergers(cells):
        row = []
        for v, _ in ours:
            for s in suites:
                row.append(linear_cell(res, s.key, m, v, avg_col(s.key))[0])
        for p in PAPER_TABLE5_SUITES:
            a, b = (
                anc.get((p, m, "larv-best", "average")),
                anc.get((p, m, "sched-linear", "average")),
            )
            row.append(f"{a['value'] - b['value']:+.1f}" if a and b else "")
        side.row(display_label(m), row)
    t.lines += [
        "",
        "**LARV against the linear depth ramp, beside the paper's Table 5** (average Δ in pp, "
        "ours with paired bootstrap 95% intervals on the same test examples; the paper's "
        '"Composite Score" row is its continuous gate, App. D.1, and carries no interval; '
        "max† = the better of tiered and continuous per cell, chosen on test accuracy as the "
        "paper's main tables do, so its interval ignores that choice)",
        "",
        *side.lines,
    ]


def _labels(cells: Sequence[Cell]) -> dict[str, str]:
    """Row labels of the variants outside :data:`VARIANT_ROWS`."""
    return {
        c.variant.slug: " + " + c.variant.label.removeprefix("+")
        for c in cells
        if c.variant.slug not in VARIANT_ROWS
    }


def summary_table(name: str, title: str, cells: Sequence[Cell], res: Results) -> Table:
    """Table 2 layout: averages, one column per suite."""
    suites = _suites(cells)
    cols = [avg_col(s.key, f"{s.backbone} {s.column}") for s in suites]
    for c in cols:
        c.key = "average"
    t = Table(name, title, [c.label for c in cols])
    t.header()
    rows_block(t, res, cols, _refs(cells), ["base"], "table2")
    rows_block(t, res, cols, _mergers(cells), _variants(cells, MAIN_ORDER), "table2")
    _notes(t, res, "table2")
    return t


def table3(cells: Sequence[Cell], res: Results) -> Table:
    suite = cells[0].suite.key
    mergers = _mergers(cells)
    t = Table("table3", EXPERIMENTS["table3"].title, [display_label(m) for m in mergers])
    t.header("r e c / gate")
    anc = anchors("table3")
    cols = {m: avg_col(suite) for m in mergers}
    have = {c.variant.slug for c in cells}

    def row(label: str, variant: str) -> None:
        out = []
        for m in mergers:
            shown, fields = delta_cell(res, suite, m, variant, cols[m])
            out.append(shown)
            t.record(suite=suite, row=label, merger=m, variant=variant, column="average",
                     **fields)  # fmt: skip
        t.row(label, out)

    if "base" in have:
        row("base merger (s ≡ 1)", "base")
    for rec in ABLATION_ROWS:
        flags = " ".join(f"{k}{'✓' if on else '–'}" for k, on in zip("rec", rec, strict=True))
        for gate in ("tiered", "continuous"):
            v = ablation(*rec, gate)
            if v.slug in have:
                row(f"{flags} / {gate}", v.slug)
        paper = [anc.get((suite, m, "ablation-r{}e{}c{}".format(*rec), "average")) for m in mergers]
        if any(paper):
            t.row(f"↳ *paper* ({flags})", [f"{a['value']:.1f}" if a else "" for a in paper])
            for m, a in zip(mergers, paper, strict=True):
                if a:
                    t.record(suite=suite, row=f"paper {flags}", merger=m,
                             variant="ablation-r{}e{}c{}".format(*rec), column="average",
                             paper=a["value"])  # fmt: skip
    _notes(t, res, "table3")
    t.notes.append(EXPERIMENTS["table3"].notes)
    return t


def table5(cells: Sequence[Cell], res: Results) -> Table:
    suites = _suites(cells)
    mergers = _mergers(cells)
    cols = []
    for m in mergers:
        for s in suites:
            c = avg_col(s.key, f"{display_label(m)} {s.backbone}")
            cols.append((m, c))
    t = Table("table5", EXPERIMENTS["table5"].title, [c.label for _, c in cols])
    t.header("Strategy")
    anc = anchors("table5")
    strategies = [("base", "Uniform (= base merger)"), (TIERED.slug, "Composite (LARV tiered)"),
                  (CONTINUOUS.slug, "Composite (LARV continuous)"), (MAX, "Composite max†")]  # fmt: skip
    strategies += [(f"sched-{s}", SCHEDULE_LABELS[s]) for s in SCHEDULES]
    have = {c.variant.slug for c in cells} | {MAX}
    for v, label in strategies:
        if v not in have:
            continue
        out, paper = [], []
        for m, col in cols:
            shown, fields = delta_cell(res, col.suite, m, v, col)
            out.append(shown)
            a = anc.get((col.suite, m, ANCHOR_VARIANT.get(v, v), "average"))
            paper.append(f"{a['value']:.1f}" if a else "")
            t.record(suite=col.suite, row=label, merger=m, variant=v, column="average",
                     **fields, paper=a["value"] if a else None)  # fmt: skip
        t.row(label, out)
        if any(paper):
            t.row("↳ *paper*", paper)
    _notes(t, res, "table5")
    return t


def table6(cells: Sequence[Cell], res: Results) -> Table:
    suite = cells[0].suite.key
    mergers = _mergers(cells)
    t = Table("table6", EXPERIMENTS["table6"].title, [display_label(m) for m in mergers])
    t.header("(s_shallow, s_middle, s_deep)")
    anc = anchors("table6")
    have = {c.variant.slug for c in cells}
    group = None
    shown = {s for _, s in TABLE6_ROWS}
    extra = [("Figure 4 grid (not in Table 6)", s) for s in FIG4_GRID if s not in shown]
    for g, s in [*TABLE6_ROWS, *extra]:
        v = custom(s)
        if v.slug not in have:
            continue
        if g != group:
            t.section(g)
            group = g
        out, paper = [], []
        for m in mergers:
            shown, fields = delta_cell(res, suite, m, v.slug, avg_col(suite))
            out.append(shown)
            a = anc.get((suite, m, v.slug, "average"))
            paper.append(f"{a['value']:.1f}" if a else "")
            t.record(suite=suite, row=str(s), merger=m, variant=v.slug, column="average",
                     **fields, paper=a["value"] if a else None)  # fmt: skip
        t.row(v.label if v.slug != "base" else "(1.0, 1.0, 1.0) base", out)
        if any(paper):
            t.row("↳ *paper*", paper)
    _notes(t, res, "table6")
    t.notes.append(
        "Figure 4 (fig4_tiered_grid.png) shows the full {0.5, 1, 1.5}³ grid as Δ heatmaps."
    )
    return t


def table4(cells: Sequence[Cell], res: Results) -> Table:
    s = cells[0].suite
    tasks = res.tasks(s.key)
    seen = [x for x in tasks if x in s.seen_tasks] or tasks
    unseen = [x for x in tasks if x not in seen]
    cols = [task_col(s.key, x) for x in seen] + [avg_col(s.key, "Avg. seen", seen)]
    if unseen:
        cols += [task_col(s.key, x) for x in unseen] + [avg_col(s.key, "Avg. unseen", unseen)]
    for c in cols:
        c.key = {"Avg. seen": "average_seen", "Avg. unseen": "average_unseen"}.get(c.label, c.key)
    t = Table("table4", EXPERIMENTS["table4"].title, [c.label for c in cols])
    t.header()
    t.section(s.label + (" (pools mapped)" if s.mapped else ""))
    rows_block(t, res, cols, _refs(cells), ["base"], "table4")
    rows_block(t, res, cols, _mergers(cells), _variants(cells, MAIN_ORDER), "table4")
    _notes(t, res, "table4")
    if not unseen:
        t.notes.append("No unseen task in these reports: every task counts as seen.")
    return t


def fig3_table(cells: Sequence[Cell], res: Results) -> Table:
    suites = _suites(cells)
    cols = [avg_col(s.key, s.column or s.key) for s in suites]
    t = Table("fig3", EXPERIMENTS["fig3"].title + " — average over the data sets",
              [c.label for c in cols])  # fmt: skip
    t.header()
    rows_block(t, res, cols, _mergers(cells), _variants(cells, MAIN_ORDER), None)
    _notes(t, res, None)
    return t


def layer_csv(cells: Sequence[Cell], res: Results, path: Path) -> Path:
    rows = []
    for c in cells:
        run = res.get(c.suite.key, c.merger, c.variant.slug)
        if run is None or not run.layers:
            continue
        for rec in run.layers["layers"]:
            rows.append({"suite": c.suite.key, "merger": c.merger, "variant": c.variant.slug,
                         **{k: rec.get(k) for k in ("index", "e", "c", "r", "w", "s")}})  # fmt: skip
    keys = ["suite", "merger", "variant", "index", "e", "c", "r", "w", "s"]
    return write_csv(path, keys, rows)


def regime_cards(t: Table, cells: Sequence[Cell], res: Results, folder: Path) -> list[Path]:
    """Per suite with both reference rows and at least one base merger: the regime card
    (:func:`.regime.regime_card`, base mergers only) as ``regime_<suite>.json`` and a line in
    the table's notes."""
    from .regime import regime_card, targets

    written = []
    for suite in _suites(cells):
        pre, ft = res.get(suite.key, "pretrained", "base"), res.get(suite.key, FINETUNED, "base")
        bases = {
            m: r.acc
            for m in targets()["data_free_mergers"]
            if (r := res.get(suite.key, m, "base")) is not None
        }
        if pre is None or ft is None or not bases:
            continue
        card = {"suite": suite.key, "pools": suite.label, **regime_card(pre.acc, ft.acc, bases)}
        path = folder / f"regime_{suite.key}.json"
        write_text_atomic(path, json.dumps(card, indent=2) + "\n")
        written.append(path)

        def mark(ok):
            return "n/a" if ok is None else ("met" if ok else "MISSED")

        g, m = card["targets"], card["meets"]
        ta = card["ta_normalized_accuracy"]
        spread = card["base_spread_pp"]
        t.notes.append(
            f"Regime card ({suite.label}; base mergers only, `{path.name}`): {card['num_tasks']} "
            f"tasks; fine-tuned {card['finetuned_average']:.1f} vs pretrained+head "
            f"{card['pretrained_head_average']:.1f} ({card['finetune_gain_pp']:+.1f} pp, target "
            f">= {g['min_finetune_gain_pp']:g}: {mark(m['finetune_gain'])}); Task Arithmetic keeps "
            + ("—" if ta is None else f"{100 * ta:.1f} %")
            + f" of fine-tuned (target <= {100 * g['max_ta_normalized']:g} %: "
            f"{mark(m['ta_normalized'])}); data-free base mergers span "
            + ("—" if spread is None else f"{spread:.1f} pp")
            + f" (target >= {g['min_base_spread_pp']:g}: {mark(m['base_spread'])})"
            + (
                f"; missing: {', '.join(card['missing_mergers'])}"
                if card["missing_mergers"]
                else ""
            )
            + "."
        )
    return written


#: run-time groups, in the order the notes list them: what a time budget could keep or drop
TIME_GROUPS = {
    "base": "base mergers and references",
    "larv": "LARV gates and depth schedules",
    "ablation": "ablation and per-task rows",
    "data": "LiNeS and guarded LARV (validation data)",
    "adamerging": "AdaMerging (test inputs)",
}


def time_group(c: Cell) -> str:
    """The :data:`TIME_GROUPS` label of a cell's row."""
    v = c.variant
    if c.merger == "testbed_adamerging":
        key = "adamerging"
    elif v.uses_data:
        key = "data"
    elif v.larv is None and v.method is None:
        key = "base"
    else:
        key = "ablation" if v.mergers is not None else "larv"
    return TIME_GROUPS[key]


def run_times(t: Table, cells: Sequence[Cell], out: Path) -> None:
    """Append to ``t``'s notes, per suite, the cells' run time as the launcher measured it
    (``cell.json``'s ``launch.seconds``: the merge and the evaluation): in all, per
    :func:`time_group` and the slowest cell."""
    for scells in by_suite(cells).values():
        timed = []
        for c in scells:
            secs = ((read_json(c.run_dir(out) / CELL) or {}).get("launch") or {}).get("seconds")
            if isinstance(secs, (int, float)):
                timed.append((float(secs), c))
        if not timed:
            continue
        groups = {g: [s for s, c in timed if time_group(c) == g] for g in TIME_GROUPS.values()}
        parts = [f"{g} {sum(v):,.0f} s ({len(v)})" for g, v in groups.items() if v]
        slow_s, slow = max(timed, key=lambda x: x[0])
        t.notes.append(
            f"Run time ({scells[0].suite.label}, `cell.json`): {len(timed)} of {len(scells)} "
            f"cells timed, {sum(s for s, _ in timed):,.0f} s in all; by rows (cells): "
            f"{'; '.join(parts)}; the slowest, {slow.merger}/{slow.variant.slug}, {slow_s:,.0f} s."
        )


# ------------------------------------------------------------------------------------------------
def collate(out: Path, groups: Mapping[str, Sequence[Cell]]) -> list[Path]:
    """Write every artefact of the experiments in ``groups`` into ``<out>/artefacts``."""
    from . import plots

    folder = Path(out) / "artefacts"
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, cells in groups.items():
        if not cells:
            continue
        res = Results(cells, out)
        if name == "table1":
            written += per_task_table(
                "table1", EXPERIMENTS[name].title, cells, res, "table1"
            ).write(folder)
        elif name == "table2":
            written += summary_table("table2", EXPERIMENTS[name].title, cells, res).write(folder)
            for tname, tasks, anchor in (
                ("table7", "TALL14", "table7"),
                ("table9", "TALL20", None),
            ):
                sub = [c for c in cells if c.suite.key.endswith("_" + tasks)]
                if sub:
                    title = f"Table {tname[-1]}: {tasks[-2:]} tasks, per data set"
                    written += per_task_table(tname, title, sub, res, anchor).write(folder)
        elif name == "table3":
            written += table3(cells, res).write(folder)
        elif name == "table5":
            written += table5(cells, res).write(folder)
        elif name == "table6":
            written += table6(cells, res).write(folder)
            p = plots.fig4(cells, res, folder / "fig4_tiered_grid.png")
            written += [p] if p else []
        elif name == "fig2":
            written += plots.fig2(cells, res, folder)
            written.append(layer_csv(cells, res, folder / "fig2.csv"))
        elif name == "bench":
            order = [v.slug for v in BENCH_VARIANTS]
            order.insert(order.index(CONTINUOUS_MEDIAN.slug) + 1, MAX)
            title = EXPERIMENTS[name].title
            t = per_task_table("bench", title, cells, res, None, order, relative=True, linear=True)
            if len(_suites(cells)) > 1:
                suites_side_by_side(t, cells, res, order)
            questions(t, cells, res)
            written += regime_cards(t, cells, res, folder)
            run_times(t, cells, out)
            p, curves = plots.adamerging_curves(cells, out, folder / "adamerging_curve.png")
            written += [p] if p else []
            for label, steps, seconds in curves:
                t.notes.append(
                    f"Layer-wise AdaMerging ({label}): {steps} steps of FusionBench's loop "
                    f"(its default is 1000; fewer to fit the 2-core CPU), {seconds:.0f} s of "
                    "test-time adaptation; loss curve in `adamerging_curve.png`."
                )
            written += t.write(folder)
            p = plots.forest(cells, res, folder / "forest_bench.png", order)
            written += [p] if p else []
            written += plots.fig2(cells, res, folder)
            written.append(layer_csv(cells, res, folder / "bench_layers.csv"))
        elif name == "fig3":
            written += fig3_table(cells, res).write(folder)
            written += plots.fig3(cells, res, folder)
        elif name == "table4":
            written += table4(cells, res).write(folder)
        elif name == "table8":
            written += per_task_table(
                "table8", EXPERIMENTS[name].title, cells, res, "table8"
            ).write(folder)
    return written
