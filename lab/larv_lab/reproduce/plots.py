"""The figures from the collated runs (PNG, matplotlib's Agg backend).

- Figure 2: e, c, s against depth, one line per merger (the paper's and the benchmark's).
- Figure 3: accuracy per corruption (and averaged), base vs LARV, one panel per merger.
- Figure 5: Δ (LARV − base) heatmaps, data sets × corruptions, one panel per merger and gate.
- Figure 4: Δ (schedule − base) heatmaps over (s_middle, s_deep), one panel per s_shallow and
  merger.
- Forest plot (the benchmark's ``forest_bench.png``): Δ average accuracy (variant − base merger)
  with its paired bootstrap 95% interval, one row per merger × variant (and layer-wise
  AdaMerging against Task Arithmetic, ``selection.OVER``), one marker per suite; beside it,
  LARV's rows against the linear depth ramp (``sched-linear``) where it was run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fusion_bench_larv.core.io import atomic_path

from . import selection as sel
from .experiments import CONTINUOUS, FIG4_LEVELS, TIERED, Cell, custom
from .registry import display_label


def _save(fig, path: Path, dpi: int = 120) -> Path:
    """Write the figure atomically (a PNG appears whole or not at all) and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    _plt().close(fig)
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fig2(cells: Sequence[Cell], res, folder: Path) -> list[Path]:
    """Figure 2, one PNG per suite (``fig2_<suite>.png``): e and c (from the tiered run's
    diagnostics, else the continuous run's) and s (tiered solid, continuous dashed) against
    depth, one colour per merger, the suite in the title."""
    plt = _plt()
    written = []
    for s in sel.suites(cells):
        lines = []  # (merger label, {gate: per-layer records})
        for m in sel.mergers([c for c in cells if c.suite.key == s.key]):
            gates = {}
            for v in (TIERED, CONTINUOUS):
                run = res.get(s.key, m, v.slug)
                if run is not None and run.layers:
                    gates[v.slug] = run.layers["layers"]
            if gates:
                lines.append((display_label(m), gates))
        if not lines:
            continue
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, (label, gates) in enumerate(lines):
            color = colors[i % len(colors)]
            diag = gates.get(TIERED.slug) or gates[CONTINUOUS.slug]
            depth = [rec["index"] for rec in diag]
            axes[0].plot(depth, [rec["e"] for rec in diag], "o-", color=color, label=label)
            axes[1].plot(depth, [rec["c"] for rec in diag], "o-", color=color, label=label)
            for slug, style, gate in ((TIERED.slug, "-", "tiered"),
                                      (CONTINUOUS.slug, "--", "continuous")):  # fmt: skip
                if slug in gates:
                    layers = gates[slug]
                    axes[2].plot([rec["index"] for rec in layers], [rec["s"] for rec in layers],
                                 style, marker=".", color=color, label=f"{label} ({gate})")  # fmt: skip
        titles = ("effective-rank contrast $e_\\ell$", "commutator conflict $c_\\ell$",
                  "scale $s_\\ell$ (tiered —, continuous - -)")  # fmt: skip
        for ax, title in zip(axes, titles, strict=True):
            ax.set_title(title)
            ax.set_xlabel("layer ℓ (depth)")
            ax.grid(alpha=0.3)
        # one legend for the colours (mergers), outside the panels: the scale panel holds two
        # lines per merger and an inside legend would hide them
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
        fig.suptitle(f"Figure 2 — per-layer diagnostics and scales ({s.label})")
        fig.tight_layout(rect=(0, 0, 0.87, 1))
        written.append(_save(fig, folder / f"fig2_{s.key}.png"))
    return written


def fig3(cells: Sequence[Cell], res, folder: Path) -> list[Path]:
    plt = _plt()
    import numpy as np

    suites = sel.suites(cells)
    mergers = sel.mergers(cells)
    if not suites or not mergers:
        return []
    labels = [s.column or s.key for s in suites] + ["Avg."]
    variants = [
        ("base", "base"),
        (TIERED.slug, "LARV tiered"),
        (CONTINUOUS.slug, "LARV continuous"),
    ]
    written = []

    # Figure 3: grouped bars per corruption, one panel per merger
    fig, axes = plt.subplots(1, len(mergers), figsize=(4.2 * len(mergers), 3.6), squeeze=False)
    for ax, m in zip(axes[0], mergers, strict=True):
        x = np.arange(len(labels))
        for i, (v, vlabel) in enumerate(variants):
            vals = []
            for s in suites:
                run = res.get(s.key, m, v)
                vals.append(run.average if run else np.nan)
            vals.append(np.nanmean(vals) if not np.all(np.isnan(vals)) else np.nan)
            ax.bar(x + (i - 1) * 0.27, vals, width=0.27, label=vlabel)
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
        ax.set_title(display_label(m))
        ax.set_ylabel("accuracy (%)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Figure 3 — accuracy under corruptions (mean over the data sets)")
    fig.tight_layout()
    written.append(_save(fig, folder / "fig3_corruptions.png"))

    # Figure 5: Δ heatmaps, data sets (+ Avg.) × corruptions (+ Avg.)
    tasks: list[str] = []
    for s in suites:
        for t in res.tasks(s.key):
            if t not in tasks:
                tasks.append(t)
    gates = [(TIERED.slug, "tiered"), (CONTINUOUS.slug, "continuous")]
    fig, axes = plt.subplots(
        len(gates), len(mergers), figsize=(3.8 * len(mergers), 3.2 * len(gates)), squeeze=False
    )
    for gi, (gv, gname) in enumerate(gates):
        for mi, m in enumerate(mergers):
            grid = np.full((len(tasks) + 1, len(suites) + 1), np.nan)
            for j, s in enumerate(suites):
                run, base = res.get(s.key, m, gv), res.get(s.key, m, "base")
                if run is None or base is None:
                    continue
                for i, t in enumerate(tasks):
                    if t in run.acc and t in base.acc:
                        grid[i, j] = run.acc[t] - base.acc[t]
                grid[-1, j] = run.average - base.average
            with np.errstate(all="ignore"):
                grid[:, -1] = [
                    np.nanmean(r) if not np.all(np.isnan(r)) else np.nan for r in grid[:, :-1]
                ]
            ax = axes[gi][mi]
            lim = max(1e-6, float(np.nanmax(np.abs(grid))) if not np.all(np.isnan(grid)) else 1.0)
            im = ax.imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
            for (i, j), val in np.ndenumerate(grid):
                if not np.isnan(val):
                    ax.text(j, i, f"{val:+.1f}", ha="center", va="center", fontsize=6)
            ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
            ax.set_yticks(range(len(tasks) + 1), [*tasks, "Avg."], fontsize=7)
            ax.set_title(f"{display_label(m)} ({gname})", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle("Figure 5 — Δ accuracy (LARV − base, pp) per data set and corruption")
    fig.tight_layout()
    written.append(_save(fig, folder / "fig5_corruption_delta.png"))
    return written


def fig4(cells: Sequence[Cell], res, path: Path) -> Path | None:
    """Δ average accuracy (custom (s_s, s_m, s_d) − base) over the {0.5, 1, 1.5}³ grid."""
    plt = _plt()
    import numpy as np

    suites = sel.suites(cells)
    mergers = sel.mergers(cells)
    if not suites or not mergers:
        return None
    suite = suites[0].key
    lv = FIG4_LEVELS
    fig, axes = plt.subplots(
        len(mergers),
        len(lv),
        figsize=(3.6 * len(lv) + 1, 3.2 * len(mergers) + 0.6),
        squeeze=False,
        layout="constrained",
    )
    grids = {}
    for m in mergers:
        base = res.get(suite, m, "base")
        for si, ss in enumerate(lv):
            g = np.full((len(lv), len(lv)), np.nan)
            for mi, sm in enumerate(lv):
                for di, sd in enumerate(lv):
                    run = res.get(suite, m, custom((ss, sm, sd)).slug)
                    if run is not None and base is not None:
                        g[mi, di] = run.average - base.average
            grids[m, si] = g
    finite = [np.nanmax(np.abs(g)) for g in grids.values() if not np.all(np.isnan(g))]
    lim = max(finite) if finite else 1.0
    lim = lim if lim > 0 else 1.0
    for r, m in enumerate(mergers):
        for si, ss in enumerate(lv):
            ax = axes[r][si]
            g = grids[m, si]
            im = ax.imshow(g, cmap="RdBu_r", vmin=-lim, vmax=lim, origin="lower")
            for (i, j), val in np.ndenumerate(g):
                if not np.isnan(val):
                    ax.text(j, i, f"{val:+.1f}", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(lv)), [f"{x:g}" for x in lv])
            ax.set_yticks(range(len(lv)), [f"{x:g}" for x in lv])
            ax.set_xlabel("s_deep")
            ax.set_ylabel("s_middle")
            ax.set_title(f"{display_label(m)}, s_shallow = {ss:g}", fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.8, label="Δ accuracy (pp) vs base")
    fig.suptitle(f"Figure 4 — depth-only tiered scales, Δ vs base ({suites[0].label})")
    return _save(fig, path, dpi=110)


def forest_rows(cells: Sequence[Cell], res, order: Sequence[str] = ()) -> tuple[list, dict]:
    """The forest plot's rows and their labels: ``(merger, variant slug)`` for every variant (not
    the base) that ran with its merger's base cell, in ``order`` then the cells' order, and after
    a merger of :data:`.selection.OVER` ``(merger, (other merger, its cell))`` where that cell
    ran (AdaMerging against Task Arithmetic)."""
    suites = sel.suites(cells)
    # row labels as in the tables, without markdown's backticks
    labels: dict = {c.variant.slug: c.variant.label.removeprefix("+").replace("`", "")
                    for c in cells}  # fmt: skip
    have = {c.variant.slug for c in cells}
    variants = [v for v in [*order, *labels] if v != "base" and v in have]
    variants = list(dict.fromkeys(variants))
    rows: list = []
    for m in sel.mergers(cells):
        base = [s for s in suites if res.get(s.key, m, "base")]
        rows += [(m, v) for v in variants if any(res.get(s.key, m, v) for s in base)]
        if m in sel.OVER:
            other, label = sel.OVER[m]
            if any(res.get(s.key, *other) for s in base):
                rows.append((m, other))
                labels[other] = label
    return rows, labels


def forest(cells: Sequence[Cell], res, path: Path, order: Sequence[str] = ()) -> Path | None:
    """Forest plot: one row per merger × variant (:func:`forest_rows`), the Δ of the average
    accuracy against the merger's base cell (pp) as a point with its paired bootstrap 95% interval
    (``res.interval``) as a horizontal bar, a vertical line at 0; one marker and colour per
    suite, the suites of a row side by side (slightly offset). A Δ whose cells have no
    per-sample files is drawn hollow, without a bar (no interval is made up). When the cells
    hold the linear depth ramp (``sched-linear``), a second panel beside it shows LARV's rows
    against that ramp instead of the base merger (the same rows; the others stay empty)."""
    plt = _plt()

    suites = sel.suites(cells)
    have = {c.variant.slug for c in cells}
    rows, labels = forest_rows(cells, res, order)
    if not rows:
        return None
    panels = [("base", "Δ average accuracy vs the base merger (pp)")]
    if sel.LINEAR in have and any(v in sel.VS_LINEAR for _, v in rows):
        panels.append((sel.LINEAR, "LARV's rows: Δ vs the same merger + Linear (depth ramp, pp)"))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(10 + 4 * (len(panels) - 1), 1.6 + 0.32 * len(rows)),
        sharey=True, squeeze=False, layout="constrained",
    )  # fmt: skip
    hollow = False
    for ax, (against, xlabel) in zip(axes[0], panels, strict=True):
        shown = rows if against == "base" else [(m, v) for m, v in rows if v in sel.VS_LINEAR]
        hollow |= _forest_panel(ax, plt, suites, rows, shown, res, against)
        ax.axvline(0.0, color="0.3", linewidth=1.0, linestyle="--")
        ax.set_xlabel(xlabel + ",\npaired bootstrap 95% interval", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    ax0 = axes[0][0]
    ticks = [f"{display_label(m)}{': ' if isinstance(v, tuple) else ' + '}{labels[v]}"
             for m, v in rows]  # fmt: skip
    ax0.set_yticks(range(len(rows)), ticks, fontsize=8)
    ax0.set_ylim(len(rows) - 0.5, -0.5)
    title = f"Δ with 95% intervals over test examples (B = {res.resamples}, seed {res.seed})"
    if hollow:
        title += "\nhollow: no per-sample file, no interval"
    fig.suptitle(title, fontsize=10)
    handles, names = ax0.get_legend_handles_labels()
    axes[0][-1].legend(handles, names, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                       title="suite", frameon=False)  # fmt: skip
    return _save(fig, path)


def _forest_panel(ax, plt, suites, rows, shown, res, against: str) -> bool:
    """One forest panel: for each row of ``rows`` that is in ``shown``, each suite's Δ against
    the merger's ``against`` cell with its interval (hollow, no bar, without one). True when a
    point is hollow."""
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vP*Xh<>"
    k = len(suites)
    step = 0.5 / max(k, 1)
    hollow = False
    for si, s in enumerate(suites):
        off = (si - (k - 1) / 2) * step
        color, marker = colors[si % len(colors)], markers[si % len(markers)]
        xs, ys, lo, hi, hx, hy = [], [], [], [], [], []
        for ri, (m, v) in enumerate(rows):
            if (m, v) not in shown:
                continue
            # v: a variant of m, or (merger, variant): another merger's cell (sel.OVER)
            cell, base = (v, (m, against)) if isinstance(v, tuple) else ((m, v), against)
            run, ref = res.get(s.key, *cell), res.get(s.key, m, against)
            if run is None or ref is None:
                continue
            ci = res.interval(s.key, *cell, against=base)
            if ci is None:
                hx.append(run.average - ref.average)
                hy.append(ri + off)
                continue
            xs.append(ci.delta)
            ys.append(ri + off)
            lo.append(ci.delta - ci.lo)
            hi.append(ci.hi - ci.delta)
        if xs:
            ax.errorbar(xs, ys, xerr=[lo, hi], fmt=marker, color=color, ecolor=color,
                        capsize=2.5, markersize=5, linewidth=1.2, label=s.label)  # fmt: skip
        if hx:
            hollow = True
            ax.plot(hx, hy, marker, markerfacecolor="none", color=color,
                    label=None if xs else s.label)  # fmt: skip
    return hollow


def adamerging_curves(cells: Sequence[Cell], out: Path, path: Path) -> tuple[Path | None, list]:
    """Layer-wise AdaMerging's entropy loss per step (``adamerging_curve.json`` of each suite's
    ``testbed_adamerging`` cell), one colour per suite: each step's loss (thin) and, for a run
    with the stopping rule, the mean over its window (thick) up to the step where it stopped
    (marked). Also returns each curve's record ``(suite label, record)`` for the table's notes."""
    import json

    runs = [(c, c.run_dir(out) / "adamerging_curve.json") for c in cells
            if c.merger == "testbed_adamerging"]  # fmt: skip
    runs = [(c, json.loads(p.read_text())) for c, p in runs if p.is_file()]
    if not runs:
        return None, []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.4), layout="constrained")
    for i, (c, rec) in enumerate(runs):
        color = f"C{i % 10}"
        curve = rec["curve"]
        steps = range(1, len(curve) + 1)
        rule = rec.get("stop_rule")
        if isinstance(rule, dict) and len(curve) >= rule["window"]:
            w = int(rule["window"])
            ax.plot(steps, curve, color=color, alpha=0.3, linewidth=0.7)
            means = [sum(curve[j - w : j]) / w for j in range(w, len(curve) + 1)]
            ax.plot(range(w, len(curve) + 1), means, color=color, linewidth=1.8,
                    label=f"{c.suite.label} (mean of {w} steps; {rec.get('stopped')})")  # fmt: skip
            ax.plot([len(curve)], [means[-1]], "o", color=color, markersize=5)
        else:
            ax.plot(steps, curve, color=color, label=c.suite.label)
    ax.set_xlabel("step (one batch of each task's unlabelled test examples)")
    ax.set_ylabel("entropy, summed over the tasks")
    ax.set_title("Layer-wise AdaMerging (FusionBench's loop) on the testbed", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path), [(c.suite.label, rec) for c, rec in runs]
