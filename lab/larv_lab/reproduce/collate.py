"""The collator: one registry of what each experiment writes (:data:`ARTEFACTS`), :func:`collate`.

Every run's reports are read back once (:class:`.results.Results`, one result type, whatever
launched the runs: every launcher leaves the same files) and written as tables (markdown + CSV,
one renderer: :class:`.tablefmt.Table`) and figures (PNG, :mod:`.plots`).

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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import plots
from .bench_table import bench_artefacts
from .experiments import EXPERIMENTS, Cell
from .layouts import Layout, corruption_table, per_task_table, seen_unseen_table, summary_table
from .paper_grids import ablation_table, schedule_table, strategy_table
from .results import Results, load_run
from .tablefmt import layer_csv

__all__ = ["ARTEFACTS", "TableSpec", "collate", "load_run"]  # load_run: inprocess.py reads it here

#: one artefact of an experiment: writes its files from the cells' results into the folder
Artefact = Callable[[Sequence[Cell], Results, Path], list[Path]]


@dataclass(frozen=True)
class TableSpec:
    """A table of the registry: its file name (``<name>.md`` / ``.csv``), title, layout (which rows
    and columns), the paper's anchors its rows show, the suites it reads (those whose key ends in
    ``suites_ending``; none there: no table) and notes after the layout's own."""

    name: str
    title: str
    layout: Layout
    anchor: str | None = None
    suites_ending: str = ""
    notes: tuple[str, ...] = ()

    def __call__(self, cells: Sequence[Cell], res: Results, folder: Path) -> list[Path]:
        cells = [c for c in cells if c.suite.key.endswith(self.suites_ending)]
        if not cells:
            return []
        t = self.layout(self.name, self.title, cells, res, self.anchor)
        t.notes += self.notes
        return t.write(folder)


def figure(draw: Callable, file: str) -> Artefact:
    """An artefact of one figure file: ``draw(cells, res, path)`` returns the path or None."""

    def write(cells: Sequence[Cell], res: Results, folder: Path) -> list[Path]:
        p = draw(cells, res, folder / file)
        return [p] if p else []

    return write


def layers(file: str) -> Artefact:
    """LARV's per-layer e, c, r, w, s of every cell, as one CSV."""
    return lambda cells, res, folder: [layer_csv(cells, res, folder / file)]


def _title(name: str) -> str:
    return EXPERIMENTS[name].title


#: per experiment, in order, what the collator writes into ``<out>/artefacts``
ARTEFACTS: dict[str, tuple[Artefact, ...]] = {
    "table1": (TableSpec("table1", _title("table1"), per_task_table, anchor="table1"),),
    "table2": (
        TableSpec("table2", _title("table2"), summary_table, anchor="table2"),
        TableSpec(
            "table7",
            "Table 7: 14 tasks, per data set",
            per_task_table,
            anchor="table7",
            suites_ending="_TALL14",
        ),
        TableSpec(
            "table9",
            "Table 9: 20 tasks, per data set",
            per_task_table,
            anchor="table9",
            suites_ending="_TALL20",
        ),
    ),
    "table3": (
        TableSpec(
            "table3",
            _title("table3"),
            ablation_table,
            anchor="table3",
            notes=(EXPERIMENTS["table3"].notes,),
        ),
    ),
    "table5": (TableSpec("table5", _title("table5"), strategy_table, anchor="table5"),),
    "table6": (
        TableSpec(
            "table6",
            _title("table6"),
            schedule_table,
            anchor="table6",
            notes=(
                "Figure 4 (fig4_tiered_grid.png) shows the full {0.5, 1, 1.5}³ grid as Δ heatmaps.",
            ),
        ),
        figure(plots.fig4, "fig4_tiered_grid.png"),
    ),
    "fig2": (plots.fig2, layers("fig2.csv")),
    "bench": (bench_artefacts,),
    "fig3": (
        TableSpec("fig3", _title("fig3") + " — average over the data sets", corruption_table),
        plots.fig3,
    ),
    "table4": (TableSpec("table4", _title("table4"), seen_unseen_table, anchor="table4"),),
    "table8": (TableSpec("table8", _title("table8"), per_task_table, anchor="table8"),),
}


def collate(out: Path, groups: Mapping[str, Sequence[Cell]]) -> list[Path]:
    """Write every artefact of the experiments in ``groups`` into ``<out>/artefacts``."""
    folder = Path(out) / "artefacts"
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, cells in groups.items():
        if not cells:
            continue
        res = Results(cells, out)
        for artefact in ARTEFACTS.get(name, ()):
            written += artefact(cells, res, folder)
    return written
