"""A table's rows: merger × variant blocks with the paper's rows, their labels, the notes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .anchors import anchor_notes, anchors
from .columns import Col, delta_cell, linear_cell
from .experiments import CONTINUOUS, TIERED, Cell
from .registry import display_label
from .results import UNRECORDED, Results, unseen_tasks
from .selection import MAX, mergers_by_data, uses_data
from .tablefmt import Table

VARIANT_ROWS = {"base": "", TIERED.slug: " + LARV tiered", CONTINUOUS.slug: " + LARV continuous"}
VARIANT_ROWS[MAX] = " + LARV max(tiered, continuous)†"
ANCHOR_VARIANT = {"base": "base", MAX: "larv-best"}
#: marks a row whose value was chosen on validation examples that missed some task
UNSEEN = "‡"

MAIN_ORDER = ["base", TIERED.slug, CONTINUOUS.slug, MAX]


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
    anc = anchors(anchor_table)
    labels = {**VARIANT_ROWS, **(labels or {})}
    anchor_variant = {**ANCHOR_VARIANT, **(anchor_variant or {})}
    held = None if held_by is None else {(c.merger, c.variant.slug) for c in held_by}
    for m in mergers:
        for v in variants:
            if held is not None and v != MAX and (m, v) not in held:
                continue
            cells, paper_cells, any_paper = [], [], False
            unseen = {c.suite: u for c in cols if (u := unseen_tasks(res.get(c.suite, m, v)))}
            label = display_label(m) + labels.get(v, f" {v}") + (f" {UNSEEN}" if unseen else "")
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
                    suite=col.suite, row=label, merger=m, variant=v, column=col.key, **fields,
                    unseen=unseen.get(col.suite),
                    paper=a["value"] if a else None, paper_delta=a.get("delta") if a else None,
                    paper_derived=bool(a and a.get("derived")),
                )  # fmt: skip
            cells += [linear_cell(res, col.suite, m, v, col)[0] for col in linear or ()]
            t.row(label, cells)
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


def table_notes(t: Table, res: Results, anchor_table: str | None) -> None:
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
    _unseen_notes(t)
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


def _unseen_notes(t: Table) -> None:
    """Which rows chose on validation examples that missed tasks (:data:`UNSEEN`), and which
    tasks, per suite."""
    groups: dict[tuple[str, str], list[str]] = {}
    for r in t.records:
        if r.get("unseen"):
            u = r["unseen"] if r["unseen"] == UNRECORDED else ", ".join(r["unseen"])
            rows = groups.setdefault((r["suite"], u), [])
            if r["row"] not in rows:
                rows.append(r["row"])
    if not groups:
        return
    parts = [f"{suite}: {u} ({len(rows)} row{'s' * (len(rows) > 1)})"
             for (suite, u), rows in groups.items()]  # fmt: skip
    t.notes.append(
        f"{UNSEEN} = the row's value was chosen on validation examples that did not cover every "
        "task: the choice never saw the tasks named here, which still got the chosen value "
        f"('{UNRECORDED}': the cell predates the record of its coverage). " + "; ".join(parts) + "."
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


DATA_BLOCK = (
    "*uses data: LiNeS, the signed depth ramp and guarded LARV choose one value on labelled "
    "validation examples, "
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
    uses = uses_data(cells)
    free, data_mergers = mergers_by_data(cells)
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


def row_labels(cells: Sequence[Cell]) -> dict[str, str]:
    """Row labels of the variants outside :data:`VARIANT_ROWS`."""
    return {
        c.variant.slug: " + " + c.variant.label.removeprefix("+")
        for c in cells
        if c.variant.slug not in VARIANT_ROWS
    }
