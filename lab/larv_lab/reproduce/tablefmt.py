"""The one table renderer: :class:`Table` (markdown + long CSV), a Δ's text, the CSV writers."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusion_bench_larv.core.io import atomic_path, write_text_atomic
from fusion_bench_larv.evaluation import intervals as iv

from .experiments import Cell
from .results import Results


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


@dataclass
class Table:
    name: str
    title: str
    columns: list[str]
    lines: list[str] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: CSV fields after the usual ones (the benchmark: :data:`.columns.LINEAR_KEYS`)
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
