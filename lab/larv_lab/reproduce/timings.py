"""The cells' run times (``cell.json``) in a table's notes, summed per :data:`TIME_GROUPS`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .experiments import Cell, by_suite
from .sweep import CELL, read_json
from .tablefmt import Table

#: run-time groups, in the order the notes list them: what a time budget could keep or drop
TIME_GROUPS = {
    "base": "base mergers and references",
    "larv": "LARV gates and depth schedules",
    "ablation": "ablation and per-task rows",
    "data": "LiNeS, the signed depth ramp and guarded LARV (validation data)",
    "adamerging": "AdaMerging (test inputs)",
    "ceiling": "per-block scales fitted on validation labels (the ceiling)",
}


def time_group(c: Cell) -> str:
    """The :data:`TIME_GROUPS` label of a cell's row."""
    v = c.variant
    if c.merger == "testbed_adamerging":
        key = "adamerging"
    elif v.fits:
        key = "ceiling"
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
