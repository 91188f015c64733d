"""The layouts of the paper's grid tables: the ablation (Table 3), strategies (5), schedules (6)."""

from __future__ import annotations

from collections.abc import Sequence

from . import selection as sel
from .anchors import anchors
from .columns import avg_col, delta_cell
from .experiments import (
    ABLATION_ROWS,
    CONTINUOUS,
    FIG4_GRID,
    SCHEDULE_LABELS,
    SCHEDULES,
    TABLE6_ROWS,
    TIERED,
    Cell,
    ablation,
    custom,
)
from .registry import display_label
from .results import Results
from .rows import ANCHOR_VARIANT, table_notes
from .tablefmt import Table


def _one_column_per_merger(
    name: str, title: str, cells: Sequence[Cell], corner: str
) -> tuple[str, list[str], Table]:
    """The first suite's key, the cells' mergers and a table with one column per merger, its
    header's first cell ``corner``."""
    mergers = sel.mergers(cells)
    t = Table(name, title, [display_label(m) for m in mergers])
    t.header(corner)
    return cells[0].suite.key, mergers, t


def ablation_table(
    name: str, title: str, cells: Sequence[Cell], res: Results, anchor_table: str | None
) -> Table:
    """Table 3 layout: one column per merger, one row per ablation (r, e, c) and gate."""
    suite, mergers, t = _one_column_per_merger(name, title, cells, "r e c / gate")
    anc = anchors(anchor_table)
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
    table_notes(t, res, anchor_table)
    return t


def strategy_table(
    name: str, title: str, cells: Sequence[Cell], res: Results, anchor_table: str | None
) -> Table:
    """Table 5 layout: one column per merger × suite, one row per layer-scaling strategy."""
    suites = sel.suites(cells)
    mergers = sel.mergers(cells)
    cols = []
    for m in mergers:
        for s in suites:
            c = avg_col(s.key, f"{display_label(m)} {s.backbone}")
            cols.append((m, c))
    t = Table(name, title, [c.label for _, c in cols])
    t.header("Strategy")
    anc = anchors(anchor_table)
    strategies = [("base", "Uniform (= base merger)"), (TIERED.slug, "Composite (LARV tiered)"),
                  (CONTINUOUS.slug, "Composite (LARV continuous)"), (sel.MAX, "Composite max†")]  # fmt: skip
    strategies += [(f"sched-{s}", SCHEDULE_LABELS[s]) for s in SCHEDULES]
    have = {c.variant.slug for c in cells} | {sel.MAX}
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
    table_notes(t, res, anchor_table)
    return t


def schedule_table(
    name: str, title: str, cells: Sequence[Cell], res: Results, anchor_table: str | None
) -> Table:
    """Table 6 layout: one column per merger, one row per tiered (s_shallow, s_middle, s_deep)."""
    suite, mergers, t = _one_column_per_merger(name, title, cells, "(s_shallow, s_middle, s_deep)")
    anc = anchors(anchor_table)
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
    table_notes(t, res, anchor_table)
    return t
