"""A table's columns (:class:`Col`) and one cell of it with its CSV fields, Δ against a row."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fusion_bench_larv.evaluation import intervals as iv

from .results import Results, Run
from .selection import LINEAR, VS_LINEAR
from .tablefmt import delta_text, with_delta

FINETUNED = "finetuned"  # the reference whose average the benchmark's relative column divides by
#: the CSV fields of LARV's rows against the linear ramp (:func:`linear_cell`), after every other
LINEAR_KEYS = ("delta_linear", "lo_linear", "hi_linear", "significant_linear")


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
