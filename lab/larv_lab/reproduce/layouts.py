"""Table layouts made of rows blocks: per task (Tables 1, 7, 8, 9, bench), averages, seen/unseen."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from . import selection as sel
from .columns import LINEAR_KEYS, avg_col, relative_col, task_col
from .experiments import Cell
from .results import Results
from .rows import MAIN_ORDER, merger_blocks, paper_only_rows, row_labels, rows_block, table_notes
from .tablefmt import Table

#: a table layout: (file name, title, cells, their results, the paper's anchor table or None)
Layout = Callable[[str, str, Sequence[Cell], Results, str | None], Table]


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
    the CSV fields :data:`.columns.LINEAR_KEYS` (LARV's rows against the merger's linear ramp, every
    column) and, when the cells hold the linear ramp, a last column "Avg. Δ vs linear" with the
    average's (the benchmark's table)."""
    suites = sel.suites(cells)
    tasks0 = res.tasks(suites[0].key) if suites else []
    extra = ["Avg. / fine-tuned"] if relative else []
    vs_linear = linear and sel.has_linear(cells)
    extra += [LINEAR_COLUMN] if vs_linear else []
    t = Table(name, title, [*tasks0, "Avg.", *extra], extra_keys=LINEAR_KEYS if linear else ())
    t.header()
    order = list(order or MAIN_ORDER)
    order += [c.variant.slug for c in cells if c.variant.slug not in order]
    labels = row_labels(cells)
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
        refs, data_refs = sel.refs_by_data(scells)
        rows_block(t, res, cols, refs, ["base"], anchor_table, linear=lin)
        merger_blocks(t, res, cols, scells, sel.variants(scells, order), anchor_table, labels, lin,
                      data_refs)  # fmt: skip
    table_notes(t, res, anchor_table)
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


def summary_table(
    name: str, title: str, cells: Sequence[Cell], res: Results, anchor_table: str | None
) -> Table:
    """Table 2 layout: averages, one column per suite."""
    suites = sel.suites(cells)
    cols = [avg_col(s.key, f"{s.backbone} {s.column}") for s in suites]
    for c in cols:
        c.key = "average"
    t = Table(name, title, [c.label for c in cols])
    t.header()
    rows_block(t, res, cols, sel.refs(cells), ["base"], anchor_table)
    rows_block(t, res, cols, sel.mergers(cells), sel.variants(cells, MAIN_ORDER), anchor_table)
    table_notes(t, res, anchor_table)
    return t


def seen_unseen_table(
    name: str, title: str, cells: Sequence[Cell], res: Results, anchor_table: str | None
) -> Table:
    """Table 4 layout: one suite, its seen tasks and their average, then its unseen ones."""
    s = cells[0].suite
    tasks = res.tasks(s.key)
    seen = [x for x in tasks if x in s.seen_tasks] or tasks
    unseen = [x for x in tasks if x not in seen]
    cols = [task_col(s.key, x) for x in seen] + [avg_col(s.key, "Avg. seen", seen)]
    if unseen:
        cols += [task_col(s.key, x) for x in unseen] + [avg_col(s.key, "Avg. unseen", unseen)]
    for c in cols:
        c.key = {"Avg. seen": "average_seen", "Avg. unseen": "average_unseen"}.get(c.label, c.key)
    t = Table(name, title, [c.label for c in cols])
    t.header()
    t.section(s.label + (" (pools mapped)" if s.mapped else ""))
    rows_block(t, res, cols, sel.refs(cells), ["base"], anchor_table)
    rows_block(t, res, cols, sel.mergers(cells), sel.variants(cells, MAIN_ORDER), anchor_table)
    table_notes(t, res, anchor_table)
    if not unseen:
        t.notes.append("No unseen task in these reports: every task counts as seen.")
    return t


def corruption_table(
    name: str, title: str, cells: Sequence[Cell], res: Results, anchor_table: str | None
) -> Table:
    """Figure 3's table: the mergers' averages, one column per corruption (no reference rows)."""
    cols = [avg_col(s.key, s.column or s.key) for s in sel.suites(cells)]
    t = Table(name, title, [c.label for c in cols])
    t.header()
    rows_block(t, res, cols, sel.mergers(cells), sel.variants(cells, MAIN_ORDER), anchor_table)
    table_notes(t, res, anchor_table)
    return t
